"""Choose the reward head's L2 penalty per source on calibration seeds the benchmark never uses.

    python benchmarks/downstream/l2_sweep.py            # seeds 1000-1004, both sources

For each seed: the benchmark's split and simulated users; a linear head trained on the gold labels,
on all votes and on the attentive-type users' votes, at every penalty of the grid; mean held-out
accuracy printed per (training set, penalty). ``run.py``'s ``DEFAULT_L2`` is the penalty best for
all votes, the baseline: cleaner sets prefer smaller penalties, so this choice does not favour filtering
(a penalty tuned for clean labels would).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.downstream.data import SOURCES, load_items  # noqa: E402
from benchmarks.downstream.embed import cache_dir, embed_items, item_features, minilm_embedder  # noqa: E402
from benchmarks.downstream.reward import train_reward  # noqa: E402
from benchmarks.downstream.users import Population, simulate_votes  # noqa: E402

GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def sweep(source: str, seeds: range, test_frac: float = 0.25) -> pd.DataFrame:
    """Mean held-out accuracy per (training set, L2 penalty) over ``seeds``."""
    items = load_items(source)
    phi_a, phi_b = item_features(items, embed_items(items, minilm_embedder(), source, cache_dir()))
    row_of = pd.Series(np.arange(len(items)), index=items.item_id)
    acc: dict[tuple[str, float], list[float]] = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(items))
        n_test = int(round(test_frac * len(items)))
        test, train = perm[:n_test], perm[n_test:]
        votes = simulate_votes(items.iloc[train], Population(), rng)
        vrow = row_of.loc[votes.item_id].to_numpy()
        gold_a, pick_a = (votes.gold_truth == "a").to_numpy(), (votes.choice == "a").to_numpy()
        test_gold_a = (items.gold.iloc[test] == "a").to_numpy()
        attentive = votes.true_attentive_user.to_numpy()
        for name, rows, label_a in (("gold", slice(None), gold_a), ("all", slice(None), pick_a),
                                    ("oracle", attentive, pick_a)):
            ia, la = vrow[rows], label_a[rows]
            ch = np.where(la[:, None], phi_a[ia], phi_b[ia])
            rj = np.where(la[:, None], phi_b[ia], phi_a[ia])
            for l2 in GRID:
                head = train_reward(ch, rj, l2=l2)
                acc.setdefault((name, l2), []).append(head.accuracy(phi_a[test], phi_b[test], test_gold_a))
    return pd.Series({k: float(np.mean(v)) for k, v in acc.items()}).unstack()


def main() -> int:
    import torch

    torch.set_num_threads(2)
    for src in SOURCES:
        print(f"## {src}: mean held-out accuracy, seeds 1000-1004\n")
        print(sweep(src, range(1000, 1005)).round(3).to_string() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
