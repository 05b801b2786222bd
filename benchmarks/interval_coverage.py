"""Are the reported intervals honest? Coverage of the 90% intervals over repeated simulations.

Globals: a, b, the population mean a/(a+b) and the concentration a+b (Hessian of the exact marginal
likelihood, normal on log a / log b, delta method), with mu known. Users: the 90% eta intervals.

    python benchmarks/interval_coverage.py [--reps 100] [--users 2000] [--votes 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import heedful  # noqa: F401  (before torch: OpenMP wait policy)
from heedful.config import PairPrior, Priors
from heedful.inference import Attentiveness
from heedful.simulate import simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--votes", type=int, default=10)
    args = ap.parse_args()
    a, b, mu = 3.0, 5.0, 0.8
    truth = {"a": a, "b": b, "mean": a / (a + b), "concentration": a + b}
    hits = dict.fromkeys(truth, 0)
    eta_cover = []
    priors = Priors(pairs=(PairPrior("strong-model", "weak-model", mu=mu),))
    t0 = time.perf_counter()
    for r in range(args.reps):
        sim = simulate(args.users, args.votes, mu=mu, eta_prior=(a, b), seed=1000 + r)
        m = Attentiveness(priors=priors).fit(sim.votes)
        ep = m.eta_prior_
        for k, v in truth.items():
            hits[k] += ep[f"{k}_lo"] <= v <= ep[f"{k}_hi"]
        u = m.users_.merge(sim.users, on="user_id")
        eta_cover.append(float(((u.true_eta >= u.eta_lo) & (u.true_eta <= u.eta_hi)).mean()))
    wall = time.perf_counter() - t0
    print(f"{args.reps} simulations of {args.users:,} users x {args.votes} votes, mu = {mu} known, "
          f"eta ~ Beta({a:g}, {b:g}); {wall:.0f} s")
    print("| parameter | coverage of the 90% interval | binomial 95% band for a true 90% |")
    print("|---|---|---|")
    band = 1.96 * np.sqrt(0.9 * 0.1 / args.reps)
    for k in truth:
        print(f"| {k} | {hits[k] / args.reps:.2f} | [{0.9 - band:.2f}, {0.9 + band:.2f}] |")
    print(f"| eta_u (per user, mean over runs) | {np.mean(eta_cover):.3f} | |")


if __name__ == "__main__":
    main()
