"""heedful: find the attentive users in comparison-mode preference votes.

Pipeline: votes (:mod:`heedful.votes`) -> sufficient statistics (:mod:`heedful.suffstats`) -> fit
(:mod:`heedful.inference`, model in :mod:`heedful.model`) -> per-user posterior -> filter -> export.
"""

__version__ = "0.1.0"
