"""Each user's posterior over eta given the fitted globals (a, b, mu): mean, mode, interval, tail mass.

p(eta | y_u) is proportional to L_u(eta) Beta(eta; a, b). The mean is exact (Gauss-Jacobi, as in the
marginal likelihood). Quantiles and P(eta > tau) come from the CDF on a grid in x = logit(eta),
where the density L_u(sigmoid x) sigmoid(x)^a sigmoid(-x)^b is smooth; the mass beyond |x| = 20 is
added in closed form (there L_u is flat and the density is e^(a x) / B(a, b) to relative 1e-9).
The mode (``eta_hat``) is the grid maximum of the density in eta, refined by golden-section search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sstats

from heedful.model.likelihood import RHO_NODE_CAP, QuadraturePlan, bucket_loglik_at, bucket_nodes, casual_prob
from heedful.model.quadrature import gauss_jacobi

X_EDGE = 20.0
MAX_ELEMENTS = 500_000     # grid cells per chunk (4 MB: cache-sized): bounds memory whatever the number of users
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


def _cdf(d: torch.Tensor, h: torch.Tensor, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised CDF and density on the grid from unnormalised densities d [rows, M] in x.

    Cumulative trapezoid with the Euler-Maclaurin end correction -h^2/12 (d'(x_j) - d'(x_0)) (error
    O(h^4)), plus the closed-form tails d_0 / a and d_M / b beyond the grid.
    """
    cum = torch.cat([torch.zeros_like(d[:, :1]), torch.cumsum(0.5 * (d[:, 1:] + d[:, :-1]) * h, 1)], 1)
    slope = torch.gradient(d, spacing=float(h), dim=1)[0]
    cum = torch.cummax(cum - h * h / 12.0 * (slope - slope[:, :1]), dim=1).values
    tail_lo, tail_hi = d[:, 0] / a, d[:, -1] / b
    total = tail_lo + cum[:, -1] + tail_hi
    return (tail_lo[:, None] + cum) / total[:, None], d / total[:, None]


def _cdf_between(cdf: torch.Tensor, dens: torch.Tensor, j: torch.Tensor, s: torch.Tensor, h: torch.Tensor):
    """F(x_(j-1) + s h) with the density linear on the interval: F_(j-1) + h (s d0 + s^2 (d1 - d0) / 2)."""
    c0 = cdf.gather(1, (j - 1)[:, None]).squeeze(1)
    d0, d1 = dens.gather(1, (j - 1)[:, None]).squeeze(1), dens.gather(1, j[:, None]).squeeze(1)
    return c0 + h * (s * d0 + 0.5 * s * s * (d1 - d0))


def _quantile(cdf: torch.Tensor, dens: torch.Tensor, x: torch.Tensor, p: float, a: float, b: float) -> torch.Tensor:
    """x-quantile of each row's CDF given on grid x; in the tails, invert F ~ C e^(a x) (or 1 - F ~ C e^(-b x))."""
    j = torch.searchsorted(cdf, torch.full((cdf.shape[0], 1), p, dtype=cdf.dtype, device=cdf.device)).squeeze(1)
    inside = (j > 0) & (j < cdf.shape[1])
    jj = j.clamp(1, cdf.shape[1] - 1)
    h = x[1] - x[0]
    c0 = cdf.gather(1, (jj - 1)[:, None]).squeeze(1)
    d0, d1 = dens.gather(1, (jj - 1)[:, None]).squeeze(1), dens.gather(1, jj[:, None]).squeeze(1)
    # solve c0 + h (s d0 + s^2 (d1 - d0) / 2) = p for s in [0, 1] (the stable root)
    r = (p - c0).clamp_min(0)
    disc = (h * d0) ** 2 + 2 * h * (d1 - d0) * r
    frac = (2 * r / (h * d0 + disc.clamp_min(0).sqrt()).clamp_min(1e-300)).clamp(0, 1)
    xq = x[jj - 1] + frac * h
    low_tail = x[0] + torch.log(torch.as_tensor(p, dtype=cdf.dtype) / cdf[:, 0].clamp_min(1e-300)) / a
    high_tail = x[-1] - torch.log(torch.as_tensor(1 - p, dtype=cdf.dtype) / (1 - cdf[:, -1]).clamp_min(1e-300)) / b
    return torch.where(inside, xq, torch.where(j == 0, low_tail, high_tail))


@torch.no_grad()
def user_posterior(plan: QuadraturePlan, cells: dict[str, torch.Tensor], a: float, b: float,
                   mu: torch.Tensor, rho: float | None = None, *, level: float = 0.90,
                   tau: float | None = None, rho_prior: tuple[float, float] | None = None) -> UserPosterior:
    """Posterior summaries of eta_u for every user under Beta(a, b), mu and rho (no gradients).

    With a per-user rho_u ~ Beta(rho_prior), rho_u is integrated out by Gauss-Jacobi at every grid point.
    """
    dt, dev = torch.float64, plan.device
    mu = mu.to(dt)
    rho_t = None if rho is None else torch.tensor(float(rho), dtype=dt, device=dev)
    U = plan.n_users
    pa, pb = float(a), float(b)
    prior = sstats.beta(pa, pb)
    alpha = (1.0 - level) / 2.0
    mean = np.full(U, prior.mean())
    sd = np.full(U, prior.std())
    lo, hi = np.full(U, prior.ppf(alpha)), np.full(U, prior.ppf(1 - alpha))
    mode_x = np.full(U, np.nan)
    bracket = np.zeros((U, 2))
    p_above = np.full(U, prior.sf(tau)) if tau is not None else None
    at, bt = torch.tensor(pa, dtype=dt, device=dev), torch.tensor(pb, dtype=dt, device=dev)
    rp = None if rho_prior is None else tuple(torch.tensor(float(v), dtype=dt, device=dev) for v in rho_prior)
    for bk in plan.buckets:
        xq, rq, logw = bucket_nodes(at, bt, bk.n_nodes, rp, dt)   # exact for E[eta], E[eta^2]: degree n + 2
        M = _grid_size(2 * bk.n_nodes)
        x = torch.linspace(-X_EDGE, X_EDGE, M, dtype=dt, device=dev)
        h = x[1] - x[0]
        log_eta, log_1m = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
        if rp is None:
            grid_eta, grid_rho, grid_lw, n_rho = torch.sigmoid(x), rho_t, None, 1
        else:
            xr, grid_lw = gauss_jacobi(rp[0], rp[1], min(bk.n_nodes, RHO_NODE_CAP))
            n_rho = xr.shape[0]
            grid_eta, grid_rho = torch.sigmoid(x).repeat_interleave(n_rho), xr.repeat(M)
        rows = max(1, MAX_ELEMENTS // (M * n_rho))
        for start, inc in bk.row_chunks(rows):
            inc = inc.to(dt)
            users = bk.users[start:start + inc.shape[0]].cpu().numpy()
            lq = bucket_loglik_at(plan, bk, xq, mu, rho_t if rq is None else rq, inc) + logw
            wq = torch.softmax(lq, dim=1)
            m1 = (wq * xq).sum(1)
            m2 = (wq * xq * xq).sum(1)
            mean[users] = m1.cpu().numpy()
            sd[users] = (m2 - m1 * m1).clamp_min(0).sqrt().cpu().numpy()
            ell = bucket_loglik_at(plan, bk, grid_eta, mu, grid_rho, inc)
            if grid_lw is not None:   # integrate rho_u out at every eta of the grid
                ell = torch.logsumexp(ell.reshape(-1, M, n_rho) + grid_lw, dim=2)
            ell = ell + pa * log_eta + pb * log_1m
            top = ell.max(dim=1, keepdim=True).values
            cdf, dens = _cdf(torch.exp(ell - top), h, pa, pb)
            lo[users] = torch.sigmoid(_quantile(cdf, dens, x, alpha, pa, pb)).cpu().numpy()
            hi[users] = torch.sigmoid(_quantile(cdf, dens, x, 1 - alpha, pa, pb)).cpu().numpy()
            if tau is not None:
                xt = math.log(tau / (1 - tau))
                j = int(torch.searchsorted(x, torch.tensor(xt, dtype=dt, device=dev)).clamp(1, M - 1))
                jv = torch.full((cdf.shape[0],), j, device=dev)
                f_tau = _cdf_between(cdf, dens, jv, (xt - x[j - 1]) / h, h)
                p_above[users] = (1 - f_tau).clamp(0, 1).cpu().numpy()
            g = ell - log_eta - log_1m                                            # log density in eta
            j = g.argmax(dim=1)
            mode_x[users] = x[j].cpu().numpy()
            bracket[users, 0] = x[(j - 1).clamp_min(0)].cpu().numpy()
            bracket[users, 1] = x[(j + 1).clamp_max(M - 1)].cpu().numpy()
    if rp is None:
        mode = _refine_modes(plan, cells, pa, pb, mu, rho_t, mode_x, bracket, dt)
    else:   # per-user rho: the mode of the rho-marginal density, to the grid's resolution
        mode = np.where(np.isnan(mode_x), ((pa - 1) / (pa + pb - 2)) if (pa > 1 and pb > 1) else 0.0,
                        1 / (1 + np.exp(-np.nan_to_num(mode_x))))
        mode = np.where(mode_x <= -X_EDGE + 1e-9, 0.0, np.where(mode_x >= X_EDGE - 1e-9, 1.0, mode))
    return UserPosterior(mean=mean, mode=mode, lo=np.minimum(lo, mean), hi=np.maximum(hi, mean), sd=sd,
                         prob_above=p_above)


def _refine_modes(plan: QuadraturePlan, cells: dict[str, torch.Tensor], a: float, b: float, mu: torch.Tensor,
                  rho: torch.Tensor | None, mode_x: np.ndarray, bracket: np.ndarray, dt: torch.dtype,
                  iters: int = 30) -> np.ndarray:
    """Safeguarded Newton on d/d eta [log L_u(eta) + (a-1) log eta + (b-1) log(1-eta)] inside the grid bracket.

    A mode at the grid's edge is taken as 0 or 1 (the density is largest at the boundary there).
    """
    U = plan.n_users
    prior_mode = ((a - 1) / (a + b - 2)) if (a > 1 and b > 1) else (0.0 if a <= b else 1.0)
    mode = np.full(U, prior_mode)
    has = ~np.isnan(mode_x)
    edge_lo, edge_hi = mode_x <= -X_EDGE + 1e-9, mode_x >= X_EDGE - 1e-9
    interior = has & ~edge_lo & ~edge_hi
    mode[has & edge_lo] = 0.0
    mode[has & edge_hi] = 1.0
    if not interior.any():
        return mode
    dev = mu.device
    cu, kind = cells["cell_user"], cells["cell_kind"]
    cnt = cells["count"].to(dt)
    m = plan.kinds.attentive_prob(mu)[kind]
    c = casual_prob(plan.kinds.first[kind], rho).to(dt)
    d = m - c
    lo = torch.sigmoid(torch.as_tensor(bracket[:, 0], dtype=dt, device=dev))
    hi = torch.sigmoid(torch.as_tensor(bracket[:, 1], dtype=dt, device=dev))
    eta = torch.sigmoid(torch.as_tensor(np.nan_to_num(mode_x), dtype=dt, device=dev))
    inside = torch.as_tensor(interior, device=dev)
    for _ in range(iters):
        t = d / (c + eta[cu] * d)              # d log(c + eta d) / d eta per vote
        gc = cnt * t
        g = torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, gc) + (a - 1) / eta - (b - 1) / (1 - eta)
        h = -torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, gc * t) \
            - (a - 1) / eta ** 2 - (b - 1) / (1 - eta) ** 2
        lo = torch.where(g > 0, eta, lo)       # the derivative's sign keeps the root bracketed
        hi = torch.where(g > 0, hi, eta)
        step = eta - g / h
        ok = (h < 0) & (step >= lo) & (step <= hi)   # closed: the root may sit on a bracket end
        new = torch.where(ok, step, 0.5 * (lo + hi))
        moved = float(torch.where(inside, (new - eta).abs(), torch.zeros_like(eta)).max())
        eta = new
        if moved <= STOP_STEP:                 # converged (or bracketed) to far below 1e-9 for every user
            break
    mode[interior] = eta.cpu().numpy()[interior]
    return mode
