"""Issue-5 study: what modelling strengths, position bias and gold labels buys on a realistic log.

Simulated log: 5 generator models (strengths 2, 1.5, 1, 0.5, 0), geometric votes per user (mean 12),
a 65/35 mix of Beta(8, 2) and Beta(1, 5) users, half the users picking the first-shown answer with
probability 0.9 when casual. Compared: (i) strengths + per-user position bias, (i') strengths + one
rho, (ii) one mu per pair without position bias, (iii) the raw rate of agreeing with each pair's
majority. Printed: AUC of the user score for true eta > 0.5; the share of correct labels among the
votes kept when the most attentive users holding 50% of the votes are kept; recovered rho and
strengths; and how many gold votes pin a pair's mu to +-0.03.

    python benchmarks/behaviour.py [--users 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy import stats

import heedful  # noqa: F401  (before torch: OpenMP wait policy)
from heedful.config import priors_from_dict
from heedful.inference import Attentiveness
from heedful.simulate import pairs_from_strengths, simulate

STRENGTHS = {"gen-a": 2.0, "gen-b": 1.5, "gen-c": 1.0, "gen-d": 0.5, "gen-e": 0.0}


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney)."""
    r = stats.rankdata(score)
    n1, n0 = positive.sum(), (~positive).sum()
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def kept_accuracy(votes: pd.DataFrame, score: pd.Series, fraction: float = 0.5) -> tuple[float, int]:
    """Keep the highest-scoring users until they hold `fraction` of the non-tie votes; share of correct labels."""
    v = votes[votes.choice != "tie"]
    per_user = v.groupby("user_id").size()
    order = score.reindex(per_user.index).sort_values(ascending=False, kind="stable")
    cum = per_user.reindex(order.index).cumsum()
    keep = cum.index[cum <= fraction * len(v)]
    kept = v[v.user_id.isin(keep)]
    return float((kept.choice == kept.true_better).mean()), len(kept)


def raw_agreement(votes: pd.DataFrame) -> pd.Series:
    """Per user: the rate of picking the side most users pick on that pair."""
    v = votes[votes.choice != "tie"]
    lo = np.minimum(v.model_a, v.model_b)
    picked = np.where(v.choice == "a", v.model_a, v.model_b)
    pair = lo + "|" + np.maximum(v.model_a, v.model_b)
    first_wins = pd.Series(picked == lo).groupby(pair.to_numpy()).mean() > 0.5
    agree = (picked == lo) == first_wins.reindex(pair.to_numpy()).to_numpy()
    return pd.Series(np.asarray(agree, dtype=float), index=v.user_id.to_numpy()).groupby(level=0).mean()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sim = simulate(args.users, 12, pairs=pairs_from_strengths(STRENGTHS), vote_counts="geometric",
                   eta_mixture=[(0.65, 8, 2), (0.35, 1, 5)], position_share=0.5, position_rho=0.9, seed=args.seed)
    votes, truth = sim.votes, sim.users.set_index("user_id")
    print(f"log: {len(votes):,} votes, {args.users:,} users, {votes.choice.ne('tie').sum():,} non-tie; "
          f"correct labels among all votes: {(votes.choice == votes.true_better).mean():.3f}")
    models = {
        "(i) strengths + per-user rho": {"behaviour": {"casual": "position", "rho_per_user": "learn"},
                                         "generators": {"mu": "strengths", "reference": "gen-e"}},
        "(i') strengths + one rho": {"behaviour": {"casual": "position"},
                                     "generators": {"mu": "strengths", "reference": "gen-e"}},
        "(ii) one mu per pair, no position": {},
    }
    positive = (truth.true_eta > 0.5).to_numpy()
    rows = []
    fitted = {}
    for name, doc in models.items():
        t0 = time.perf_counter()
        m = Attentiveness(priors=priors_from_dict(doc)).fit(votes)
        wall = time.perf_counter() - t0
        fitted[name] = m
        score = m.users_.set_index("user_id").eta_mean
        acc, n = kept_accuracy(votes, score)
        rows.append((name, auc(score.reindex(truth.index).to_numpy(), positive), acc, n, wall))
    raw = raw_agreement(votes).reindex(truth.index).fillna(0.5)
    acc, n = kept_accuracy(votes, raw)
    rows.append(("(iii) raw agreement with pair majority", auc(raw.to_numpy(), positive), acc, n, 0.0))
    print("\n| scorer | AUC (true eta > 0.5) | correct labels kept (50% of votes) | votes kept | fit s |")
    print("|---|---|---|---|---|")
    for name, a, acc, n, wall in rows:
        print(f"| {name} | {a:.3f} | {acc:.3f} | {n:,} | {wall:.1f} |")
    full = fitted["(i) strengths + per-user rho"]
    one = fitted["(i') strengths + one rho"]
    print(f"\nposition bias: per-user rho_u ~ Beta({full.rho_['a']:.2f}, {full.rho_['b']:.2f}), mean "
          f"{full.rho_['mean']:.3f} (truth: half the users 0.5, half 0.9, mean 0.70); "
          f"one rho: {one.rho_['rho']:.3f} [{one.rho_['lo']:.3f}, {one.rho_['hi']:.3f}]")
    print("\n| model | true strength | fitted (90% interval) |\n|---|---|---|")
    for mname, s in STRENGTHS.items():
        f = full.strengths_[mname]
        print(f"| {mname} | {s:.2f} | {f['strength']:.3f} [{f['lo']:.3f}, {f['hi']:.3f}] |")
    print("\nGold votes on one pair (mu = 0.8, 2,000 users x 10 votes, mu learned): 90% interval half-width")
    print("| gold votes | mu | half-width |\n|---|---|---|")
    for n_gold in (0, 50, 100, 200, 400, 800):
        s2 = simulate(2000, 10, mu=0.8, eta_prior=(2, 5), gold_rate=n_gold / 20000, seed=args.seed + 1)
        m2 = Attentiveness().fit(s2.votes)
        r = m2.pairs_.iloc[0]
        print(f"| {int(s2.votes.gold.notna().sum()) if 'gold' in s2.votes else 0} | {r.mu:.3f} | "
              f"{(r.mu_hi - r.mu_lo) / 2:.3f} |")


if __name__ == "__main__":
    main()
