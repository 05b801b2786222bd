"""Exact-marginal empirical Bayes: eta_u and z integrated out, the globals maximised (L-BFGS).

    maximise  sum_u log E_{eta ~ Beta(a, b)}[L_u(eta)] + sum_p log Beta(mu_p; alpha_p, beta_p)

over theta (log a, log b, logit rho, logit mu or strengths) with torch autograd gradients and
scipy's L-BFGS-B, then Newton steps with the Hessian (forward differences of the exact gradient)
until the predicted gain is below 1e-6; the covariance of theta is the inverse of that Hessian of
the negative objective at the optimum.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import optimize

from heedful.inference.globals import GlobalSpec, initial_mu
from heedful.inference.result import GlobalFit, ProgressFn, covariance, hessian_fd
from heedful.model.likelihood import QuadraturePlan, log_marginal
from heedful.suffstats import VoteStats

NEWTON_GAIN = 1e-6     # log-posterior units: Newton polishing stops below this predicted gain
NEWTON_STEPS = 8
# L-BFGS (on the per-vote objective, |f| < 1) stops when an iteration changes it by less than ftol, i.e. the
# log-posterior by less than ftol * n_votes. With ftol = tol (1e-9) that was 0.01 log-units on 10M votes, and
# it stopped ~6 log-units short of the maximum: along the weakly identified direction (the scale of mu - 1/2
# against the eta prior) each iteration gains little, and the curvature there gave 90% intervals for mu that
# missed the truth. So ftol = min(tol, STOP_GAIN / n_votes): at most STOP_GAIN log-units per iteration
# (1e-12 at 10M votes: 89 iterations); small data keep tol. Refits inside a profile likelihood
# (curvature=False) keep tol: their differences are what counts.
STOP_GAIN = 1e-5


def objective(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor) -> torch.Tensor:
    g = spec.unpack(theta)
    return log_marginal(plan, *g) + spec.log_prior(theta, g)


def fit_marginal(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, *, tol: float = 1e-9,
                 max_iter: int = 500, progress: ProgressFn | None = None,
                 start: tuple[float, float, np.ndarray, float | None] | None = None,
                 curvature: bool = True) -> GlobalFit:
    """Maximise the exact marginal posterior of the globals; ``curvature`` adds the Hessian's covariance."""
    dt, dev = plan.dtype, plan.device
    scale = 1.0 / max(stats.n_votes, 1)
    a0, b0, mu0, rho0 = start if start is not None else (*(spec.eta_fixed or (1.0, 1.0)),
                                                          initial_mu(stats, spec), spec.rho_fixed)
    theta0 = spec.pack(a0, b0, mu0, rho0, dt, dev)
    warnings: list[str] = []
    iterations, converged = 0, spec.n_free == 0
    theta = theta0
    if spec.n_free:
        last = {"loss": float("nan")}

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            th = torch.as_tensor(x, dtype=dt, device=dev).requires_grad_(True)
            loss = -objective(plan, spec, th) * scale
            (g,) = torch.autograd.grad(loss, th)
            last["loss"] = float(loss.detach())
            if not torch.isfinite(loss):
                return 1e30, np.zeros_like(x)
            return float(loss.detach()), g.detach().cpu().numpy().astype(np.float64)

        def callback(xk: np.ndarray) -> None:
            nonlocal iterations
            iterations += 1
            if progress:
                progress(iterations, -last["loss"] / scale)

        # |log a|, |log b|, |logit| <= 30: keeps the quadrature well conditioned; hitting it is reported
        bounds = [(-30.0, 30.0)] * spec.n_free
        ftol = min(tol, STOP_GAIN * scale) if curvature else tol
        res = optimize.minimize(fun, theta0.cpu().numpy(), jac=True, method="L-BFGS-B", bounds=bounds,
                                callback=callback, options={"maxiter": max_iter, "gtol": 1e-9, "ftol": ftol})
        iterations = int(res.nit)
        converged = bool(res.success) or res.status == 0
        theta = torch.as_tensor(res.x, dtype=dt, device=dev)
        if not converged:
            warnings.append(f"the marginal fit stopped after {iterations} L-BFGS iterations without converging "
                            f"({res.message})")
        at_bound = np.isclose(np.abs(res.x), 30.0)
        if at_bound.any():
            names = spec.theta_names(stats.pair_labels())
            warnings.append("at the edge of the parameter space: " + ", ".join(n for n, b in zip(names, at_bound,
                                                                                              strict=True) if b))
    theta = theta.detach()

    def grad(th: torch.Tensor) -> torch.Tensor:
        th = th.detach().clone().requires_grad_(True)
        return torch.autograd.grad(-objective(plan, spec, th), th)[0]

    H = np.zeros((0, 0))
    if spec.n_free and curvature:
        theta, H, steps = _newton_polish(plan, spec, theta, grad)
        iterations += steps
        if steps == NEWTON_STEPS:
            warnings.append(f"the marginal fit took {NEWTON_STEPS} Newton steps after L-BFGS and may still be short "
                            "of the maximum (a flat, curved ridge in the likelihood); try a smaller [fit] tol")
    with torch.no_grad():
        g = spec.unpack(theta)
        a, b, mu = g.a, g.b, g.mu
        obj = float(objective(plan, spec, theta))
        ll = float(log_marginal(plan, *g))
    cov, w = covariance(H, spec.theta_names(stats.pair_labels()))
    warnings += w
    if float(a) < 0.05 or float(b) < 0.05 or float(a + b) > 1e4:
        warnings.append(f"the fitted eta prior Beta({float(a):.3g}, {float(b):.3g}) is extreme: users may be "
                        "nearly all attentive or all casual, or the prior is poorly identified")
    return GlobalFit(a=float(a), b=float(b), mu=mu.cpu().numpy(), rho=None if g.rho is None else float(g.rho),
                     rho_prior=None if g.rho_prior is None else (float(g.rho_prior[0]), float(g.rho_prior[1])),
                     theta=theta.cpu().numpy(), cov=cov,
                     objective=obj, log_likelihood=ll, iterations=int(iterations), converged=converged,
                     warnings=warnings, spec=spec)


def _newton_polish(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor,
                   grad: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, np.ndarray, int]:
    """Newton steps theta - H^-1 g from L-BFGS's end point, H the Hessian of -objective (forward differences),
    until the step predicts a gain g' H^-1 g / 2 below NEWTON_GAIN; returns theta, H at theta, steps taken.

    L-BFGS stops on a relative change of the objective; along a weakly identified direction (the scale of
    the mu's against the eta prior) that can be several log-units short of the maximum, so the curvature
    (and the intervals) would belong to the wrong point. A step is kept only if the objective rises.
    """
    with torch.no_grad():
        obj = float(objective(plan, spec, theta))
    steps = 0
    for k in range(NEWTON_STEPS + 1):
        g0 = grad(theta)
        H = hessian_fd(grad, theta, 1e-6, central=False, g0=g0)
        if k == NEWTON_STEPS:
            break
        lam, V = np.linalg.eigh(H)
        if not np.all(np.isfinite(lam)) or lam.min() <= 1e-10 * max(1.0, abs(lam).max()):
            break                                   # not concave here: covariance() reports it
        gn = g0.detach().cpu().numpy()
        step = -(V @ ((V.T @ gn) / lam))
        if 0.5 * float(gn @ -step) <= NEWTON_GAIN:
            break
        t, moved = 1.0, False
        for _ in range(8):
            cand = torch.as_tensor(np.clip(theta.cpu().numpy() + t * step, -30.0, 30.0), dtype=theta.dtype,
                                   device=theta.device)
            with torch.no_grad():
                new = float(objective(plan, spec, cand))
            if np.isfinite(new) and new >= obj:
                theta, obj, moved = cand, new, True
                break
            t *= 0.5
        if not moved:
            break
        steps += 1
    return theta, H, steps
