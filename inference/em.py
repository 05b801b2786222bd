"""The EM algorithm of the paper: MAP of every eta_u and of the free mu's, z as the missing data.

Objective (never decreases):  sum_cells [k log q + (n - k) log(1 - q)] + sum_u log Beta(eta_u; a, b)
                              + sum_p log Beta(mu_p; alpha_p, beta_p),    q = c + eta_u (mu_p - c).
E-step, per cell: r_A = eta mu / q, r_B = eta (1 - mu) / (1 - q) (P(attentive | picked A / B)).
M-step:  eta_u = (sum_p [k r_A + (n - k) r_B] + a - 1) / (n_u + a + b - 2)
         mu_p  = (sum_u k r_A + alpha - 1) / (sum_u [k r_A + (n - k) r_B] + alpha + beta - 2).
The population prior (a, b) stays fixed (a, b >= 1 so that the MAP exists).
"""

from __future__ import annotations

import numpy as np
import torch

from heedful.errors import InputError
from heedful.inference.globals import GlobalSpec, initial_mu
from heedful.inference.result import GlobalFit, ProgressFn, covariance, hessian_fd
from heedful.model.likelihood import CASUAL, QuadraturePlan, log_marginal, pattern_loglik
from heedful.suffstats import VoteStats

EM_DEFAULT_PRIOR = (1.0, 1.0)


def em_objective(eta: torch.Tensor, mu: torch.Tensor, a: float, b: float, spec: GlobalSpec,
                 cells: dict[str, torch.Tensor]) -> torch.Tensor:
    ll = pattern_loglik(eta[cells["cell_user"]], mu[cells["cell_pair"]], cells["k"], cells["n"]).sum()
    lp = (torch.xlogy(torch.as_tensor(a - 1.0, dtype=eta.dtype), eta)
          + torch.xlogy(torch.as_tensor(b - 1.0, dtype=eta.dtype), 1 - eta)).sum()
    return ll + lp + spec.log_mu_prior(mu)


def fit_em(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, cells: dict[str, torch.Tensor], *,
           tol: float = 1e-9, max_iter: int = 500, progress: ProgressFn | None = None,
           trace: list[float] | None = None) -> GlobalFit:
    """Run EM to a relative change of the objective below ``tol``; ``trace`` collects every objective value."""
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
    cu, cp, k, n = cells["cell_user"], cells["cell_pair"], cells["k"], cells["n"]
    U, P = stats.n_users, stats.n_pairs
    n_user = torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, n)
    mu = torch.as_tensor(initial_mu(stats, spec), dtype=dt, device=dev)
    eta = torch.full((U,), 0.5, dtype=dt, device=dev)
    free = torch.as_tensor(spec.free_mu, device=dev)
    al = torch.as_tensor(spec.mu_alpha, dtype=dt, device=dev)
    be = torch.as_tensor(spec.mu_beta, dtype=dt, device=dev)
    prior_mode = (a - 1) / (a + b - 2) if a + b > 2 else 0.5
    c = CASUAL
    prev = float(em_objective(eta, mu, a, b, spec, cells))
    if trace is not None:
        trace.append(prev)
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        e, m = eta[cu], mu[cp]
        q = c + e * (m - c)
        r_a = e * m / q
        r_b = e * (1 - m) / (1 - q)
        att_a, att_b = k * r_a, (n - k) * r_b
        s_user = torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, att_a + att_b)
        denom = n_user + a + b - 2
        eta = torch.where(denom > 0, (s_user + a - 1) / denom.clamp_min(1e-300),
                          torch.full_like(s_user, prior_mode)).clamp(0, 1)
        pa = torch.zeros(P, dtype=dt, device=dev).index_add_(0, cp, att_a)
        pb = torch.zeros(P, dtype=dt, device=dev).index_add_(0, cp, att_b)
        mu_new = ((pa + al - 1) / (pa + pb + al + be - 2).clamp_min(1e-300)).clamp(1e-9, 1 - 1e-9)
        mu = torch.where(free, mu_new, mu)
        obj = float(em_objective(eta, mu, a, b, spec, cells))
        if trace is not None:
            trace.append(obj)
        if progress:
            progress(it, obj)
        if abs(obj - prev) <= tol * max(1.0, abs(obj)):
            converged = True
            break
        prev = obj
    if not converged:
        warnings.append(f"EM stopped after {it} iterations without converging (tol {tol:g})")
    # curvature of the marginal likelihood in the free mu's at EM's estimates, (a, b) held fixed
    mu_spec = GlobalSpec(spec.n_pairs, (a, b), spec.mu_known, spec.mu_alpha, spec.mu_beta, spec.mu_source)
    theta = mu_spec.pack(a, b, mu.cpu().numpy(), dt, dev)

    def grad(th: torch.Tensor) -> torch.Tensor:
        th = th.detach().clone().requires_grad_(True)
        _, _, m = mu_spec.unpack(th)
        return torch.autograd.grad(-(log_marginal(plan, *mu_spec.unpack(th)[:2], m) + spec.log_mu_prior(m)), th)[0]

    H = hessian_fd(grad, theta) if theta.numel() else np.zeros((0, 0))
    cov, w = covariance(H, mu_spec.theta_names(stats.pair_labels()))
    warnings += w
    with torch.no_grad():
        ll = float(log_marginal(plan, torch.tensor(a, dtype=dt, device=dev), torch.tensor(b, dtype=dt, device=dev), mu))
    return GlobalFit(a=float(a), b=float(b), mu=mu.cpu().numpy(), theta=theta.cpu().numpy(), cov=cov,
                     objective=obj, log_likelihood=ll, iterations=it, converged=converged, warnings=warnings,
                     eta_map=eta.cpu().numpy(), spec=mu_spec)
