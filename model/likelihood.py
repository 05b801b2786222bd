"""The fast path: the exact marginal likelihood of the behaviour model on sufficient statistics.

For user u with cells (p, k_up, n_up) and coin-flip casual picks (c = 1/2),

    q_p(eta) = c + eta (mu_p - c)                     (P(y = 1 | eta), z and t summed out)
    L_u(eta) = prod_p q_p(eta)^k_up (1 - q_p(eta))^(n_up - k_up)
    m_u      = E_{eta ~ Beta(a, b)}[L_u(eta)]         (eta integrated out)

L_u is a polynomial of degree n_u = sum_p n_up in eta, so Gauss-Jacobi quadrature with
G >= (n_u + 2) / 2 nodes gives m_u (and the posterior mean) exactly. Users are grouped in buckets
of similar n_u, each with its own G; inside a bucket the distinct (pair, k, n) patterns are
evaluated once and summed per user with a sparse incidence matrix, so the cost grows with the
number of votes, not with users x the largest user's G. Users with more than ``2 * cap - 2`` votes
share ``cap`` nodes: no longer exact, but their likelihood is smooth and the error is far below
the statistical error (checked in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from heedful.model.quadrature import gauss_jacobi, nodes_for
from heedful.suffstats import VoteStats

CASUAL = 0.5        # a casual user's probability of picking either answer
NODE_CAP = 256      # nodes for the heaviest users


@dataclass
class Bucket:
    """Users with similar vote counts, their distinct cell patterns, and the user x pattern incidence."""

    n_nodes: int
    users: torch.Tensor        # long [Ub]: global user index
    pattern_pair: torch.Tensor  # long [Q]
    k: torch.Tensor            # [Q]
    n: torch.Tensor            # [Q]
    incidence: torch.Tensor    # sparse [Ub, Q]: how many of a user's cells have this pattern

    def row_chunks(self, max_rows: int) -> list[tuple[int, torch.Tensor]]:
        """Row ranges of the incidence as (first row, sparse [rows, Q]) pieces of at most max_rows rows."""
        if self.incidence.shape[0] <= max_rows:
            return [(0, self.incidence)]
        idx, val = self.incidence.indices(), self.incidence.values()
        out = []
        for start in range(0, self.incidence.shape[0], max_rows):
            stop = min(start + max_rows, self.incidence.shape[0])
            lo, hi = torch.searchsorted(idx[0], torch.tensor([start, stop], device=idx.device)).tolist()
            sub = idx[:, lo:hi] - torch.tensor([[start], [0]], device=idx.device)
            out.append((start, torch.sparse_coo_tensor(sub, val[lo:hi], (stop - start, self.incidence.shape[1]),
                                                       check_invariants=False)))
        return out


@dataclass
class QuadraturePlan:
    """Everything about the data that the likelihood needs, on one device and dtype."""

    n_users: int
    n_pairs: int
    buckets: list[Bucket]
    device: torch.device
    dtype: torch.dtype


def build_plan(stats: VoteStats, device: torch.device, dtype: torch.dtype,
               cap: int = NODE_CAP) -> QuadraturePlan:
    """Group users by vote count (powers of two) and deduplicate (pair, k, n) patterns per bucket."""
    nu = stats.user_votes()
    bucket_of_user = np.where(nu > 0, np.floor(np.log2(np.maximum(nu, 1))).astype(np.int64), -1)
    bucket_of_cell = bucket_of_user[stats.cell_user]
    buckets = []
    for j in np.unique(bucket_of_user[bucket_of_user >= 0]):
        users = np.flatnonzero(bucket_of_user == j)
        cells = np.flatnonzero(bucket_of_cell == j)
        local = np.full(stats.n_users, -1, dtype=np.int64)
        local[users] = np.arange(len(users))
        pat = np.stack([stats.cell_pair[cells], stats.cell_k[cells], stats.cell_n[cells]], axis=1)
        uniq, inv = np.unique(pat, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        rows = torch.as_tensor(local[stats.cell_user[cells]], device=device)
        cols = torch.as_tensor(inv, device=device)
        inc = torch.sparse_coo_tensor(torch.stack([rows, cols]),
                                      torch.ones(len(cells), dtype=dtype, device=device),
                                      (len(users), len(uniq)), check_invariants=False).coalesce()
        buckets.append(Bucket(
            n_nodes=nodes_for(int(nu[users].max()), cap),
            users=torch.as_tensor(users, device=device),
            pattern_pair=torch.as_tensor(uniq[:, 0], device=device),
            k=torch.as_tensor(uniq[:, 1], device=device, dtype=dtype),
            n=torch.as_tensor(uniq[:, 2], device=device, dtype=dtype),
            incidence=inc,
        ))
    return QuadraturePlan(stats.n_users, stats.n_pairs, buckets, torch.device(device), dtype)


def pattern_loglik(eta: torch.Tensor, mu: torch.Tensor, k: torch.Tensor, n: torch.Tensor,
                   c: float = CASUAL) -> torch.Tensor:
    """log of q^k (1-q)^(n-k), q = c + eta (mu - c); broadcasts eta against the patterns."""
    q = c + eta * (mu - c)
    return torch.xlogy(k, q) + torch.xlogy(n - k, 1.0 - q)


def bucket_loglik_at(bucket: Bucket, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """log L_u(x_g) for every user of the bucket and every point x_g: [Ub, G]."""
    table = pattern_loglik(x.unsqueeze(0), mu[bucket.pattern_pair].unsqueeze(1),
                           bucket.k.unsqueeze(1), bucket.n.unsqueeze(1))
    return torch.sparse.mm(bucket.incidence, table)


def user_log_marginal(plan: QuadraturePlan, a: torch.Tensor, b: torch.Tensor,
                      mu: torch.Tensor) -> torch.Tensor:
    """log m_u for every user, [U]; users with no non-tie votes get 0."""
    out = torch.zeros(plan.n_users, dtype=plan.dtype, device=plan.device)
    for bk in plan.buckets:
        x, logw = gauss_jacobi(a, b, bk.n_nodes)
        ll = bucket_loglik_at(bk, x.to(plan.dtype), mu)
        out = out.index_put((bk.users,), torch.logsumexp(ll + logw.to(plan.dtype), dim=1))
    return out


def log_marginal(plan: QuadraturePlan, a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """sum_u log m_u: the log-likelihood of all non-tie votes with eta and z integrated out."""
    total = torch.zeros((), dtype=plan.dtype, device=plan.device)
    for bk in plan.buckets:
        x, logw = gauss_jacobi(a, b, bk.n_nodes)
        ll = bucket_loglik_at(bk, x.to(plan.dtype), mu)
        total = total + torch.logsumexp(ll + logw.to(plan.dtype), dim=1).sum()
    return total


def cell_loglik(eta_user: torch.Tensor, mu: torch.Tensor, cells: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over cells of log P(k | n, eta_u, mu_p) without the binomial coefficient, per cell [C]."""
    return pattern_loglik(eta_user[cells["cell_user"]], mu[cells["cell_pair"]], cells["k"], cells["n"])
