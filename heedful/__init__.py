"""heedful: find the attentive users in comparison-mode preference votes.

Pipeline: votes (:mod:`heedful.votes`) -> sufficient statistics (:mod:`heedful.suffstats`) -> fit
(:mod:`heedful.inference`, model in :mod:`heedful.model`) -> per-user posterior -> filter -> export.
"""

import os

# How torch's OpenMP worker threads wait between parallel ops; must be set before torch loads its OpenMP
# runtime. Spinning without end (ACTIVE) makes small tensor ops up to 100x slower when the cores are shared
# with other work, so the policy is PASSIVE. Sleeping at once, though, puts a futex wake-up (about 0.1 ms)
# in front of every op: on the 2-core development machine an elementwise op on 65k doubles took 120 us
# instead of 27-36 us, and the posterior of 1M users 2.0-2.8 s instead of 1.2-1.6 s. GNU OpenMP (torch's
# on Linux) therefore spins GOMP_SPINCOUNT rounds first (it overrides the policy's zero): 10,000 rounds,
# about 0.7 ms of CPU after the last op of a burst (benchmarks/omp_wait.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
