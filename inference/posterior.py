"""Each user's posterior over eta given the fitted globals (a, b, mu): mean, mode, interval, tail mass.

p(eta | y_u) is proportional to L_u(eta) Beta(eta; a, b). The mean is exact (Gauss-Jacobi, as in the
marginal likelihood). Quantiles and P(eta > tau) come from the CDF on a grid in x = logit(eta),
where the density L_u(sigmoid x) sigmoid(x)^a sigmoid(-x)^b is smooth; the mass beyond |x| = 20 is
added in closed form (there L_u is flat and the density is e^(a x) / B(a, b) to relative 1e-9).
The mode (``eta_hat``) is the grid maximum of the density in eta, refined by safeguarded Newton.

Cost: per chunk of users one sparse product, one max, one exp and one cumulative sum over the
[users, M] grid; everything else reads a few grid cells per user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sstats

from heedful.model.likelihood import (
    RHO_NODE_CAP,
    Bucket,
    QuadraturePlan,
    bucket_nodes,
    casual_prob,
    vote_loglik,
)
from heedful.model.quadrature import gauss_jacobi

X_EDGE = 20.0
MAX_ELEMENTS = 500_000     # grid cells per chunk (4 MB: cache-sized): bounds memory whatever the number of users
NEWTON_ROWS = 1 << 16      # users per block of the mode refinement
STOP_STEP = 1e-14          # mode refinement stops once no user's eta moves more than this


@dataclass
class UserPosterior:
    """Per-user summaries, numpy arrays of length U."""

    mean: np.ndarray
    mode: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    sd: np.ndarray
    prob_above: np.ndarray | None = None   # P(eta_u > tau) when a tau was given


def _grid_size(n_max: int) -> int:
    return int(np.clip(100.0 * math.sqrt(n_max + 1.0), 400, 4000))



def _table(plan: QuadraturePlan, bk: Bucket, eta: torch.Tensor, mu: torch.Tensor,
           rho: torch.Tensor | None) -> torch.Tensor:
    """count_q log(c_q + eta_g (m_q - c_q)) for the bucket's patterns q and points g, [Q, G] (once per bucket)."""
    m = plan.kinds.attentive_prob(mu)[bk.pattern_kind].unsqueeze(1)
    first = plan.kinds.first[bk.pattern_kind].unsqueeze(1)
    c = casual_prob(first, rho if rho is None or rho.dim() == 0 else rho.unsqueeze(0)).to(eta.dtype)
    return vote_loglik(eta.unsqueeze(0), m, c, bk.count.unsqueeze(1))


def _grid_summaries(d: torch.Tensor, cum: torch.Tensor, x: torch.Tensor, h: float, a: float, b: float,
                    ps: torch.Tensor, tau_at: tuple[int, float] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x-quantiles [R, P] at probabilities ps and F(x_tau) [R] from densities d [R, M] on the grid x of step h.

    With S = cum (sum_(i<=j) d_i, the only full pass) and the slope d'_j by central differences (one-sided
    at the ends), the trapezoid with the Euler-Maclaurin end correction (error O(h^4)) is

        C_j = h (S_j - (d_0 + d_j) / 2) - h^2 / 12 (d'_j - d'_0),

    the tails beyond the grid are d_0 / a and d_(M-1) / b, and F_j = (d_0 / a + C_j) / Z with
    Z = d_0 / a + C_(M-1) + d_(M-1) / b. The first j with C_j >= t = p Z - d_0 / a is within a cell or two
    of the first j with S_j >= t / h + d_0 / 2 - h d'_0 / 12 (C_j - h S_j is -h d_j / 2 up to the slope
    term): search S, then compare C on the cells around. Inside [x_(j-1), x_j] the density is taken as
    linear, F = F_(j-1) + h (s d_(j-1) + s^2 (d_j - d_(j-1)) / 2) / Z; below x_0 (above x_(M-1)) F ~ C e^(a x)
    (1 - F ~ C e^(-b x)) is inverted. ``tau_at`` = (j, s) puts x_tau at x_(j-1) + s h.
    """
    R, M = d.shape
    P = ps.shape[0]
    d0, slope0 = d[:, :1], (d[:, 1:2] - d[:, :1]) / h
    tail_lo = d0 / a
    c_last = h * (cum[:, -1:] - 0.5 * (d0 + d[:, -1:])) - h * h / 12.0 * ((d[:, -1:] - d[:, -2:-1]) / h - slope0)
    total = tail_lo + c_last + d[:, -1:] / b                                    # [R, 1]
    t = ps * total - tail_lo                                                     # [R, P]
    k = torch.searchsorted(cum, t / h + (0.5 * d0 - h / 12.0 * slope0))
    win = (k[:, :, None] + torch.arange(-3, 4, device=d.device)).view(R, 7 * P)  # cells k-3 .. k+3
    idx = win if tau_at is None else torch.cat([win, torch.full_like(win[:, :1], tau_at[0] - 1)], 1)
    idx = idx.clamp(0, M - 1)
    n = idx.shape[1]
    nb = torch.cat([idx, (idx + 1).clamp_max(M - 1), (idx - 1).clamp_min(0)], 1)
    dn = d.gather(1, nb)
    slope = (dn[:, n:2 * n] - dn[:, 2 * n:]) / ((nb[:, n:2 * n] - nb[:, 2 * n:]).to(d.dtype) * h)
    cw = h * (cum.gather(1, idx) - 0.5 * (d0 + dn[:, :n])) - h * h / 12.0 * (slope - slope0)
    cq = cw[:, :7 * P].view(R, P, 7)
    win = win.view(R, P, 7)
    hit = ((cq >= t[:, :, None]) & (win >= 0)) | (win >= M)
    pos = (~hit[:, :, 1:]).to(torch.int8).cumprod(2).sum(2)                     # first hit in k-2 .. k+3 (6: none)
    j = k - 2 + pos
    c_prev = cq.gather(2, pos[:, :, None]).squeeze(2)                            # C_(j-1)
    jj = j.clamp(1, M - 1)
    pair = torch.cat([jj - 1, jj], 1)
    if tau_at is not None:
        pair = torch.cat([pair, torch.full_like(pair[:, :2], tau_at[0]) - torch.tensor([1, 0], device=d.device)], 1)
    dd = d.gather(1, pair) / total
    d0q, d1q = dd[:, :P], dd[:, P:2 * P]
    r = (ps - (tail_lo + c_prev) / total).clamp_min(0)
    disc = (h * d0q) ** 2 + 2 * h * (d1q - d0q) * r                            # the stable root of the quadratic in s
    frac = (2 * r / (h * d0q + disc.clamp_min(0).sqrt()).clamp_min(1e-300)).clamp(0, 1)
    xq = x[jj - 1] + frac * h
    low_tail = x[0] + torch.log(ps / (tail_lo / total).clamp_min(1e-300)) / a
    high_tail = x[-1] - torch.log((1 - ps) / (1 - (tail_lo + c_last) / total).clamp_min(1e-300)) / b
    xq = torch.where((j > 0) & (j < M), xq, torch.where(j <= 0, low_tail, high_tail))
    if tau_at is None:
        return xq, None
    s = tau_at[1]
    f0, f1 = dd[:, 2 * P], dd[:, 2 * P + 1]
    f_tau = (tail_lo[:, 0] + cw[:, -1]) / total[:, 0] + h * (s * f0 + 0.5 * s * s * (f1 - f0))
    return xq, f_tau


@torch.no_grad()
def user_posterior(plan: QuadraturePlan, cells: dict[str, torch.Tensor], a: float, b: float,
                   mu: torch.Tensor, rho: float | None = None, *, level: float = 0.90,
                   tau: float | None = None, rho_prior: tuple[float, float] | None = None) -> UserPosterior:
    """Posterior summaries of eta_u for every user under Beta(a, b), mu and rho (no gradients).

    With a per-user rho_u ~ Beta(rho_prior), rho_u is integrated out by Gauss-Jacobi at every grid point.
    ``cells`` is unused (each bucket's incidence holds the users' cells); it stays for the callers.
    """
    dt, dev = torch.float64, plan.device
    mu = mu.to(dt)
    rho_t = None if rho is None else torch.tensor(float(rho), dtype=dt, device=dev)
    U = plan.n_users
    pa, pb = float(a), float(b)
    prior = sstats.beta(pa, pb)
    alpha = (1.0 - level) / 2.0
    ps = torch.tensor([alpha, 1 - alpha], dtype=dt, device=dev)

    def full(v: float) -> torch.Tensor:
        return torch.full((U,), float(v), dtype=dt, device=dev)

    mean, sd, lo, hi = full(prior.mean()), full(prior.std()), full(prior.ppf(alpha)), full(prior.ppf(1 - alpha))
    p_above = full(prior.sf(tau)) if tau is not None else None
    if rho_prior is None:
        mode = full(((pa - 1) / (pa + pb - 2)) if (pa > 1 and pb > 1) else (0.0 if pa <= pb else 1.0))
    else:
        mode = full(((pa - 1) / (pa + pb - 2)) if (pa > 1 and pb > 1) else 0.0)
    at, bt = torch.tensor(pa, dtype=dt, device=dev), torch.tensor(pb, dtype=dt, device=dev)
    rp = None if rho_prior is None else tuple(torch.tensor(float(v), dtype=dt, device=dev) for v in rho_prior)
    for bk in plan.buckets:
        xq, rq, logw = bucket_nodes(at, bt, bk.n_nodes, rp, dt)   # exact for E[eta], E[eta^2]: degree n + 2
        tab_q = _table(plan, bk, xq, mu, rho_t if rq is None else rq)
        M = _grid_size(2 * bk.n_nodes)
        x = torch.linspace(-X_EDGE, X_EDGE, M, dtype=dt, device=dev)
        h = 2 * X_EDGE / (M - 1)
        log_eta, log_1m = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
        prior_eta = (pa - 1) * log_eta + (pb - 1) * log_1m      # log density in eta, up to a constant
        jacobian = log_eta + log_1m                              # log d eta / d x
        if rp is None:
            tab, grid_lw, n_rho = _table(plan, bk, torch.sigmoid(x), mu, rho_t), None, 1
        else:
            xr, grid_lw = gauss_jacobi(rp[0], rp[1], min(bk.n_nodes, RHO_NODE_CAP))
            n_rho = xr.shape[0]
            tab = _table(plan, bk, torch.sigmoid(x).repeat_interleave(n_rho), mu, xr.repeat(M))
        if tau is not None:
            xt = math.log(tau / (1 - tau))
            j_tau = int(torch.searchsorted(x, torch.tensor(xt, dtype=dt, device=dev)).clamp(1, M - 1))
            tau_at = (j_tau, (xt - float(x[j_tau - 1])) / h)
        else:
            tau_at = None
        jmax = torch.empty(len(bk.users), dtype=torch.long, device=dev)
        for start, inc in bk.row_chunks(max(1, MAX_ELEMENTS // (M * n_rho))):
            inc = inc.to(dt)
            R = inc.shape[0]
            users = bk.users[start:start + R]
            wq = torch.softmax(inc @ tab_q + logw, dim=1)
            m1, m2 = wq @ xq, wq @ (xq * xq)
            mean[users], sd[users] = m1, (m2 - m1 * m1).clamp_min(0).sqrt()
            g = inc @ tab                                            # log L_u on the grid
            if grid_lw is not None:                                  # integrate rho_u out at every eta of the grid
                g = torch.logsumexp(g.view(R, M, n_rho) + grid_lw, dim=2)
            g += prior_eta
            top, jmax[start:start + R] = g.max(dim=1)
            d = g.add_(jacobian).sub_(top[:, None]).exp_()           # density in x, max in [e^-20.7, 1/4]
            xs, f_tau = _grid_summaries(d, torch.cumsum(d, 1), x, h, pa, pb, ps, tau_at)
            eta_q = torch.sigmoid(xs)
            lo[users], hi[users] = eta_q[:, 0], eta_q[:, 1]
            if f_tau is not None:
                p_above[users] = (1 - f_tau).clamp(0, 1)
        mode[bk.users] = torch.where(jmax == 0, 0.0, torch.where(jmax == M - 1, 1.0, torch.sigmoid(x[jmax])))
        if rp is None:
            _refine_modes(plan, bk, pa, pb, mu, rho_t, x, jmax, mode)
    return UserPosterior(mean=mean.cpu().numpy(), mode=mode.cpu().numpy(), lo=torch.minimum(lo, mean).cpu().numpy(),
                         hi=torch.maximum(hi, mean).cpu().numpy(), sd=sd.cpu().numpy(),
                         prob_above=None if p_above is None else p_above.cpu().numpy())


def _refine_modes(plan: QuadraturePlan, bk: Bucket, a: float, b: float, mu: torch.Tensor, rho: torch.Tensor | None,
                  x: torch.Tensor, jmax: torch.Tensor, mode: torch.Tensor, iters: int = 30) -> None:
    """Safeguarded Newton on d/d eta [log L_u(eta) + (a-1) log eta + (b-1) log(1-eta)] inside the grid bracket.

    Starts at sigmoid(x_j) of the grid maximum j, bracketed by sigmoid(x_(j-1)), sigmoid(x_(j+1)); each user
    stops once its own step is at most STOP_STEP. A maximum at the grid's edge stays 0 or 1 (set by the caller).
    Writes ``mode`` for the bucket's interior users, in blocks of NEWTON_ROWS users.
    """
    dt, dev, M = x.dtype, x.device, x.shape[0]
    m = plan.kinds.attentive_prob(mu)[bk.pattern_kind]
    c_q = casual_prob(plan.kinds.first[bk.pattern_kind], rho).to(dt)
    d_q, cnt_q = m - c_q, bk.count.to(dt)
    crow, col = bk.incidence.crow_indices(), bk.incidence.col_indices()
    for s in range(0, len(bk.users), NEWTON_ROWS):
        e = min(s + NEWTON_ROWS, len(bk.users))
        j = jmax[s:e]
        active = (j > 0) & (j < M - 1)
        if not bool(active.any()):
            continue
        lo = torch.sigmoid(x[(j - 1).clamp_min(0)])
        hi = torch.sigmoid(x[(j + 1).clamp_max(M - 1)])
        eta = torch.sigmoid(x[j])
        cr = crow[s:e + 1].long()
        q = col[cr[0]:cr[-1]].long()
        row = torch.repeat_interleave(torch.arange(e - s, device=dev), cr.diff(), output_size=q.shape[0])
        c, d, cnt = c_q[q], d_q[q], cnt_q[q]
        t, gc = torch.empty_like(c), torch.empty_like(c)
        for _ in range(iters):
            torch.index_select(eta, 0, row, out=gc)
            torch.div(d, torch.addcmul(c, gc, d, out=t), out=t)   # d log(c + eta d) / d eta per cell
            torch.mul(cnt, t, out=gc)
            g = torch.zeros_like(eta).index_add_(0, row, gc) + (a - 1) / eta - (b - 1) / (1 - eta)
            h = -torch.zeros_like(eta).index_add_(0, row, gc.mul_(t)) - (a - 1) / eta ** 2 - (b - 1) / (1 - eta) ** 2
            lo = torch.where(g > 0, eta, lo)           # the derivative's sign keeps the root bracketed
            hi = torch.where(g > 0, hi, eta)
            step = eta - g / h
            ok = (h < 0) & (step >= lo) & (step <= hi)  # closed: the root may sit on a bracket end
            new = torch.where(active, torch.where(ok, step, 0.5 * (lo + hi)), eta)
            active &= (new - eta).abs() > STOP_STEP     # each user stops once its own step is below STOP_STEP
            eta = new
            if not bool(active.any()):
                break
        interior = (j > 0) & (j < M - 1)
        mode[bk.users[s:e][interior]] = eta[interior]
