"""heedful: find the attentive users in comparison-mode preference votes.

Pipeline: votes (:mod:`heedful.votes`) -> sufficient statistics (:mod:`heedful.suffstats`) -> fit
(:mod:`heedful.inference`, model in :mod:`heedful.model`) -> per-user posterior -> filter -> export.
"""

import os

# OpenMP threads that spin while waiting make small tensor ops up to 100x slower when the cores are
# shared with other work; passive waiting costs nothing measurable when they are not. Must be set
# before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
