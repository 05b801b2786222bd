"""Sufficient statistics: vote counts per (user, kind), built once and vectorised.

A pair is stored in canonical order (``model_a < model_b`` as strings), whatever order the votes list
the two models in. Every non-tie vote has a *kind*: its pair, whether it picked the canonical model_a,
whether it picked the answer shown first (``first``: 0 unknown, 1 the first-shown, 2 the second-shown),
and its gold label (``gold``: 0 none, 1 agrees with the pick, 2 disagrees). Given eta_u, a vote's
likelihood depends only on its kind:

    P(y_n | eta_u) = c_kind + eta_u (m_kind - c_kind)
    m_kind = P(pick | attentive) = mu_p or 1 - mu_p (no gold), 1 or 0 (gold agrees / disagrees)
    c_kind = P(pick | casual)    = 1/2 (order unknown), rho (picked first-shown), 1 - rho (second)

so user u enters only through the cells (u, kind) with their counts. Gold labels also inform mu_p
directly (t_n is observed): per pair, ``gold_a`` of ``gold_n`` gold labels say canonical A is better.
Ties are counted per user and per pair and left out of the likelihood (their gold labels still count).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from heedful.votes import validate_votes

if TYPE_CHECKING:
    import torch

N_FIRST, N_GOLD = 3, 3
KINDS_PER_PAIR = 2 * N_FIRST * N_GOLD


def kind_id(pair: np.ndarray, pick_a: np.ndarray, first: np.ndarray, gold: np.ndarray) -> np.ndarray:
    return ((pair * 2 + pick_a) * N_FIRST + first) * N_GOLD + gold


@dataclass(frozen=True)
class VoteStats:
    """Counts per (user, kind) cell; positions index ``users``, ``pairs`` and kinds."""

    users: pd.Index                  # user ids; position = user index
    pairs: list[tuple[str, str]]     # canonical (model_a, model_b), model_a < model_b
    cell_user: np.ndarray            # int64 [C]
    cell_kind: np.ndarray            # int64 [C]
    cell_count: np.ndarray           # int64 [C]
    gold_a: np.ndarray               # int64 [P]: gold labels saying canonical model_a is better
    gold_n: np.ndarray               # int64 [P]: gold labels
    user_ties: np.ndarray            # int64 [U]
    pair_ties: np.ndarray            # int64 [P]
    n_rows: int

    # -- kinds (all KINDS_PER_PAIR kinds of every pair exist; unused ones have no cells) -----------
    @property
    def n_kinds(self) -> int:
        return self.n_pairs * KINDS_PER_PAIR

    def kinds(self) -> dict[str, np.ndarray]:
        k = np.arange(self.n_kinds)
        return {"pair": k // KINDS_PER_PAIR, "pick_a": (k // (N_FIRST * N_GOLD)) % 2,
                "first": (k // N_GOLD) % N_FIRST, "gold": k % N_GOLD}

    @property
    def cell_pair(self) -> np.ndarray:
        return self.cell_kind // KINDS_PER_PAIR

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def n_votes(self) -> int:
        """Non-tie votes (the ones in the likelihood)."""
        return int(self.cell_count.sum())

    @property
    def n_ties(self) -> int:
        return int(self.user_ties.sum())

    @property
    def has_order(self) -> bool:
        """Whether any vote says which answer was shown first."""
        return bool(self.cell_count[self.kinds()["first"][self.cell_kind] > 0].sum() > 0)

    @property
    def n_gold(self) -> int:
        return int(self.gold_n.sum())

    def user_votes(self) -> np.ndarray:
        """Non-tie votes per user, int64 [U]; read-only, counted once (the quadrature plan buckets users by it,
        the summaries report it)."""
        return self._user_votes

    @cached_property
    def _user_votes(self) -> np.ndarray:
        return _votes_by(self.cell_user, self.cell_count, self.n_users)

    @cached_property
    def cells_by_user(self) -> bool:
        """Whether the cells are in ascending user order (as counted); checked once."""
        cu = self.cell_user
        return not (cu.size and bool((cu[1:] < cu[:-1]).any()))

    def kind_votes(self) -> np.ndarray:
        """Non-tie votes per kind, int64 [P x KINDS_PER_PAIR] (kinds of pair p are p * KINDS_PER_PAIR + ...);
        read-only, counted once (a pass over the cells: ~0.08 s at 10M votes, asked for by the start, the
        warm-start sample and the summaries)."""
        return self._kind_votes

    @cached_property
    def _kind_votes(self) -> np.ndarray:
        return _votes_by(self.cell_kind, self.cell_count, self.n_kinds)

    def pair_votes(self) -> np.ndarray:
        """Non-tie votes per pair, int64 [P]."""
        return self.kind_votes().reshape(self.n_pairs, KINDS_PER_PAIR).sum(1)

    def pair_a_votes(self) -> np.ndarray:
        """Votes for the canonical model_a per pair, int64 [P]."""
        return (self.kind_votes() * self.kinds()["pick_a"]).reshape(self.n_pairs, KINDS_PER_PAIR).sum(1)

    def pair_labels(self) -> list[str]:
        return [f"{a} vs {b}" for a, b in self.pairs]

    def models(self) -> list[str]:
        return sorted({m for p in self.pairs for m in p})

    def pair_index(self, model_a: str, model_b: str) -> tuple[int, bool] | None:
        """Index of the pair {model_a, model_b} and whether (model_a, model_b) is the reversed order."""
        flipped = model_a > model_b
        key = (model_b, model_a) if flipped else (model_a, model_b)
        try:
            return self.pairs.index(key), flipped
        except ValueError:
            return None

    def sample_users(self, n: int, seed: int = 0) -> VoteStats:
        """n users drawn at random without replacement (in their original order) with all their cells.

        The per-pair counts that no user owns (gold labels, ties) are thinned binomially to the sample's
        fraction f = n / U: gold_a' ~ Bin(gold_a, f), gold_n' - gold_a' ~ Bin(gold_n - gold_a, f)."""
        rng = np.random.default_rng(seed)
        n = min(n, self.n_users)
        keep = np.sort(rng.choice(self.n_users, size=n, replace=False))
        cells, cell_user = self._cells_of(keep)
        f = n / max(self.n_users, 1)
        gold_a = rng.binomial(self.gold_a, f)
        gold_n = gold_a + rng.binomial(self.gold_n - self.gold_a, f)
        user_ties = self.user_ties[keep]
        cell_count = self.cell_count[cells]
        return VoteStats(users=self.users[keep], pairs=list(self.pairs), cell_user=cell_user,
                         cell_kind=self.cell_kind[cells], cell_count=cell_count,
                         gold_a=gold_a.astype(np.int64), gold_n=gold_n.astype(np.int64), user_ties=user_ties,
                         pair_ties=rng.binomial(self.pair_ties, f).astype(np.int64),
                         n_rows=int(cell_count.sum() + user_ties.sum()))

    def _cells_of(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cells of the users ``keep`` (ascending), in their order, and those users' new codes 0 .. n-1.

        Cells sorted by user (as counted): user u's cells are the run [start_u, start_(u+1)) of the cumulative
        cell counts, so only the kept cells are gathered; otherwise a mask over all the cells."""
        cu = self.cell_user
        if not self.cells_by_user:
            code = np.full(self.n_users, -1, dtype=np.int64)
            code[keep] = np.arange(len(keep))
            cell = code[cu] >= 0
            return np.flatnonzero(cell), code[cu[cell]]
        start = np.zeros(self.n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(cu, minlength=self.n_users), out=start[1:])
        lo = start[keep]
        lens = start[keep + 1] - lo
        ends = np.cumsum(lens)
        cells = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
        cells += np.repeat(lo - (ends - lens), lens)
        return cells, np.repeat(np.arange(len(keep), dtype=np.int64), lens)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Cells and kinds as tensors on ``device``; counts in ``dtype`` (exact in float64 up to 2**53)."""
        import torch  # here: reading and counting votes never needs torch (the CLI imports it meanwhile)

        kinds = self.kinds()
        return {
            "cell_user": torch.as_tensor(self.cell_user, device=device),
            "cell_kind": torch.as_tensor(self.cell_kind, device=device),
            "count": torch.as_tensor(self.cell_count, device=device, dtype=dtype),
            **{f"kind_{k}": torch.as_tensor(v, device=device) for k, v in kinds.items()},
            "gold_a": torch.as_tensor(self.gold_a, device=device, dtype=dtype),
            "gold_n": torch.as_tensor(self.gold_n, device=device, dtype=dtype),
        }


def _votes_by(index: np.ndarray, count: np.ndarray, n: int) -> np.ndarray:
    """sum of ``count`` per value of ``index`` (0 .. n-1), int64 [n], read-only (cached and shared).

    In integers: the cells counted, plus count - 1 for the cells holding more than one vote (most hold one),
    instead of float weights, whose [C] float copy is fresh memory (10M votes: 70 MB a call)."""
    out = np.bincount(index, minlength=n)
    more = np.flatnonzero(count != 1)
    if len(more):
        np.add.at(out, index[more], count[more] - 1)
    out.flags.writeable = False
    return out


def canonical_pairs(model_a: pd.Series, model_b: pd.Series) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray]:
    """Pair code per row, the canonical pairs, and whether each row lists its pair in reversed order."""
    a = model_a.astype(str).to_numpy(dtype=object)
    b = model_b.astype(str).to_numpy(dtype=object)
    flipped = a > b
    lo = np.where(flipped, b, a)
    hi = np.where(flipped, a, b)
    codes, uniques = pd.factorize(pd.MultiIndex.from_arrays([lo, hi]), sort=True)
    return codes.astype(np.int64), [tuple(map(str, t)) for t in uniques], flipped


def _side(votes: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(known, is_a) for an optional a/b column in the row's own orientation."""
    if col not in votes.columns:
        z = np.zeros(len(votes), dtype=bool)
        return z, z
    v = votes[col].astype("string")
    is_a = (v == "a").fillna(False).to_numpy(dtype=bool)
    return is_a | (v == "b").fillna(False).to_numpy(dtype=bool), is_a


def vote_stats(votes: pd.DataFrame, *, validated: bool = False) -> VoteStats:
    """Count votes per (user, kind) cell, with no Python loop over votes or users."""
    if not validated:
        votes = validate_votes(votes)
    user_code, users = pd.factorize(votes["user_id"], sort=False)
    pair_code, pairs, flipped = canonical_pairs(votes["model_a"], votes["model_b"])
    choice = votes["choice"].to_numpy(dtype=object)
    tie = choice == "tie"
    pick_a = (choice == "a") ^ flipped               # picked the canonical model_a
    order_known, row_a_first = _side(votes, "shown_first")
    a_first = row_a_first ^ flipped                  # canonical model_a shown first
    first = np.where(order_known, np.where(pick_a == a_first, 1, 2), 0)
    gold_known, row_gold_a = _side(votes, "gold")
    gold_canon_a = row_gold_a ^ flipped
    gold = np.where(gold_known, np.where(gold_canon_a == pick_a, 1, 2), 0)
    n_users, n_pairs = len(users), len(pairs)
    kind = kind_id(pair_code, pick_a.astype(np.int64), first, gold)
    live = ~tie
    n_kinds = n_pairs * KINDS_PER_PAIR
    key = user_code.astype(np.int64)[live] * n_kinds + kind[live]
    cells, count = np.unique(key, return_counts=True)
    return VoteStats(
        users=pd.Index(users, name="user_id"),
        pairs=pairs,
        cell_user=(cells // n_kinds).astype(np.int64),
        cell_kind=(cells % n_kinds).astype(np.int64),
        cell_count=count.astype(np.int64),
        gold_a=np.bincount(pair_code[gold_known & gold_canon_a], minlength=n_pairs).astype(np.int64),
        gold_n=np.bincount(pair_code[gold_known], minlength=n_pairs).astype(np.int64),
        user_ties=np.bincount(user_code[tie], minlength=n_users).astype(np.int64),
        pair_ties=np.bincount(pair_code[tie], minlength=n_pairs).astype(np.int64),
        n_rows=len(votes),
    )
