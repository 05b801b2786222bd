"""The fast path: the exact marginal likelihood of the behaviour model on sufficient statistics.

For user u with cells (kind, count) (see :mod:`heedful.suffstats`),

    P(y_n | eta) = c_n + eta (m_n - c_n)             (z and t summed out)
    L_u(eta)     = prod_cells (c_kind + eta (m_kind - c_kind))^count
    m_u          = E_{eta ~ Beta(a, b)}[L_u(eta)]     (eta integrated out)

L_u is a polynomial of degree n_u (the user's votes) in eta, and so are its derivatives in mu and rho, so
Gauss-Jacobi quadrature with G >= (n_u + 1) / 2 nodes gives m_u and those derivatives exactly, and its
derivatives in a and b too (the rule is exact at every a, b); the posterior's mean and sd (degree n_u + 2)
take one node more. Users are grouped in buckets of
similar n_u, each with its own G; inside a bucket the distinct (kind, count) patterns are evaluated
once and summed per user with a sparse incidence matrix, so the cost grows with the number of votes,
not with users x the largest user's G. Users with more than ``2 * cap - 1`` votes share ``cap`` nodes:
no longer exact, but their likelihood is smooth and the error is far below the statistical error.
Gold labels add sum_p [gold_a log mu_p + (gold_n - gold_a) log(1 - mu_p)] (t observed).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from heedful.model.quadrature import gauss_jacobi, nodes_for
from heedful.suffstats import VoteStats

CASUAL = 0.5        # a casual user's probability of picking either answer when the order is unknown
NODE_CAP = 256      # nodes for the heaviest users
RHO_NODE_CAP = 48   # rho nodes per eta node when rho is per user (exact up to 95 votes with a known order)
FEW_BUCKETS = 4     # up to this many vote-count buckets, each bucket's cells are found by a mask, not a sort
BACKGROUND_CELLS = 1 << 20   # from this many cells the plan's buckets and each transpose build in background threads
# users per block of a bucket's transposed incidence on a CPU: I^T P sums P's rows of each pattern's users, and by
# blocks those rows (16k users x G nodes) stay in cache while every pattern reads them. At 10M votes (G = 7) C = I^T P
# took 17-19 ms against 83 ms as one CSR. On a GPU the transpose stays one CSR (one kernel).
TRANSPOSE_BLOCK = 1 << 14


@dataclass
class Kinds:
    """Per kind: its pair, whether it picked canonical A, picked first/second-shown, gold agreement."""

    pair: torch.Tensor     # long [K]
    pick_a: torch.Tensor   # bool [K]
    first: torch.Tensor    # long [K]: 0 unknown, 1 picked the first-shown, 2 the second-shown
    gold: torch.Tensor     # long [K]: 0 none, 1 agrees with the pick, 2 disagrees

    def attentive_prob(self, mu: torch.Tensor) -> torch.Tensor:
        """m_kind = P(this pick | attentive): mu or 1 - mu, or 1 / 0 when a gold label fixes the truth."""
        mu_k = mu[self.pair]
        m = torch.where(self.pick_a, mu_k, 1.0 - mu_k)
        return torch.where(self.gold == 1, torch.ones_like(m), torch.where(self.gold == 2, torch.zeros_like(m), m))


def casual_prob(first: torch.Tensor, rho: torch.Tensor | None) -> torch.Tensor:
    """c = P(this pick | casual): 1/2 when the order is unknown or rho is None, else rho or 1 - rho."""
    half = torch.full(first.shape, CASUAL, dtype=rho.dtype if rho is not None else torch.float64,
                      device=first.device)
    if rho is None:
        return half
    return torch.where(first == 1, rho, torch.where(first == 2, 1.0 - rho, half))


def vote_loglik(eta: torch.Tensor, m: torch.Tensor, c: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """count * log(c + eta (m - c)), broadcasting; 0 * log 0 = 0."""
    return torch.xlogy(count, c + eta * (m - c))


@dataclass
class Bucket:
    """Users with similar vote counts, their distinct (kind, count) patterns, and the incidence.

    The incidence is a CSR matrix (rows: the bucket's users, in global order; columns: patterns; a 1
    where the user has a cell with that pattern); ``incidence_t`` is its transpose (:class:`BlockedTranspose`,
    CSR blocks over ranges of users), for the backward pass: d/d table of sum(G * (incidence @ table)) =
    incidence^T @ G. Only gradients and the curvature need the transpose, so a large bucket's is built in a
    background thread (numpy's sort and gather release the GIL) while the fit starts, and waited for on first use.
    """

    n_nodes: int                # Gauss-Jacobi nodes of the marginal and its derivatives (exact: degree n_max)
    moment_nodes: int           # ... of the posterior's mean and sd (exact: degree n_max + 2; one more unless capped)
    max_votes: int              # n_max: the votes of the bucket's heaviest user
    users: torch.Tensor         # long [Ub]: global user index
    pattern_kind: torch.Tensor  # long [Q]
    count: torch.Tensor         # [Q]
    incidence: torch.Tensor     # sparse CSR [Ub, Q]
    transpose: BlockedTranspose | Future = field(repr=False)   # [Q, Ub], or its build in progress

    @property
    def incidence_t(self) -> BlockedTranspose:
        """The incidence's transpose [Q, Ub] (waits for its build on first use)."""
        if isinstance(self.transpose, Future):
            self.transpose = self.transpose.result()
        return self.transpose

    def row_chunks(self, max_rows: int) -> list[tuple[int, torch.Tensor]]:
        """Row ranges of the incidence as (first row, CSR [rows, Q]) pieces of at most max_rows rows."""
        n = self.incidence.shape[0]
        if n <= max_rows:
            return [(0, self.incidence)]
        return [(start, self.rows(start, min(start + max_rows, n))) for start in range(0, n, max_rows)]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start .. stop - 1 of the incidence, CSR [stop - start, Q] (views of its indices and values)."""
        crow, col, val = self.incidence.crow_indices(), self.incidence.col_indices(), self.incidence.values()
        lo, hi = int(crow[start]), int(crow[stop])
        return csr_tensor(crow[start:stop + 1] - lo, col[lo:hi], val[lo:hi], (stop - start, self.incidence.shape[1]))


@dataclass
class BlockedTranspose:
    """A 0/1 matrix [Q, U] (an incidence's transpose) as CSR blocks over ranges of its columns: ``blocks`` holds
    (u0, u1, CSR [Q, u1 - u0]) with u0 ascending, and ``self @ X`` = sum over blocks of CSR @ X[u0:u1]."""

    blocks: list[tuple[int, int, torch.Tensor]]
    shape: tuple[int, int]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return self.blocks[0][2] @ x
        out = x.new_zeros(self.shape[0], *x.shape[1:])
        for u0, u1, m in self.blocks:
            if x.dim() == 1:
                out.addmv_(m, x[u0:u1])
            else:
                out.addmm_(m, x[u0:u1])
        return out

    def to_dense(self) -> torch.Tensor:
        return torch.cat([m.to_dense() for _, _, m in self.blocks], dim=1)


class _RowSums(torch.autograd.Function):
    """incidence @ table with the backward pass through the precomputed transpose (CSR both ways)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, incidence: torch.Tensor, incidence_t: BlockedTranspose) -> torch.Tensor:
        ctx.incidence_t = incidence_t
        return incidence @ table

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.incidence_t @ grad.contiguous(), None, None


class _SumLogMarginal(torch.autograd.Function):
    """sum_u logsumexp_g((incidence @ table)_ug + logw_g) with a hand-written backward.

    d/d table = incidence^T @ P and d/d logw = sum_u P_u, with P_ug = softmax_g: the same numbers as
    autograd, without keeping or re-reading the [U, G] intermediates twice.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, logw: torch.Tensor, incidence: torch.Tensor,
                incidence_t: BlockedTranspose) -> torch.Tensor:
        s = incidence @ table
        s += logw
        lse = torch.logsumexp(s, dim=1)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(s.sub_(lse[:, None]).exp_())
            ctx.incidence_t = incidence_t
        return lse.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        (p,) = ctx.saved_tensors
        d_table = (ctx.incidence_t @ p) * grad if ctx.needs_input_grad[0] else None
        d_logw = p.sum(0) * grad if ctx.needs_input_grad[1] else None
        return d_table, d_logw, None, None


def row_sums(incidence: torch.Tensor, table: torch.Tensor, incidence_t: BlockedTranspose | None = None
             ) -> torch.Tensor:
    """sum over each user's patterns of table[pattern]: [U, G] = incidence [U, Q] @ table [Q, G]."""
    if incidence_t is not None and table.requires_grad and torch.is_grad_enabled():
        return _RowSums.apply(table, incidence, incidence_t)
    return incidence @ table


def _index_dtype(*bounds: int) -> type:
    """np.int32 when every bound (a count or a value an index array holds) fits in it, else np.int64. int32 CSR
    indices make sparse products about a third faster."""
    return np.int32 if max(bounds, default=0) < 2**31 - 1 else np.int64


def _csr(row_counts: np.ndarray, cols: np.ndarray, shape: tuple[int, int], ones: torch.Tensor) -> torch.Tensor:
    """CSR of a 0/1 matrix from the entries' columns in row order and the number of entries per row; ``ones``
    (as many as entries, never written) are its values: a matrix and its transpose share them."""
    index = _index_dtype(len(cols), *shape)
    crow = np.zeros(shape[0] + 1, dtype=index)
    np.cumsum(row_counts, out=crow[1:])
    cols = cols.astype(index, copy=False)
    return csr_tensor(torch.as_tensor(crow, device=ones.device), torch.as_tensor(cols, device=ones.device), ones,
                      shape)


def csr_tensor(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR tensor from its parts, unchecked (callers build valid ones), without torch's warnings about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


def run_sum_matrix(crow: torch.Tensor, values: torch.Tensor, index: torch.dtype | None = None) -> torch.Tensor:
    """CSR [n, len(values)] whose row r holds values[crow[r]:crow[r + 1]] in those same columns, so that
    S @ v sums values * v over each row's run of consecutive entries (3-4x faster than index_add_ on the CPU).
    ``index``: the CSR index dtype, by default int32 where the entries fit."""
    nnz = values.shape[0]
    index = index or (torch.int32 if nnz < 2**31 - 1 else torch.int64)
    return csr_tensor(crow.to(index), torch.arange(nnz, dtype=index, device=values.device), values,
                      (crow.shape[0] - 1, nnz))


def _small_sort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of small non-negative integers (radix sort when they fit in 16 bits)."""
    if len(keys) and keys.max() < 1 << 15:
        return np.argsort(keys.astype(np.int16), kind="stable")
    return np.argsort(keys, kind="stable")


def _unique_inverse(key: np.ndarray, index: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(key, return_inverse=True) for non-negative ints, by a dense table when the range is small;
    the inverse in ``index`` (a dtype its values fit)."""
    top = int(key.max()) + 1 if len(key) else 0
    if top > 1 << 26 or top > 8 * len(key) + 1024:
        uniq, inv = np.unique(key, return_inverse=True)
        return uniq, inv.reshape(-1).astype(index, copy=False)
    present = np.bincount(key, minlength=top) > 0
    uniq = np.flatnonzero(present)
    code = (np.cumsum(present) - 1).astype(index)
    return uniq, code.take(key, mode="clip")        # key < top: clip only skips the bounds check


@dataclass
class QuadraturePlan:
    """Everything about the data that the likelihood needs, on one device and dtype.

    On many cells the buckets are built in a background thread (numpy's sorts and gathers release the GIL)
    while a fit starts on what needs no bucket (a warm-start sample); ``buckets`` waits for them on first use,
    ``wait`` before work that needs none for a while but keeps every core busy (em's passes over the cells).
    """

    n_users: int
    n_pairs: int
    kinds: Kinds
    pending: list[Bucket] | Future | Callable[[], list[Bucket]] = field(repr=False)   # the buckets, their build in
    # progress, or (a lazy plan) their build when first asked for
    gold_a: torch.Tensor
    gold_n: torch.Tensor
    device: torch.device
    dtype: torch.dtype

    @property
    def buckets(self) -> list[Bucket]:
        """Users grouped by vote count with their patterns and incidence (waits for their build)."""
        if isinstance(self.pending, Future):
            self.pending = self.pending.result()
        elif callable(self.pending):
            self.pending = self.pending()
        return self.pending

    def wait(self) -> None:
        """Let the buckets' build finish now, before work that keeps every core busy and needs no bucket for a
        while: a third busy thread beside torch's own slows each of their parallel ops."""
        _ = self.buckets

    @contextlib.contextmanager
    def beside_build(self) -> Iterator[None]:
        """Inside, while the buckets are still being built: torch's intra-op threads one fewer (at least one), so
        that the build keeps a core to itself; as before after. For work on small tensors (a warm-start sample),
        whose parallel ops gain little: at 10M votes on 2 cores the plan and fit in process took 0.07 s (marginal)
        and 0.41 s (em) less, and 0.3 and 0.9 s less CPU, than with two threads beside the build (5 alternated
        pairs each)."""
        threads = torch.get_num_threads()
        fewer = isinstance(self.pending, Future) and not self.pending.done() and threads > 1
        if fewer:
            torch.set_num_threads(threads - 1)
        try:
            yield
        finally:
            if fewer:
                torch.set_num_threads(threads)


def build_plan(stats: VoteStats, device: torch.device, dtype: torch.dtype, cap: int = NODE_CAP,
               lazy: bool = False) -> QuadraturePlan:
    """The plan of ``stats``: its kinds and gold counts at once, its buckets (:func:`_buckets`) in a background
    thread from BACKGROUND_CELLS cells on; ``lazy``: the buckets only when first asked for (em's profile Newton
    needs none)."""
    args = (stats, device, dtype, cap)
    k = stats.kinds()
    kinds = Kinds(pair=torch.as_tensor(k["pair"], device=device),
                  pick_a=torch.as_tensor(k["pick_a"].astype(bool), device=device),
                  first=torch.as_tensor(k["first"], device=device),
                  gold=torch.as_tensor(k["gold"], device=device))
    return QuadraturePlan(stats.n_users, stats.n_pairs, kinds,
                          functools.partial(_buckets, *args) if lazy
                          else _background(_buckets, *args) if len(stats.cell_user) >= BACKGROUND_CELLS
                          else _buckets(*args),
                          torch.as_tensor(stats.gold_a, device=device, dtype=dtype),
                          torch.as_tensor(stats.gold_n, device=device, dtype=dtype), torch.device(device), dtype)


def _buckets(stats: VoteStats, device: torch.device, dtype: torch.dtype, cap: int) -> list[Bucket]:
    """Group users by vote count (powers of two) and deduplicate (kind, count) patterns per bucket.

    Linear time apart from radix sorts: cells are grouped by bucket (by user inside a bucket), patterns
    numbered through a dense (kind, count) table, and the incidence built as CSR, its transpose by a
    stable radix sort of the entries by (block of TRANSPOSE_BLOCK users on a CPU, pattern).
    """
    cell_user, cell_kind, cell_count = stats.cell_user, stats.cell_kind, stats.cell_count
    if not stats.cells_by_user:
        by_user = np.argsort(cell_user, kind="stable")
        cell_user, cell_kind, cell_count = cell_user[by_user], cell_kind[by_user], cell_count[by_user]
    nu = stats.user_votes()                            # votes per user (counted once, the summaries report it)
    bucket_of_user = np.where(nu > 0, np.floor(np.log2(np.maximum(nu, 1))).astype(np.int8), np.int8(-1))
    bucket_of_cell = bucket_of_user[cell_user]     # int8: 1 byte a cell
    present = np.unique(bucket_of_user[bucket_of_user >= 0])
    # a bucket's cells: a slice when there is one bucket (views, no copies), a mask per bucket when there are a
    # few (no index array), else one radix sort by bucket (stable: by user inside a bucket)
    order = None if len(present) <= FEW_BUCKETS else _small_sort(bucket_of_cell)
    sizes = np.bincount(bucket_of_cell, minlength=int(present.max()) + 1 if len(present) else 0)
    bounds = np.concatenate([[0], np.cumsum(sizes[present])])
    buckets = []
    # per-cell arrays in int32 where the values fit (the CSR indices are int32 then too): fewer, smaller temporaries
    index = _index_dtype(stats.n_users, len(cell_user))
    local = np.full(stats.n_users, -1, dtype=index)
    top_kind = int(cell_kind.max(initial=0)) + 1
    for j, s, e in zip(present, bounds[:-1], bounds[1:], strict=True):
        users = np.flatnonzero(bucket_of_user == j)
        n_max = int(nu[users].max())                  # the bucket's heaviest user: its nodes
        cells = order[s:e] if order is not None else slice(None) if len(present) == 1 else bucket_of_cell == j
        local[users] = np.arange(len(users), dtype=index)
        count = cell_count[cells]
        width = int(count.max()) + 1
        key = cell_kind[cells].astype(_index_dtype(top_kind * width))
        key *= width                              # kind * width + count, in place
        np.add(key, count, out=key, casting="unsafe")
        del count
        uniq, inv = _unique_inverse(key, index)
        del key
        rows = local.take(cell_user[cells], mode="clip")    # users' rows in the bucket (every cell's user is in it)
        q = len(uniq)
        ones = torch.ones(len(rows), dtype=dtype, device=device)     # the values of the incidence and its transpose
        incidence = _csr(np.bincount(rows, minlength=len(users)), inv, (len(users), q), ones)
        block = TRANSPOSE_BLOCK if torch.device(device).type == "cpu" else max(len(users), 1)
        args = (rows, inv, q, len(users), ones, block)
        buckets.append(Bucket(
            n_nodes=nodes_for(n_max, cap),
            moment_nodes=nodes_for(n_max, cap, moments=2),
            max_votes=n_max,
            users=torch.as_tensor(users, device=device),
            pattern_kind=torch.as_tensor(uniq // width, device=device),
            count=torch.as_tensor(uniq % width, device=device, dtype=dtype),
            incidence=incidence,
            transpose=_background(_transpose, *args) if len(rows) >= BACKGROUND_CELLS else _transpose(*args),
        ))
    return buckets


def _transpose(rows: np.ndarray, cols: np.ndarray, q: int, n_rows: int, ones: torch.Tensor,
               block: int) -> BlockedTranspose:
    """The transpose [q, n_rows] of the 0/1 matrix with entries (rows, cols), rows ascending, in CSR blocks of
    ``block`` rows: one stable radix sort of the entries by (block of the row, column)."""
    n_blocks = max(1, -(-n_rows // block))
    index = _index_dtype(n_rows, n_blocks * q)   # keys and columns: int32 mostly
    if n_blocks == 1:
        key = cols
    else:                                     # (row // block) q + col, formed in place
        key = np.empty(len(rows), dtype=index)
        np.floor_divide(rows, block, out=key, casting="unsafe")
        key *= q
        np.add(key, cols, out=key, casting="unsafe")
    order = _small_sort(key) if n_blocks * q < 1 << 15 else np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=n_blocks * q).reshape(n_blocks, q)
    del key
    local = rows.astype(index)[order]         # the blocks' column indices (views of it)
    del order
    if n_blocks > 1:
        local %= block
    ends = np.cumsum(counts.sum(1))
    out = []
    for i, (e0, e1) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)):
        u0, u1 = i * block, min(n_rows, (i + 1) * block)
        out.append((u0, u1, _csr(counts[i], local[e0:e1], (q, u1 - u0), ones[e0:e1])))
    return BlockedTranspose(out, (q, n_rows))


def _background(fn, *args) -> Future:
    """fn(*args) in a daemon thread of its own (exit never waits for it); its result or error in the Future."""
    done: Future = Future()

    def run() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised by done.result() in the caller
            done.set_exception(e)

    threading.Thread(target=run, name="heedful-plan", daemon=True).start()
    return done


RhoPrior = tuple[torch.Tensor, torch.Tensor] | None   # Beta(a_r, b_r) of a per-user rho_u, or None


def bucket_nodes(a: torch.Tensor, b: torch.Tensor, n_nodes: int, rho_prior: RhoPrior = None,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quadrature nodes (eta_g, rho_g, log w_g) for a bucket.

    Without a per-user rho: Gauss-Jacobi in eta. With rho_u ~ Beta(a_r, b_r): the tensor product of
    the eta and rho rules (L_u is a polynomial of degree <= n_u in each), flattened to one node axis.
    """
    x, logw = gauss_jacobi(a, b, n_nodes)
    if rho_prior is None:
        return x.to(dtype), None, logw.to(dtype)
    xr, lwr = gauss_jacobi(rho_prior[0], rho_prior[1], min(n_nodes, RHO_NODE_CAP))
    g1, g2 = x.shape[0], xr.shape[0]
    return (x.repeat_interleave(g2).to(dtype), xr.repeat(g1).to(dtype),
            (logw[:, None] + lwr[None, :]).reshape(-1).to(dtype))


def pattern_table(plan: QuadraturePlan, bucket: Bucket, eta: torch.Tensor, mu: torch.Tensor,
                  rho: torch.Tensor | None = None) -> torch.Tensor:
    """T_qg = count_q log P(pattern q's pick | eta_g[, rho_g]) for the bucket's patterns and points g: [Q, G].

    ``rho`` is None (coin-flip casual picks), a scalar (one rho for everybody) or a vector [G] of
    per-point values (a per-user rho integrated by quadrature).
    """
    m = plan.kinds.attentive_prob(mu)[bucket.pattern_kind].unsqueeze(1)
    first = plan.kinds.first[bucket.pattern_kind].unsqueeze(1)
    c = casual_prob(first, rho if rho is None or rho.dim() == 0 else rho.unsqueeze(0)).to(eta.dtype)
    return vote_loglik(eta.unsqueeze(0), m, c, bucket.count.unsqueeze(1))


def bucket_loglik_at(plan: QuadraturePlan, bucket: Bucket, eta: torch.Tensor, mu: torch.Tensor,
                     rho: torch.Tensor | None = None, incidence: torch.Tensor | None = None) -> torch.Tensor:
    """log L_u(eta_g[, rho_g]) for every user of the bucket (or of ``incidence``'s rows) and point g: [Ub, G]."""
    table = pattern_table(plan, bucket, eta, mu, rho)
    if incidence is None:
        return row_sums(bucket.incidence, table, bucket.incidence_t)
    return row_sums(incidence, table)


def gold_loglik(plan: QuadraturePlan, mu: torch.Tensor) -> torch.Tensor:
    """sum_p [gold_a log mu_p + (gold_n - gold_a) log(1 - mu_p)]: gold labels observe t directly."""
    return (torch.xlogy(plan.gold_a, mu) + torch.xlogy(plan.gold_n - plan.gold_a, 1.0 - mu)).sum()


def _bucket_log_marginals(plan: QuadraturePlan, a, b, mu, rho, rho_prior: RhoPrior):
    for bk in plan.buckets:
        table, logw = bucket_table(plan, bk, a, b, mu, rho, rho_prior)
        yield bk, torch.logsumexp(row_sums(bk.incidence, table, bk.incidence_t) + logw, dim=1)


def user_log_marginal(plan: QuadraturePlan, a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor,
                      rho: torch.Tensor | None = None, rho_prior: RhoPrior = None) -> torch.Tensor:
    """log m_u for every user, [U]; users with no non-tie votes get 0. Gold's mu-term is not included."""
    out = torch.zeros(plan.n_users, dtype=plan.dtype, device=plan.device)
    for bk, lm in _bucket_log_marginals(plan, a, b, mu, rho, rho_prior):
        out = out.index_put((bk.users,), lm)
    return out


def bucket_table(plan: QuadraturePlan, bucket: Bucket, a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor,
                 rho: torch.Tensor | None = None, rho_prior: RhoPrior = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bucket's pattern table T [Q, G] at its quadrature nodes, and the nodes' log w_g [G].

    A user's log-joint at node g is S_ug = sum_q incidence_uq T_qg + log w_g, and log m_u = logsumexp_g S_ug.
    """
    x, xr, logw = bucket_nodes(a, b, bucket.n_nodes, rho_prior, plan.dtype)
    return pattern_table(plan, bucket, x, mu, rho if xr is None else xr), logw


def log_marginal(plan: QuadraturePlan, a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor,
                 rho: torch.Tensor | None = None, rho_prior: RhoPrior = None) -> torch.Tensor:
    """log p(votes, gold | globals) with every eta_u (and rho_u), z_n and t_n integrated out."""
    total = gold_loglik(plan, mu)
    for bk in plan.buckets:
        table, logw = bucket_table(plan, bk, a, b, mu, rho, rho_prior)
        total = total + _SumLogMarginal.apply(table, logw, bk.incidence, bk.incidence_t)
    return total


def cell_loglik(eta_user: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor | None, plan: QuadraturePlan,
                cells: dict[str, torch.Tensor]) -> torch.Tensor:
    """log P(cell's votes | eta_u) per cell [C], for methods that keep eta_u (EM, SVI, NUTS).

    ``rho``: None, a scalar, or a per-user vector [U] (then each cell takes its user's rho_u).
    """
    kind = cells["cell_kind"]
    m = plan.kinds.attentive_prob(mu)[kind]
    if rho is not None and rho.dim() == 1:
        rho = rho[cells["cell_user"]]
    c = casual_prob(plan.kinds.first[kind], rho).to(eta_user.dtype)
    return vote_loglik(eta_user[cells["cell_user"]], m, c, cells["count"])
