"""Sufficient statistics: vote counts per (user, pair), built once and vectorised.

A pair is stored in canonical order (``model_a < model_b`` as strings), whatever order the votes list
the two models in; ``y = 1`` means the vote picked the canonical ``model_a``. Given eta_u, user u's
likelihood depends on the votes only through the cells (u, p): ``k_up`` canonical-A picks out of
``n_up`` non-tie votes. Ties are counted per user and per pair and left out of the likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from heedful.votes import validate_votes


@dataclass(frozen=True)
class VoteStats:
    """Counts per (user, pair) cell; positions index ``users`` and ``pairs``."""

    users: pd.Index                  # user ids; position = user index
    pairs: list[tuple[str, str]]     # canonical (model_a, model_b), model_a < model_b
    cell_user: np.ndarray            # int64 [C]
    cell_pair: np.ndarray            # int64 [C]
    cell_k: np.ndarray               # int64 [C]: votes for the canonical model_a
    cell_n: np.ndarray               # int64 [C]: non-tie votes
    user_ties: np.ndarray            # int64 [U]
    pair_ties: np.ndarray            # int64 [P]
    n_rows: int

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def n_votes(self) -> int:
        """Non-tie votes (the ones in the likelihood)."""
        return int(self.cell_n.sum())

    @property
    def n_ties(self) -> int:
        return int(self.user_ties.sum())

    def user_votes(self) -> np.ndarray:
        """Non-tie votes per user, int64 [U]."""
        return np.bincount(self.cell_user, weights=self.cell_n, minlength=self.n_users).astype(np.int64)

    def pair_votes(self) -> np.ndarray:
        """Non-tie votes per pair, int64 [P]."""
        return np.bincount(self.cell_pair, weights=self.cell_n, minlength=self.n_pairs).astype(np.int64)

    def pair_a_votes(self) -> np.ndarray:
        """Votes for the canonical model_a per pair, int64 [P]."""
        return np.bincount(self.cell_pair, weights=self.cell_k, minlength=self.n_pairs).astype(np.int64)

    def pair_labels(self) -> list[str]:
        return [f"{a} vs {b}" for a, b in self.pairs]

    def pair_index(self, model_a: str, model_b: str) -> tuple[int, bool] | None:
        """Index of the pair {model_a, model_b} and whether (model_a, model_b) is the reversed order."""
        flipped = model_a > model_b
        key = (model_b, model_a) if flipped else (model_a, model_b)
        try:
            return self.pairs.index(key), flipped
        except ValueError:
            return None

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Cell arrays as tensors on ``device``; counts in ``dtype`` (exact in float64 up to 2**53)."""
        return {
            "cell_user": torch.as_tensor(self.cell_user, device=device),
            "cell_pair": torch.as_tensor(self.cell_pair, device=device),
            "k": torch.as_tensor(self.cell_k, device=device, dtype=dtype),
            "n": torch.as_tensor(self.cell_n, device=device, dtype=dtype),
        }


def canonical_pairs(model_a: pd.Series, model_b: pd.Series) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray]:
    """Pair code per row, the canonical pairs, and whether each row lists its pair in reversed order."""
    a = model_a.astype(str).to_numpy(dtype=object)
    b = model_b.astype(str).to_numpy(dtype=object)
    flipped = a > b
    lo = np.where(flipped, b, a)
    hi = np.where(flipped, a, b)
    codes, uniques = pd.factorize(pd.MultiIndex.from_arrays([lo, hi]), sort=True)
    return codes.astype(np.int64), [tuple(map(str, t)) for t in uniques], flipped


def vote_stats(votes: pd.DataFrame, *, validated: bool = False) -> VoteStats:
    """Count votes per (user, pair) cell, with no Python loop over votes or users."""
    if not validated:
        votes = validate_votes(votes)
    user_code, users = pd.factorize(votes["user_id"], sort=False)
    pair_code, pairs, flipped = canonical_pairs(votes["model_a"], votes["model_b"])
    choice = votes["choice"].to_numpy(dtype=object)
    tie = choice == "tie"
    picked_a = (choice == "a") ^ flipped          # picked the canonical model_a
    n_users, n_pairs = len(users), len(pairs)
    key = user_code.astype(np.int64) * n_pairs + pair_code
    live = ~tie
    cells, inv = np.unique(key[live], return_inverse=True)
    k = np.bincount(inv, weights=picked_a[live], minlength=len(cells)).astype(np.int64)
    n = np.bincount(inv, minlength=len(cells)).astype(np.int64)
    return VoteStats(
        users=pd.Index(users, name="user_id"),
        pairs=pairs,
        cell_user=(cells // n_pairs).astype(np.int64),
        cell_pair=(cells % n_pairs).astype(np.int64),
        cell_k=k,
        cell_n=n,
        user_ties=np.bincount(user_code[tie], minlength=n_users).astype(np.int64),
        pair_ties=np.bincount(pair_code[tie], minlength=n_pairs).astype(np.int64),
        n_rows=len(votes),
    )
