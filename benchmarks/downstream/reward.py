"""Bradley-Terry reward heads on frozen features, with per-example-epsilon robust losses.

A reward head r_w(x, y) scores an answer; on a vote with chosen y_c and rejected y_r the margin is
h_n = r_w(x, y_c) - r_w(x, y_r) and Bradley-Terry says P(y_c preferred) = sigmoid(h_n). With
l(h) = -log sigmoid(h) = softplus(-h) the losses, per example with flip rate eps_n in [0, 1/2), are

- BT:   l(h_n)
- rBT:  [(1 - eps_n) l(h_n) - eps_n l(-h_n)] / (1 - 2 eps_n)      (Chowdhury et al. 2024, debiased;
        its expectation over a label flipped with probability eps_n is the clean loss l(h_n))
- cBT:  (1 - eps_n) l(h_n) + eps_n l(-h_n)                            (conservative: label smoothing)

For a linear head r_w = w . phi, h_n = w . (phi_c - phi_r) and every loss above is convex in w
(rBT's second derivative in h is sigmoid'(h) >= 0), but rBT is unbounded below for eps_n > 0, so an
L2 penalty lambda |w|^2 is always added. The linear head is fitted by L-BFGS on the full batch; the
optional MLP head (one hidden layer, GELU) by Adam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("bt", "rbt", "cbt")
HEADS = ("linear", "mlp")


def pair_loss(h: torch.Tensor, eps: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Per-example loss of margins ``h`` with flip rates ``eps`` (see the module docstring)."""
    lpos, lneg = F.softplus(-h), F.softplus(h)           # l(h), l(-h)
    if kind == "bt" or eps is None:
        return lpos
    if kind == "rbt":
        return ((1 - eps) * lpos - eps * lneg) / (1 - 2 * eps)
    if kind == "cbt":
        return (1 - eps) * lpos + eps * lneg
    raise ValueError(f"loss must be one of {LOSSES}, not {kind!r}")


@dataclass
class RewardHead:
    """A fitted reward head: ``score(phi)`` gives r(x, y) for feature rows phi."""

    module: torch.nn.Module

    @torch.no_grad()
    def score(self, phi: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(phi, dtype=next(self.module.parameters()).dtype)
        return self.module(x).squeeze(-1).numpy()

    def accuracy(self, phi_a: np.ndarray, phi_b: np.ndarray, gold_a: np.ndarray) -> float:
        """Pairwise accuracy: share of pairs where the gold-better answer gets the higher reward."""
        margin = self.score(phi_a) - self.score(phi_b)
        return float(np.mean((margin > 0) == gold_a))


def _module(dim: int, head: str, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if head == "linear":
        m = torch.nn.Linear(dim, 1, bias=False)     # a bias cancels in every margin
        torch.nn.init.zeros_(m.weight)
    elif head == "mlp":
        m = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
    else:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    return m.double()


def train_reward(phi_chosen: np.ndarray, phi_rejected: np.ndarray, *, eps: np.ndarray | None = None,
                 loss: str = "bt", head: str = "linear", l2: float = 1e-3, hidden: int = 64,
                 epochs: int = 200, lr: float = 3e-3, seed: int = 0) -> RewardHead:
    """Fit a reward head to (chosen, rejected) feature rows by minimising mean loss + l2 |w|^2."""
    if len(phi_chosen) == 0:
        raise ValueError("no training pairs")
    xc = torch.as_tensor(phi_chosen, dtype=torch.float64)
    xr = torch.as_tensor(phi_rejected, dtype=torch.float64)
    e = None if eps is None else torch.as_tensor(eps, dtype=torch.float64)
    m = _module(xc.shape[1], head, hidden, seed)
    params = list(m.parameters())

    def objective() -> torch.Tensor:
        h = (m(xc) - m(xr)).squeeze(-1)
        return pair_loss(h, e, loss).mean() + l2 * sum((p ** 2).sum() for p in params)

    if head == "linear":
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            val = objective()
            val.backward()
            return val
        opt.step(closure)
    else:
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(epochs):
            opt.zero_grad()
            val = objective()
            val.backward()
            opt.step()
    m.eval()
    return RewardHead(m)
