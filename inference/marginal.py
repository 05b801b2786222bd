"""Exact-marginal empirical Bayes: eta_u and z integrated out, the globals maximised (L-BFGS).

    maximise  sum_u log E_{eta ~ Beta(a, b)}[L_u(eta)] + sum_p log Beta(mu_p; alpha_p, beta_p)

over theta = (log a, log b, logit mu_free) with torch autograd; the covariance of theta is the inverse
Hessian of the negative objective at the optimum (central differences of the exact gradient).
"""

from __future__ import annotations

import numpy as np
import torch

from heedful.inference.globals import GlobalSpec, initial_mu
from heedful.inference.result import GlobalFit, ProgressFn, covariance, hessian_fd
from heedful.model.likelihood import QuadraturePlan, log_marginal
from heedful.suffstats import VoteStats


def objective(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor) -> torch.Tensor:
    a, b, mu = spec.unpack(theta)
    return log_marginal(plan, a, b, mu) + spec.log_mu_prior(mu)


def fit_marginal(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, *, tol: float = 1e-9,
                 max_iter: int = 500, progress: ProgressFn | None = None,
                 start: tuple[float, float, np.ndarray] | None = None) -> GlobalFit:
    dt, dev = plan.dtype, plan.device
    scale = 1.0 / max(stats.n_votes, 1)
    a0, b0, mu0 = start if start is not None else (*(spec.eta_fixed or (1.0, 1.0)), initial_mu(stats, spec))
    theta = spec.pack(a0, b0, mu0, dt, dev).requires_grad_(True)
    warnings: list[str] = []
    iterations, converged, prev = 0, spec.n_free == 0, None
    if spec.n_free:
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = -objective(plan, spec, theta) * scale
            loss.backward()
            return loss

        while iterations < max_iter:
            loss = float(opt.step(closure).detach())
            iterations = int(opt.state[theta]["n_iter"])
            if progress:
                progress(iterations, -loss / scale)
            if prev is not None and abs(prev - loss) <= tol * max(1.0, abs(loss)):
                converged = True
                break
            prev = loss
        if not converged:
            warnings.append(f"the marginal fit stopped after {iterations} L-BFGS iterations without converging")
    theta = theta.detach()
    with torch.no_grad():
        a, b, mu = spec.unpack(theta)
        obj = float(objective(plan, spec, theta))
        ll = float(log_marginal(plan, a, b, mu))

    def grad(th: torch.Tensor) -> torch.Tensor:
        th = th.detach().clone().requires_grad_(True)
        return torch.autograd.grad(-objective(plan, spec, th), th)[0]

    H = hessian_fd(grad, theta) if spec.n_free else np.zeros((0, 0))
    cov, w = covariance(H, spec.theta_names(stats.pair_labels()))
    warnings += w
    if float(a) < 0.05 or float(b) < 0.05 or float(a + b) > 1e4:
        warnings.append(f"the fitted eta prior Beta({float(a):.3g}, {float(b):.3g}) is extreme: users may be "
                        "nearly all attentive or all casual, or the prior is poorly identified")
    return GlobalFit(a=float(a), b=float(b), mu=mu.cpu().numpy(), theta=theta.cpu().numpy(), cov=cov,
                     objective=obj, log_likelihood=ll, iterations=int(iterations), converged=converged,
                     warnings=warnings, spec=spec)
