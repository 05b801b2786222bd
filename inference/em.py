"""The EM fit of the paper: the joint MAP of every eta_u and of the free mu's (and rho), z as missing data.

Objective (never decreases):  F = sum_cells n log q + sum_u log Beta(eta_u; a, b) + gold term + log-priors,
q = c + eta_u (m - c), with m, c the attentive and casual probabilities of the cell's kind (see
:mod:`heedful.suffstats`). The population prior (a, b) stays fixed (a, b >= 1 so that the MAP exists).

Plain EM (``solver="em"``), one iteration = one E-step and one M-step:
  E-step, per cell: r = eta m / q = P(attentive | the pick).
  M-step:  eta_u = (sum_cells n r + a - 1) / (n_u + a + b - 2)
           mu_p  = (A_p + gold_a + alpha - 1) / (A_p + B_p + gold_n + alpha + beta - 2),
                   A_p, B_p = attentive picks of canonical A / B on votes without a gold label
           rho   = (casual picks of the first-shown answer + a_r - 1) / (casual votes with a known order
                   + a_r + b_r - 2), Beta(a_r, b_r) the prior of rho.
It converges linearly, slowly where eta and mu trade off (hundreds to thousands of iterations).

Profile Newton (``solver="newton"``, the default) reaches the same fixed point: EM's M-step clamps
eta to [0, 1 - 1e-12] and mu, rho to [1e-9, 1 - 1e-9], and its fixed points are the stationary points
of F on that box. With theta = (free mu's, rho) and d = m - c:
  inner, per user: eta_u*(theta) = argmax f_u on [0, 1 - 1e-12],
      f_u(eta) = sum_cells n log q + (a-1) log eta + (b-1) log(1-eta)   (concave),
      by Newton on f_u' = sum n d/q + (a-1)/eta - (b-1)/(1-eta) for all users at once, inside a bracket
      (bisection when a step leaves it or does not halve), on a box end when f_u' points out of the box;
      the first solve starts where f_u' on a grid of START_GRID points changes sign (``_Profile.start_eta``);
  outer: G(theta) = F(eta*(theta), theta). With V_u = d2F / d eta_u d theta, w_u = 1 / -f_u'' (0 on a box
      end) and r_u = w_u f_u' (the Newton step user u has left; r = 0 at eta*):
        dG/dtheta = F_theta + V^T r,   d2G/dtheta2 = F_theta,theta + V^T diag(w) V   (envelope theorem);
      projected Newton on the box (a bound is active where the gradient points out; the eigenvalues of
      -d2G made positive), a backtracking line search that accepts only F_new >= F + 1e-4 dG . step,
      and the next eta solve starts from eta + r + w V step.
One iteration = one eta solve (a few vectorised passes over the cells, to Newton steps below LOOSE_XTOL)
and one accepted theta step; iteration 1 solves for eta at the starting theta only. Converged when the
Newton step in theta predicts a gain below ``tol * max(1, |F|)`` (that step is still taken, with an eta
solve to Newton steps below 1e-11), or a full step gained less (then eta alone is solved to 1e-11, one
more value in the trace), or the predictions fall quadratically: a full step predicting p after a full step
that predicted p' (the same bounds active), with p <= SETTLE_RATIO p' and p^2 / p' <= tol max(1, |F|), is taken
with the exact eta solve and ends the fit when it gains p to within p / 2 (the next step would gain about
p^2 / p'; at 10M votes this saves an iteration: a curvature and an eta solve). Per-user rho_u
(``spec.rho_user``) is fitted by plain EM. On many users (:func:`heedful.inference.globals.warm_sample`)
profile Newton starts at the (mu, rho) it reaches on a random sample of them: the same fixed point in
fewer passes over all the cells.
"""

from __future__ import annotations

import numpy as np
import torch

from heedful.errors import InputError
from heedful.inference.curvature import marginal_derivatives
from heedful.inference.globals import Globals, GlobalSpec, initial_mu, warm_sample
from heedful.inference.result import GlobalFit, ProgressFn, covariance
from heedful.model.likelihood import (
    CASUAL,
    QuadraturePlan,
    build_plan,
    casual_prob,
    csr_tensor,
    gold_loglik,
    log_marginal,
    run_sum_matrix,
    vote_loglik,
)
from heedful.suffstats import VoteStats

EM_DEFAULT_PRIOR = (1.0, 1.0)
SOLVERS = ("auto", "newton", "em")
INNER_PASSES = 100          # at most this many Newton passes per eta solve
LOOSE_XTOL = 1e-5           # Newton step that ends an eta solve before the last one
LINE_SEARCH_STEPS = 30      # halvings of the theta step before giving up
ARMIJO = 1e-4
SETTLE_RATIO = 1e-2         # predicted gains falling this fast (or faster) per full Newton step: quadratic convergence
DENSE_SCHUR_COLS = 256      # V^T W V by dense user chunks up to this many theta's, by a sparse product beyond
SCHUR_CHUNK = 1 << 19       # entries of one dense user block (and of one block of the start's grid)
START_GRID = 16             # points of [0, ub] where f_u' brackets the first eta solve's start


def em_objective(eta: torch.Tensor, g: Globals, spec: GlobalSpec, plan: QuadraturePlan,
                 cells: dict[str, torch.Tensor]) -> torch.Tensor:
    kind = cells["cell_kind"]
    m = plan.kinds.attentive_prob(g.mu)[kind]
    per_user = g.rho is not None and g.rho.dim() == 1
    c = casual_prob(plan.kinds.first[kind], g.rho[cells["cell_user"]] if per_user else g.rho).to(eta.dtype)
    ll = vote_loglik(eta[cells["cell_user"]], m, c, cells["count"]).sum() + gold_loglik(plan, g.mu)
    lp = (torch.xlogy(g.a - 1.0, eta) + torch.xlogy(g.b - 1.0, 1 - eta)).sum()
    if per_user:
        ra, rb = g.rho_prior
        lp = lp + (torch.xlogy(ra - 1.0, g.rho) + torch.xlogy(rb - 1.0, 1 - g.rho)).sum()
    return ll + lp + spec.log_prior(torch.zeros(0, dtype=eta.dtype), g._replace(rho=None) if per_user else g)


Solution = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float, int, bool]   # eta, mu, rho, F, it, conv


def fit_em(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, cells: dict[str, torch.Tensor], *,
           tol: float = 1e-9, max_iter: int = 500, progress: ProgressFn | None = None,
           trace: list[float] | None = None, solver: str = "auto", warm: bool = True) -> GlobalFit:
    """The joint MAP to a relative objective change below ``tol``; ``trace`` collects every objective value.

    ``solver``: ``"newton"`` (profile Newton, see the module docstring; ``"auto"`` picks it unless rho is
    per user) or ``"em"`` (plain EM). ``max_iter`` caps the iterations of either. ``warm=False``: profile
    Newton starts from ``initial_mu`` even on many users (see the module docstring).
    """
    if spec.strengths:
        raise InputError("--method em fits one mu per pair; for [generators] mu = \"strengths\" use --method marginal")
    if solver not in SOLVERS:
        raise InputError(f"em solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
    warnings: list[str] = []
    if spec.eta_fixed is None:
        a, b = EM_DEFAULT_PRIOR
        warnings.append("em keeps the eta prior fixed; the config asks to learn it, so em used Beta(1, 1) "
                        "(use --method marginal to learn a and b)")
    else:
        a, b = spec.eta_fixed
        if a < 1 or b < 1:
            raise InputError(f"--method em needs an eta prior with a, b >= 1 (the MAP of eta is at 0 or 1 "
                             f"otherwise); got Beta({a:g}, {b:g}); use --method marginal")
    dt, dev = plan.dtype, plan.device
    mu = torch.as_tensor(initial_mu(stats, spec), dtype=dt, device=dev)
    rho = None if not spec.position else torch.tensor(spec.rho_fixed or 0.5, dtype=dt, device=dev)
    rho_prior = None
    if spec.rho_user:
        ra, rb = spec.rho_user_fixed or (1.0, 1.0)
        if spec.rho_user_fixed is None:
            warnings.append("em keeps the per-user rho prior fixed; used Beta(1, 1) (--method marginal learns it)")
        if ra < 1 or rb < 1:
            raise InputError(f"--method em needs a per-user rho prior with a, b >= 1; got Beta({ra:g}, {rb:g})")
        rho = torch.full((stats.n_users,), 0.5, dtype=dt, device=dev)
        rho_prior = (torch.tensor(ra, dtype=dt, device=dev), torch.tensor(rb, dtype=dt, device=dev))
    if warm and solver != "em" and not spec.rho_user and (sample := warm_sample(stats, spec)) is not None:
        with plan.beside_build():
            mu, rho = _warm_start(sample, spec, a, b, mu, rho, tol, max_iter, dev, dt)
    plan.wait()     # the plan's buckets build beside the warm start, not beside the passes over all the cells
    if solver == "em" or spec.rho_user:
        eta, mu, rho, obj, it, converged = _plain_em(stats, plan, spec, cells, a, b, mu, rho, rho_prior,
                                                     tol, max_iter, progress, trace)
    else:
        eta, mu, rho, obj, it, converged = _Profile(stats, plan, spec, cells, a, b).run(
            mu, rho, tol, max_iter, progress, trace)
    if not converged:
        warnings.append(f"EM stopped after {it} iterations without converging (tol {tol:g})")
    # curvature of the marginal likelihood in the free mu's (and rho) at EM's estimates, (a, b) held fixed
    if spec.rho_user:   # curvature in mu only; the per-user rho_u stay at their EM values' prior
        mu_spec = GlobalSpec(spec.n_pairs, (a, b), spec.mu_known, spec.mu_alpha, spec.mu_beta, spec.mu_source,
                             position=True, rho_user=True, rho_user_fixed=(float(rho_prior[0]), float(rho_prior[1])))
        rho_f = None
    else:
        mu_spec = GlobalSpec(spec.n_pairs, (a, b), spec.mu_known, spec.mu_alpha, spec.mu_beta, spec.mu_source,
                             position=spec.position, rho_fixed=spec.rho_fixed, rho_prior=spec.rho_prior)
        rho_f = None if rho is None else float(rho)
    theta = mu_spec.pack(a, b, mu.cpu().numpy(), rho_f, dt, dev)

    if theta.numel():   # f = log p(votes, gold | globals) + log-priors: the log-likelihood without a second pass
        f, _, hess = marginal_derivatives(plan, mu_spec, theta)
        H = -hess
        with torch.no_grad():
            ll = f - float(mu_spec.log_prior(theta, mu_spec.unpack(theta)))
    else:
        H = np.zeros((0, 0))
        with torch.no_grad():
            ll = float(log_marginal(plan, *mu_spec.unpack(theta)[:2], mu, None if spec.rho_user else rho,
                                    rho_prior))
    cov, w = covariance(H, mu_spec.theta_names(stats.pair_labels()))
    if w:
        warnings.append("no intervals for mu: EM's joint MAP lies where the marginal likelihood is not concave "
                        "(EM overstates mu when users have few votes); --method marginal gives intervals")
    return GlobalFit(a=float(a), b=float(b), mu=mu.cpu().numpy(), rho=rho_f, theta=theta.cpu().numpy(), cov=cov,
                     objective=obj, log_likelihood=ll, iterations=it, converged=converged, warnings=warnings,
                     eta_map=eta.cpu().numpy(), spec=mu_spec,
                     rho_prior=None if rho_prior is None else (float(rho_prior[0]), float(rho_prior[1])))


def _warm_start(sample: VoteStats, spec: GlobalSpec, a: float, b: float, mu: torch.Tensor,
                rho: torch.Tensor | None, tol: float, max_iter: int, dev: torch.device,
                dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mu, rho) of profile Newton on a random sample of the users (itself warm-started when large): the full
    fit starts there and needs fewer of its iterations, each a pass over every cell."""
    if (inner := warm_sample(sample, spec)) is not None:
        mu, rho = _warm_start(inner, spec, a, b, mu, rho, tol, max_iter, dev, dt)
    plan = build_plan(sample, dev, dt, lazy=True)      # profile Newton uses its kinds and gold counts, no bucket
    _, mu_s, rho_s, _, _, converged = _Profile(sample, plan, spec, sample.tensors(dev, dt), a, b).run(
        mu, rho, tol, max_iter, None, None)
    return (mu_s, rho_s) if converged else (mu, rho)


def _plain_em(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, cells: dict[str, torch.Tensor],
              a: float, b: float, mu: torch.Tensor, rho: torch.Tensor | None,
              rho_prior: tuple[torch.Tensor, torch.Tensor] | None, tol: float, max_iter: int,
              progress: ProgressFn | None, trace: list[float] | None) -> Solution:
    """EM iterations from eta = 1/2 until the relative change of F is below ``tol``."""
    dt, dev = plan.dtype, plan.device
    cu, kind, cnt = cells["cell_user"], cells["cell_kind"], cells["count"]
    kinds = plan.kinds
    first = kinds.first[kind]
    U, P = stats.n_users, stats.n_pairs
    n_user = torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, cnt)
    at, bt = torch.tensor(float(a), dtype=dt, device=dev), torch.tensor(float(b), dtype=dt, device=dev)
    eta = torch.full((U,), 0.5, dtype=dt, device=dev)
    free = torch.as_tensor(spec.free_mu, device=dev)
    al = torch.as_tensor(spec.mu_alpha, dtype=dt, device=dev)
    be = torch.as_tensor(spec.mu_beta, dtype=dt, device=dev)
    prior_mode = (a - 1) / (a + b - 2) if a + b > 2 else 0.5
    known_order = first > 0
    # per-kind sums replace per-cell scatters into pairs: attentive picks of canonical A / all, without gold
    k_ng = (kinds.gold == 0).to(dt)
    k_a = k_ng * kinds.pick_a.to(dt)
    n_kinds = kinds.pair.shape[0]

    def pair_sum(per_kind: torch.Tensor) -> torch.Tensor:
        return torch.zeros(P, dtype=dt, device=dev).index_add_(0, kinds.pair, per_kind)

    # per-cell work buffers, reused every iteration (no fresh pages for ~6 arrays of C doubles per step)
    C = cu.shape[0]
    b_m, b_c, b_e, b_q, b_t = (torch.empty(C, dtype=dt, device=dev) for _ in range(5))

    def objective(eta: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor | None) -> tuple[float, tuple]:
        """em_objective, keeping e = eta[cu], m, c and q = c + e (m - c) for the next E-step (same operations)."""
        torch.index_select(kinds.attentive_prob(mu), 0, kind, out=b_m)
        if spec.rho_user:
            b_c.copy_(casual_prob(first, rho[cu]).to(dt))
        else:
            torch.index_select(casual_prob(kinds.first, rho).to(dt), 0, kind, out=b_c)
        torch.index_select(eta, 0, cu, out=b_e)
        torch.sub(b_m, b_c, out=b_q).mul_(b_e).add_(b_c)
        g = Globals(at, bt, mu, rho, rho_prior)
        lp = (torch.xlogy(g.a - 1.0, eta) + torch.xlogy(g.b - 1.0, 1 - eta)).sum()
        if spec.rho_user:
            lp = lp + (torch.xlogy(rho_prior[0] - 1.0, rho) + torch.xlogy(rho_prior[1] - 1.0, 1 - rho)).sum()
        ll = torch.xlogy(cnt, b_q, out=b_t).sum() + gold_loglik(plan, mu)
        g = g._replace(rho=None) if spec.rho_user else g     # a global rho keeps its Beta prior
        return float(ll + lp + spec.log_prior(torch.zeros(0, dtype=dt), g)), (b_e, b_m, b_c, b_q)

    prev, state = objective(eta, mu, rho)
    if trace is not None:
        trace.append(prev)
    converged, it, obj = False, 0, prev
    for it in range(1, max_iter + 1):
        e, m, c, q = state
        r = torch.mul(e, m, out=b_t).div_(q)
        if spec.learn_rho or spec.rho_user:
            r = r.clone()
            att = cnt * r
        else:
            att = r.mul_(cnt)
        s_user = torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, att)
        denom = n_user + a + b - 2
        eta = torch.where(denom > 0, (s_user + a - 1) / denom.clamp_min(1e-300),
                          torch.full_like(s_user, prior_mode)).clamp(0, 1 - 1e-12)
        att_k = torch.zeros(n_kinds, dtype=dt, device=dev).index_add_(0, kind, att)
        pa, pn = pair_sum(att_k * k_a), pair_sum(att_k * k_ng)
        mu_new = (pa + plan.gold_a + al - 1) / (pn + plan.gold_n + al + be - 2).clamp_min(1e-300)
        mu_new = mu_new.clamp(1e-9, 1 - 1e-9)
        mu = torch.where(free, mu_new, mu)
        if spec.learn_rho:
            cas = cnt * (1 - r) * known_order
            ra, rb = spec.rho_prior
            rho = (((cas * (first == 1)).sum() + ra - 1) / (cas.sum() + ra + rb - 2).clamp_min(1e-300)).clamp(
                1e-9, 1 - 1e-9)
        elif spec.rho_user:
            cas = cnt * (1 - r) * known_order
            num = torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, cas * (first == 1)) + rho_prior[0] - 1
            den = torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, cas) + rho_prior[0] + rho_prior[1] - 2
            rho = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(den, 0.5)).clamp(1e-9, 1 - 1e-9)
        obj, state = objective(eta, mu, rho)
        if trace is not None:
            trace.append(obj)
        if progress:
            progress(it, obj)
        if abs(obj - prev) <= tol * max(1.0, abs(obj)):
            converged = True
            break
        prev = obj
    return eta, mu, rho, obj, it, converged


def _crow(rows: torch.Tensor, n_rows: int, index: torch.dtype) -> torch.Tensor:
    """CSR row pointers of row indices sorted ascending."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(index)


def _run_starts(start: torch.Tensor, index: torch.dtype) -> torch.Tensor:
    """CSR row pointers [E + 1] in ``index`` of the E runs that begin where ``start`` holds (start[0] does): their
    first positions, then len(start). Written straight into ``index`` (10M votes: no [E] int64 concatenation, 51 MB
    of fresh pages fewer); numpy finds the positions on a CPU (2-3x faster than torch.nonzero there)."""
    pos = (torch.from_numpy(np.flatnonzero(start.numpy())) if start.device.type == "cpu"
           else torch.nonzero(start).flatten())
    crow = torch.empty(pos.shape[0] + 1, dtype=index, device=start.device)
    crow[:-1] = pos
    crow[-1] = start.shape[0]
    return crow


def _ascending(cu: torch.Tensor, kind: torch.Tensor) -> bool:
    """Whether the cells are in ascending (user, kind) order (compared pairwise: no keys formed)."""
    if cu.shape[0] < 2:
        return True
    if bool((cu[1:] < cu[:-1]).any()):
        return False
    same = cu[1:] == cu[:-1]
    return not bool(same.logical_and_(kind[1:] < kind[:-1]).any())


def _take(mask: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The elements of every x where mask holds (one nonzero for all)."""
    idx = torch.nonzero(mask).flatten()
    return tuple(x.index_select(0, idx) for x in xs)


class _Profile:
    """Profile Newton for the joint MAP (module docstring) on the cells sorted by (user, kind).

    Sums over cells go through CSR matrices with the counts as values (per user, per (user, free pair)
    entry) and bincount (per kind); the per-cell buffers are reused, and once few users are left, Newton
    passes run over those users' cells only.
    """

    def __init__(self, stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, cells: dict[str, torch.Tensor],
                 a: float, b: float) -> None:
        dt, dev = plan.dtype, plan.device
        self.plan, self.spec, self.a, self.b, self.dt, self.dev = plan, spec, a, b, dt, dev
        kinds = plan.kinds
        U, P, K = stats.n_users, stats.n_pairs, kinds.pair.shape[0]
        cu, kind, cnt = cells["cell_user"], cells["cell_kind"], cells["count"]
        C = cu.shape[0]
        index = torch.int32 if max(C, U * max(P, 1)) < 2**31 - 1 else torch.int64
        self.U, self.P, self.C, self.index = U, P, C, index
        # per-cell users in the index dtype (int32 mostly: a gather of eta by them is a quarter faster than by
        # int64); the kinds as given (int64 from the counts: each pass gathers d by them about 3 ms slower at 10M
        # votes, against 35 MB of fresh pages and a conversion for an int32 copy)
        self.cu, self.kind = cu.to(index), kind
        if not _ascending(self.cu, self.kind):
            order = torch.argsort(cu * K + kind, stable=True)
            self.cu, self.kind, cnt = self.cu[order], self.kind[order], cnt[order]
            del order
        self.cnt = cnt
        eps = torch.finfo(dt).eps
        self.ub = float(torch.tensor(1 - max(1e-12, 2 * eps), dtype=dt))          # EM's eta clamp
        self.th_lo, self.th_hi = max(1e-9, 2 * eps), 1 - max(1e-9, 2 * eps)      # EM's mu, rho clamp
        self.xtol = max(1e-11, 1e3 * eps)
        self.crow = _crow(self.cu, U, torch.int64)
        self.by_user = run_sum_matrix(self.crow, cnt, index)
        # d m / d mu and d c / d rho per kind: +-1, 0 where a gold label fixes m or the order is unknown
        self.s_m = torch.where(kinds.gold == 0, torch.where(kinds.pick_a, 1.0, -1.0), 0.0).to(dt)
        self.s_c = torch.where(kinds.first == 1, 1.0, torch.where(kinds.first == 2, -1.0, 0.0)).to(dt)
        # theta = (free mu's, rho): the columns of V; entries = runs of cells with the same (user, free pair)
        self.free = np.flatnonzero(spec.free_mu)
        nf = len(self.free)
        self.learn_rho = spec.learn_rho
        self.D = D = nf + int(self.learn_rho)
        col_of_pair = torch.full((P,), -1, dtype=index, device=dev)
        col_of_pair[torch.as_tensor(self.free, device=dev, dtype=torch.int64)] = torch.arange(nf, device=dev,
                                                                                             dtype=index)
        pair = kinds.pair.to(index).index_select(0, self.kind)
        fc = None if nf == P else torch.nonzero(col_of_pair.index_select(0, pair) >= 0).flatten()
        cu_f, pair_f = (self.cu, pair) if fc is None else (self.cu.index_select(0, fc), pair.index_select(0, fc))
        start = torch.ones(cu_f.shape[0], dtype=torch.bool, device=dev)   # where a (user, pair) run begins
        torch.ne(cu_f[1:], cu_f[:-1], out=start[1:])
        start[1:] |= pair_f[1:] != pair_f[:-1]
        crow_e = _run_starts(start, index)
        first = crow_e[:-1]                 # each entry's first cell, in the index dtype (it only indexes)
        self.E = E = first.shape[0]
        # the counts as values (the sign d m / d mu goes on the vector): with every pair free, by_user's own
        # columns and values, no new per-cell arrays
        self.by_entry = csr_tensor(crow_e, self.by_user.col_indices() if fc is None else fc.to(index),   # shared
                                   cnt if fc is None else cnt[fc], (E, C))
        del start, pair
        # per entry: its user and column of V, in the index dtype (they index and count, never take part in sums)
        entry_user = cu_f.index_select(0, first)
        self.entry_col = col_of_pair.index_select(0, pair_f.index_select(0, first))
        del cu_f, pair_f, first
        self.crow_ue = _crow(entry_user, U, torch.int64)
        # the entries' users are kept for the sparse Schur product only; the dense blocks and V's rho column form
        # them from crow_ue where needed (10M votes: 26 MB fewer for the fit)
        self.entry_user = entry_user if D > DENSE_SCHUR_COLS else None
        if D > DENSE_SCHUR_COLS:
            t_order = torch.argsort(self.entry_col * U + self.entry_user)   # < P U, within the index dtype
            self.t_order = t_order
            self.t_index = torch.stack([self.entry_col[t_order], self.entry_user[t_order]]).long()
        else:   # blocks of `rows` users, [rows, D] dense, at most SCHUR_CHUNK entries
            rows = max(1, SCHUR_CHUNK // max(D, 1))
            bounds = list(range(0, U, rows)) + [U]
            ce = self.crow_ue[bounds].tolist()
            self.chunks = list(zip(bounds[:-1], bounds[1:], ce[:-1], ce[1:], strict=True))
            self.schur_buf = torch.zeros(min(U, rows) * max(D, 1), dtype=dt, device=dev)
        # q and one scratch per cell (d = m - c is gathered per kind by each pass: one gather more per pass and one
        # fewer per theta); two more scratch buffers only where rho is learned (the curvature's z = (1 - e) / q and
        # products beside x = e / q): 10M votes, 140 MB fewer fresh pages in the common case than four buffers
        self.b_q, self.b_t = (torch.empty(C, dtype=dt, device=dev) for _ in range(2))
        self.b_s, self.b_u = ((torch.empty(C, dtype=dt, device=dev) for _ in range(2)) if self.learn_rho
                              else (None, None))
        # c per cell: one value (CASUAL, a 0-d tensor that broadcasts) where no vote's order is modelled (rho None),
        # else a buffer (10M votes: 67 MB not allocated nor touched in the common case)
        self.b_c = (torch.empty(C, dtype=dt, device=dev) if spec.position
                    else torch.tensor(CASUAL, dtype=dt, device=dev))
        # V's values per entry, written by each curvature (V is used before the next one replaces them)
        self.b_v = torch.empty(E, dtype=dt, device=dev) if D else None
        gold_a, gold_n = plan.gold_a.cpu().double().numpy(), plan.gold_n.cpu().double().numpy()
        self.gold_terms = (gold_a + spec.mu_alpha - 1, gold_n - gold_a + spec.mu_beta - 1)
        self.at, self.bt = torch.tensor(float(a), dtype=dt, device=dev), torch.tensor(float(b), dtype=dt, device=dev)
        self.passes = 0.0   # full passes over the cells, partial ones counted by their share of the cells

    # -- the globals and passes over the cells ------------------------------------------------------------
    def set_globals(self, mu: np.ndarray, rho: float | None) -> None:
        """c and d = m - c per kind (c per cell too where it varies), and the eta-free part of F, at (mu, rho)."""
        kinds, dt, dev = self.plan.kinds, self.dt, self.dev
        mu_t = torch.as_tensor(mu, dtype=dt, device=dev)
        rho_t = None if rho is None else torch.tensor(rho, dtype=dt, device=dev)
        self.c_k = c_k = casual_prob(kinds.first, rho_t).to(dt)
        self.d_k = kinds.attentive_prob(mu_t) - c_k
        if self.b_c.dim():
            torch.index_select(c_k, 0, self.kind, out=self.b_c)
        g = Globals(self.at, self.bt, mu_t, rho_t if self.learn_rho else None)
        self.glob = float(gold_loglik(self.plan, mu_t) + self.spec.log_prior(torch.zeros(0, dtype=dt), g))

    def cell_pass(self, eta: torch.Tensor, users: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per user sum n d/q and sum n (d/q)^2 for all users, or for ``users`` over their cells only;
        b_q keeps q = c + e d (e = eta[cu]) of the cells passed over."""
        b_c, b_q, b_t = self.b_c, self.b_q, self.b_t
        if users is None:
            self.passes += 1
            e = torch.index_select(eta, 0, self.cu, out=b_q)              # e, until q is formed in place
            d = torch.index_select(self.d_k, 0, self.kind, out=b_t)       # d, until r = d / q is
            torch.addcmul(b_c, d, e, out=b_q)
            r = torch.div(d, b_q, out=b_t)
            return self.by_user @ r, self.by_user @ r.square_()
        starts = self.crow[users]
        lens = self.crow[users + 1] - starts
        crow = torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0)])
        n = int(crow[-1])
        self.passes += n / max(self.C, 1)
        idx = torch.arange(n, device=self.dev) + torch.repeat_interleave(starts - crow[:-1], lens, output_size=n)
        e = torch.repeat_interleave(eta[users], lens, output_size=n)
        d = self.d_k[self.kind[idx]]
        q = torch.addcmul(b_c[idx] if b_c.dim() else b_c, d, e)
        r = d.div_(q)
        sub = run_sum_matrix(crow, self.cnt[idx], self.index)
        b_q[idx] = q
        return sub @ r, sub @ r.square_()

    def objective(self, eta: torch.Tensor) -> float:
        """F at eta, with q = c + e d of every cell in b_q."""
        lp = torch.dot(self.cnt, torch.log(self.b_q, out=self.b_t))
        if self.a > 1:
            lp = lp + (self.a - 1) * torch.log(eta).sum()
        if self.b > 1:
            lp = lp + (self.b - 1) * torch.log1p(-eta).sum()
        return float(lp) + self.glob

    def start_eta(self) -> torch.Tensor:
        """A start for the first eta solve, from f_u' on START_GRID points e_g of [0, ub] (one sparse product of
        the (user, kind) counts with the [K, G] table d_k / (c_k + e_g d_k), plus the prior's terms): f_u' falls
        (f_u is concave), so the points where it is positive bracket eta*_u, and the secant on the bracket starts
        it within about 1e-3. Users with f_u' <= 0 at 0 (or >= 0 at ub) start on that end; users with no cell
        and a flat prior at 1/2, as plain EM leaves them. Two passes over the cells then settle most users
        (from eta = 1/2: six, at 10M votes)."""
        dt, dev, ub, U, c_k, d_k = self.dt, self.dev, self.ub, self.U, self.c_k, self.d_k
        e = torch.linspace(0.0, ub, START_GRID, dtype=dt, device=dev)
        table = d_k[:, None] / torch.addcmul(c_k[:, None], d_k[:, None], e[None, :])          # [K, G]
        zero = torch.zeros_like(e)
        prior = self.with_prior(e, zero, zero)[0]                      # the prior's part of f_u'(e_g)
        col = self.kind
        eta = torch.empty(U, dtype=dt, device=dev)
        rows = max(1, SCHUR_CHUNK // START_GRID)
        for u0 in range(0, U, rows):
            u1 = min(U, u0 + rows)
            crow = self.crow[u0:u1 + 1]
            c0, c1 = int(crow[0]), int(crow[-1])
            counts = csr_tensor((crow - c0).to(col.dtype), col[c0:c1], self.cnt[c0:c1], (u1 - u0, table.shape[0]))
            slope = (counts @ table).add_(prior)                                                # f_u'(e_g)
            j = (slope > 0).sum(1)
            left, right = (j - 1).clamp(0, START_GRID - 1), j.clamp(0, START_GRID - 1)
            fl, fr = slope.gather(1, left[:, None]).squeeze(1), slope.gather(1, right[:, None]).squeeze(1)
            el, er = e[left], e[right]
            s = torch.addcmul(el, er - el, fl / (fl - fr))
            s = torch.where(torch.isfinite(s), s, 0.5 * (el + er)).clamp(min=el, max=er)
            eta[u0:u1] = torch.where(j == 0, 0.0, torch.where(j == START_GRID, ub, s))
        if self.a == 1 and self.b == 1:
            eta = torch.where(self.crow[1:] > self.crow[:-1], eta, 0.5)
        return eta

    def solve_eta(self, eta: torch.Tensor, xtol: float) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
        """eta*_u = argmax f_u on [0, ub] for every user at once, warm-started at eta: Newton on f_u' inside a
        bracket [lo, hi], over the users still moving only, until every Newton step is below ``xtol``.
        Returns eta*, F, f_u' and f_u'' at eta*."""
        ub, a, b, U = self.ub, self.a, self.b, self.U
        eta = eta.clone()
        g, h = self.with_prior(eta, *self.cell_pass(eta))
        newton = g / h
        users = torch.nonzero(~self.settled(eta, g, h, newton, xtol)).flatten()
        # per moving user: the eta, f', f'' of the last pass, the bracket, and whether f' is known at its ends
        e, gu, nu = eta[users], g[users], newton[users]
        lo = torch.where(gu > 0, e, 0.0)
        hi = torch.where(gu < 0, e, ub)
        lo_ok, hi_ok = (gu > 0) | (a > 1), (gu < 0) | (b > 1)
        last = torch.full_like(e, float("inf"))   # the previous step's length
        for k in range(INNER_PASSES):
            if users.shape[0] == 0:
                break
            p = e - nu
            # past a bracket end not yet evaluated (a box end): try it; past an evaluated one, or a step not
            # shorter than half the last (far from the root, e.g. next to a pole of f'): bisect
            to_end = ((p < lo) & ~lo_ok) | ((p > hi) & ~hi_ok)
            bisect = ~to_end & ((p < lo) | (p > hi) | (nu.abs() > 0.5 * last))
            p = torch.where(bisect, 0.5 * (lo + hi), torch.minimum(torch.maximum(p, lo), hi))
            last = (p - e).abs()
            move = last > 0     # unsettled users move (settled() decides), unless stuck at float resolution
            if k == INNER_PASSES - 1 or not bool(move.any()):
                break
            if not bool(move.all()):
                users, p, lo, hi, lo_ok, hi_ok, last = _take(move, users, p, lo, hi, lo_ok, hi_ok, last)
            eta[users] = e = p
            if users.shape[0] > U // 32:   # a pass over the users' own cells costs ~20x more per cell
                gu, h2u = (x[users] for x in self.cell_pass(eta))
            else:
                gu, h2u = self.cell_pass(eta, users)
            gu, hu = self.with_prior(e, gu, h2u)
            g[users], h[users] = gu, hu
            nu = gu / hu
            pos, neg = gu > 0, gu < 0
            lo, hi = torch.where(pos, e, lo), torch.where(neg, e, hi)
            lo_ok, hi_ok = lo_ok | pos, hi_ok | neg
            keep = ~self.settled(e, gu, hu, nu, xtol)
            if not bool(keep.all()):
                users, e, nu, lo, hi, lo_ok, hi_ok, last = _take(keep, users, e, nu, lo, hi, lo_ok, hi_ok, last)
        return eta, self.objective(eta), g, h

    def with_prior(self, eta: torch.Tensor, g: torch.Tensor, h2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f' and f'' from the cell sums g = sum n d/q, h2 = sum n (d/q)^2 and the Beta(a, b) prior."""
        h = -h2
        if self.a > 1:
            g, h = g + (self.a - 1) / eta, h - (self.a - 1) / eta.square()
        if self.b > 1:
            g, h = g - (self.b - 1) / (1 - eta), h - (self.b - 1) / (1 - eta).square()
        return g, h

    def settled(self, eta: torch.Tensor, g: torch.Tensor, h: torch.Tensor, newton: torch.Tensor,
                xtol: float) -> torch.Tensor:
        """Users at their maximum: a Newton step and its gain g^2 / -h both below xtol (next to a pole of f' the
        step is short but the gain is not), f' = 0 or flat, or on a box end with f' pointing out."""
        return (((newton.abs() <= xtol) & ((g * newton).abs() <= xtol)) | (g == 0) | ~(h < 0)
                | ((g > 0) & (eta >= self.ub)) | ((g < 0) & (eta <= 0)))

    # -- the outer problem in theta -----------------------------------------------------------------------
    def curvature(self, eta: torch.Tensor, g: torch.Tensor, h: torch.Tensor, mu: np.ndarray, rho: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
        """dG/dtheta and d2G/dtheta2 (numpy); w_u = 1 / -f_u'', V [U, D] sparse CSR and r = w f' (the Newton
        step each user has left) for eta*(theta + dx) ~ eta + r + w V dx.

        eta may be off eta* by r: dG/dtheta = F_theta + V^T r then holds to second order in r."""
        b_q, b_t, b_s, b_u = self.b_q, self.b_t, self.b_s, self.b_u
        D, F, nf, U = self.D, self.free, len(self.free), self.U
        dev, kinds, s_m, s_c = self.dev, self.plan.kinds, self.s_m, self.s_c
        n_kinds = kinds.pair.shape[0]
        free = torch.as_tensor(F, device=dev)

        def per_kind(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            """sum n x over the cells of each kind; n x goes to ``out`` (x itself when None)."""
            return torch.bincount(self.kind, weights=torch.mul(x, self.cnt, out=x if out is None else out),
                                  minlength=n_kinds)

        def per_pair(x_kind: torch.Tensor) -> np.ndarray:   # ... over the kinds of each free pair
            out = torch.zeros(self.P, dtype=self.dt, device=dev).index_add_(0, kinds.pair, x_kind)
            return out[free].cpu().double().numpy()

        def ratio(out: torch.Tensor, e_out: torch.Tensor | None = None) -> torch.Tensor:
            """x = e / q = d log q / d m into ``out``, e = eta[cu] kept in ``e_out`` (formed in ``out`` when None)."""
            return torch.div(torch.index_select(eta, 0, self.cu, out=out if e_out is None else e_out), b_q, out=out)

        # eta is the point of the last pass over every cell (b_q holds its q)
        grad, H = np.zeros(D), np.zeros((D, D))
        vr = None
        if self.learn_rho:
            ratio(b_t, b_u)
            grad[:nf] = per_pair(per_kind(b_t, b_s) * s_m)
            b_u.neg_().add_(1).div_(b_q)                              # z = (1 - e) / q = d log q / d c
            grad[-1] = float((per_kind(b_u, b_s) * s_c).sum())
            H[:-1, -1] = H[-1, :-1] = -per_pair(per_kind(torch.mul(b_t, b_u, out=b_s)) * s_m * s_c)
            H[-1, -1] = -float((per_kind(b_u.square_()) * s_c.square()).sum())
            torch.index_select(self.c_k + self.d_k, 0, self.kind, out=b_u).div_(b_q).div_(b_q)   # m / q^2
            vr = -(self.by_user @ b_u.mul_(torch.index_select(s_c, 0, self.kind, out=b_s)))
            x = b_t
        else:   # one scratch buffer: x formed again for its square
            grad[:nf] = per_pair(per_kind(ratio(b_t)) * s_m)
            x = ratio(b_t)
        H[range(nf), range(nf)] = -per_pair(per_kind(x.square_()) * s_m.square())
        # V's entries: sum n (d m / d mu) c / q^2 per (user, free pair); the sign (+-1 or 0) goes first, exactly
        sc = torch.index_select(s_m, 0, self.kind, out=b_t).mul_(self.b_c).div_(b_q).div_(b_q)
        ve = torch.mv(self.by_entry, sc, out=self.b_v)
        ga, gb = self.gold_terms
        mf = mu[F]
        grad[:nf] += ga[F] / mf - gb[F] / (1 - mf)
        H[range(nf), range(nf)] -= ga[F] / mf**2 + gb[F] / (1 - mf) ** 2
        if self.learn_rho and rho is not None:      # the Beta(ra, rb) prior of a learned rho
            ra, rb = self.spec.rho_prior
            grad[-1] += (ra - 1) / rho - (rb - 1) / (1 - rho)
            H[-1, -1] -= (ra - 1) / rho**2 + (rb - 1) / (1 - rho) ** 2
        interior = (h < 0) & ~((eta <= 0) & (g <= 0)) & ~((eta >= self.ub) & (g >= 0))
        w = torch.where(interior, 1 / -h, torch.zeros_like(h))
        r = w * g
        hit = ((eta + r) <= 0) | ((eta + r) >= self.ub)    # the step left ends on the box: eta* held there
        r = torch.where(hit, (eta + r).clamp(0, self.ub) - eta, r)
        w = torch.where(hit, 0.0, w)
        if vr is not None:   # V with the rho column: entries per (user, pair) and one per user
            rows = torch.cat([self.entry_users(), torch.arange(U, device=dev, dtype=self.index)])
            order = torch.argsort(rows, stable=True)
            col = torch.cat([self.entry_col, torch.full((U,), D - 1, device=dev, dtype=self.index)])[order]
            V = csr_tensor(_crow(rows[order], U, self.index), col, torch.cat([ve, vr])[order], (U, D))
        else:
            V = csr_tensor(self.crow_ue.to(self.index), self.entry_col, ve, (U, D))
        S, corr = self.schur(w, r, ve, vr)
        return grad + corr, H + S, w, V, r

    def schur(self, w: torch.Tensor, r: torch.Tensor, ve: torch.Tensor, vr: torch.Tensor | None
              ) -> tuple[np.ndarray, np.ndarray]:
        """S = V^T diag(w) V and V^T r: dense over user blocks, or a sparse product when theta is long."""
        D, nf, dt, dev = self.D, len(self.free), self.dt, self.dev
        S = torch.zeros(D, D, dtype=dt, device=dev)
        corr = torch.zeros(D, dtype=dt, device=dev)
        if D > DENSE_SCHUR_COLS:
            corr[:nf] = torch.zeros(D, dtype=dt, device=dev).index_add_(0, self.entry_col, ve * r[self.entry_user])[:nf]
            if vr is not None:
                corr[-1] = vr @ r
            sw = w.sqrt()
            ve = ve * sw[self.entry_user]
            vr = None if vr is None else vr * sw
            vt = ve[self.t_order]
            left = torch.sparse_coo_tensor(self.t_index, vt, (D, self.U), is_coalesced=True, check_invariants=False)
            right = torch.sparse_coo_tensor(self.t_index.flip(0), vt, (self.U, D), check_invariants=False).coalesce()
            S[:nf, :nf] = torch.sparse.mm(left, right).to_dense()[:nf, :nf]
            if vr is not None:
                S[:nf, -1] = torch.zeros(D, dtype=dt, device=dev).index_add_(
                    0, self.entry_col, ve * vr[self.entry_user])[:nf]
                S[-1, :nf] = S[:nf, -1]
                S[-1, -1] = vr @ vr
            return S.cpu().double().numpy(), corr.cpu().double().numpy()
        buf = self.schur_buf
        for u0, u1, e0, e1 in self.chunks:
            block = buf[:(u1 - u0) * D].zero_()
            block[(self.entry_users(u0, u1) - u0).mul_(D).add_(self.entry_col[e0:e1])] = ve[e0:e1]   # entries in it
            block = block.view(u1 - u0, D)
            if vr is not None:
                block[:, -1] = vr[u0:u1]
            S.addmm_(block.T, block * w[u0:u1, None])
            corr.addmv_(block.T, r[u0:u1])
        return S.cpu().double().numpy(), corr.cpu().double().numpy()

    def entry_users(self, u0: int = 0, u1: int | None = None) -> torch.Tensor:
        """The user of every (user, free pair) entry of users u0 .. u1 - 1 (all by default), in the index dtype."""
        u1 = self.U if u1 is None else u1
        e0, e1 = int(self.crow_ue[u0]), int(self.crow_ue[u1])
        if self.entry_user is not None:
            return self.entry_user[e0:e1]
        return torch.repeat_interleave(torch.arange(u0, u1, dtype=self.index, device=self.dev),
                                       self.crow_ue[u0 + 1:u1 + 1] - self.crow_ue[u0:u1], output_size=e1 - e0)

    def predict(self, eta: torch.Tensor, w: torch.Tensor, V: torch.Tensor, r: torch.Tensor, step: np.ndarray
                ) -> torch.Tensor:
        """eta + r + w V step (see curvature) where that stays inside (0, ub); eta elsewhere."""
        p = torch.addcmul(eta + r, w, V @ torch.as_tensor(step, dtype=self.dt, device=self.dev))
        return torch.where((p > 0) & (p < self.ub), p, eta)

    def run(self, mu0: torch.Tensor, rho0: torch.Tensor | None, tol: float, max_iter: int,
            progress: ProgressFn | None, trace: list[float] | None) -> Solution:
        """Profile Newton from (mu0, rho0) and eta from ``start_eta``; eta solves to LOOSE_XTOL on the way, to
        xtol at the end."""
        F, nf, D = self.free, len(self.free), self.D
        mu = mu0.cpu().double().numpy().copy()
        rho = None if rho0 is None else float(rho0)
        x = np.concatenate([mu[F], [rho] if self.learn_rho else []])
        lb, ubx = self.th_lo, self.th_hi
        loose = max(self.xtol, LOOSE_XTOL)

        def put(x: np.ndarray) -> tuple[np.ndarray, float | None]:
            m = mu.copy()
            m[F] = x[:nf]
            return m, (float(x[-1]) if self.learn_rho else rho)

        def record(obj: float) -> None:
            if trace is not None:
                trace.append(obj)
            if progress:
                progress(it, obj)

        self.set_globals(mu, rho)
        eta = self.start_eta()
        if trace is not None:   # F at the start only for the trace: the eta solve's first pass starts over
            self.cell_pass(eta)
            trace.append(self.objective(eta))
        it, converged = 1, D == 0
        eta, obj, g, h = self.solve_eta(eta, self.xtol if converged else loose)
        record(obj)
        polished, last_step = converged, None
        prev = None     # (predicted gain, active bounds) of the last full, unmodified Newton step
        while not converged and it < max_iter:
            grad, Hs, w, V, r = self.curvature(eta, g, h, *put(x))
            scale = tol * max(1.0, abs(obj))
            out = ((x <= lb) & (grad < 0)) | ((x >= ubx) & (grad > 0))
            step = np.zeros(D)
            inner = ~out
            modified = False
            if inner.any():
                lam, Q = np.linalg.eigh(-Hs[np.ix_(inner, inner)])
                floor = 1e-10 * max(np.abs(lam).max(), 1e-300)
                modified = bool(lam.min() <= floor)
                lam = np.maximum(np.abs(lam), floor)
                step[inner] = Q @ ((Q.T @ grad[inner]) / lam)
            predicted = 0.5 * float(grad @ step)
            if not np.isfinite(predicted) or predicted <= scale:
                converged = bool(np.isfinite(predicted))
                if converged and it < max_iter:   # take this step too, with the exact eta solve below
                    last_step = (np.clip(x + step, lb, ubx), w, V, r)
                break
            # quadratic convergence: the step after this one would gain about predicted^2 / prev, below tol
            settling = (prev is not None and not modified and np.array_equal(out, prev[1])
                        and predicted <= SETTLE_RATIO * prev[0] and predicted * predicted <= scale * prev[0]
                        and np.array_equal(np.clip(x + step, lb, ubx), x + step))
            t, accepted = 1.0, False
            for _ in range(LINE_SEARCH_STEPS):
                xt = np.clip(x + t * step, lb, ubx)
                dx = xt - x
                self.set_globals(*put(xt))
                res = self.solve_eta(self.predict(eta, w, V, r, dx), self.xtol if settling and t == 1.0 else loose)
                if res[1] >= obj + ARMIJO * float(grad @ dx) and res[1] >= obj:
                    accepted = True
                    break
                t *= 0.5
            if not accepted:    # no rise above rounding along an ascent direction: stationary to precision
                converged = predicted <= max(tol, 1e3 * torch.finfo(self.dt).eps) * max(1.0, abs(obj))
                self.set_globals(*put(x))
                break
            gain = res[1] - obj
            x, (eta, obj, g, h) = xt, res
            it += 1
            record(obj)
            if t == 1.0 and not modified and not out.any() and gain <= scale:
                converged = True
            elif settling and t == 1.0 and abs(gain - predicted) <= 0.5 * predicted:   # the model held: done
                converged = polished = True
            prev = (predicted, out) if t == 1.0 and not modified else None
        if last_step is not None:   # the last Newton step: its gain is below tol but it costs one eta solve
            xt, w, V, r = last_step
            self.set_globals(*put(xt))
            res = self.solve_eta(self.predict(eta, w, V, r, xt - x), self.xtol)
            if res[1] >= obj:
                x, (eta, obj, g, h), polished = xt, res, True
                it += 1
                record(obj)
            else:
                self.set_globals(*put(x))
        if not polished:   # eta* to full precision at the final theta, from eta + r
            w = torch.where(h < 0, 1 / -h, torch.zeros_like(h))
            eta, polished_obj, g, h = self.solve_eta(torch.where(h < 0, (eta + w * g).clamp(0, self.ub), eta),
                                                     self.xtol)
            if polished_obj >= obj:
                obj = polished_obj
                record(obj)
        mu, rho = put(x)
        mu_t = torch.as_tensor(mu, dtype=self.dt, device=self.dev)
        rho_t = None if rho is None else torch.tensor(rho, dtype=self.dt, device=self.dev)
        return eta, mu_t, rho_t, obj, it, converged
