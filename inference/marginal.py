"""Exact-marginal empirical Bayes: eta_u and z integrated out, the globals maximised (L-BFGS, then Newton).

    maximise  sum_u log E_{eta ~ Beta(a, b)}[L_u(eta)] + sum_p log Beta(mu_p; alpha_p, beta_p)

over theta (log a, log b, logit rho, logit mu or strengths): Newton steps with the exact Hessian
(:mod:`heedful.inference.curvature`) from the start until a step predicts a gain below 1e-6 log-units;
where they cannot climb from there (not concave, not finite), scipy's L-BFGS-B with torch autograd
gradients to its relative-change rule first, then Newton again. The covariance of theta is the inverse
of the Hessian of the negative objective at that point.

On many users the climb starts from the maximum for a random sample of them instead
(:func:`heedful.inference.globals.warm_sample`, found the same way but to a looser Newton stop, SAMPLE_GAIN,
so large data descends through a few levels): there the sample's Hessian, scaled by N_votes / n_votes,
stands in for the full one, and BFGS steps on the full data (a gradient each) carry it to where the
exact Newton check passes. The maximum is the same (the same Newton stopping rule decides); only the
path is cheaper. ``iterations`` counts the steps on all the data (L-BFGS iterations, BFGS and Newton
steps), not the samples' own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from heedful.inference.curvature import marginal_derivatives
from heedful.inference.globals import GlobalSpec, initial_mu, warm_sample
from heedful.inference.result import GlobalFit, ProgressFn, covariance, positive_definite
from heedful.inference.ridge import RidgeCoordinates
from heedful.model.likelihood import QuadraturePlan, build_plan, log_marginal
from heedful.suffstats import VoteStats

if TYPE_CHECKING:
    from scipy import optimize

BOUND = 30.0           # |log a|, |log b|, |logit| <= BOUND: L-BFGS-B's box (keeps the quadrature well conditioned)
NEWTON_GAIN = 1e-6     # log-posterior units: Newton steps stop below this predicted gain
NEWTON_STEPS = 8
# L-BFGS stops on a relative change of the per-vote objective (ftol = tol): on 10M votes 1e-9 is 0.01
# log-units per iteration, and there it stopped ~6 log-units short of the maximum, along the weakly
# identified direction (the scale of mu - 1/2 against the eta prior), where the curvature gave 90%
# intervals for mu that missed the truth. Newton steps with the exact Hessian finish the climb in a few
# steps. Should they fail (not concave there, or NEWTON_STEPS used up), L-BFGS goes on with ftol =
# min(tol, STOP_GAIN / n_votes), i.e. until an iteration gains less than STOP_GAIN log-units, and Newton
# runs again. Refits inside a profile likelihood (curvature=False) keep tol: their differences are what counts.
STOP_GAIN = 1e-5
QN_GAIN = 1e-7          # BFGS steps on the full data stop once a step predicts less (the exact check follows)
QN_STEPS = 20
# a BFGS step that predicts less than this is the last: taken without a pass of its own, since the exact
# Newton check that follows evaluates f, its gradient and Hessian there (and steps on if it must). On 10M votes
# the steps predicted 43.7, 1.3e-3, 3.4e-6, 1.7e-7, 2e-12: the last two passes (0.25 s each) are saved
QN_LAST_GAIN = 10 * NEWTON_GAIN
# a warm-start sample's own fit stops its Newton steps this much sooner: its maximum is only a start, some
# K/2 N/n log-units of the full data away from the full maximum (K free globals, n of N users: BFGS's first step on all
# of 10M votes predicted 43.7), so finishing it below 0.1 log-units (0.8 on the full data at n = N/8) moves the start
# by 2% of that. At 10M votes the 15.6k-user sample took 4 Newton steps (5 exact Hessians, 0.2-0.3 s) to 1e-6, 1 to 0.1.
# Its BFGS steps keep QN_GAIN: stopping those sooner cost the full data one more BFGS step (a pass over every user)
SAMPLE_GAIN = 0.1


def objective(plan: QuadraturePlan, spec: GlobalSpec | RidgeCoordinates, theta: torch.Tensor) -> torch.Tensor:
    g = spec.unpack(theta)
    return log_marginal(plan, *g) + spec.log_prior(theta, g)


def fit_marginal(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, *, tol: float = 1e-9,
                 max_iter: int = 500, progress: ProgressFn | None = None,
                 start: tuple[float, float, np.ndarray, float | None] | None = None,
                 curvature: bool = True, warm: bool = True, gain: float = NEWTON_GAIN) -> GlobalFit:
    """Maximise the exact marginal posterior of the globals; ``curvature`` adds the Hessian's covariance;
    ``warm=False`` climbs from the start on all the data even when a sample could start it; Newton stops once a
    step predicts less than ``gain`` (a warm-start sample's fit: SAMPLE_GAIN)."""
    dt, dev = plan.dtype, plan.device
    scale = 1.0 / max(stats.n_votes, 1)
    a0, b0, mu0, rho0 = start if start is not None else (*(spec.eta_fixed or (1.0, 1.0)),
                                                          initial_mu(stats, spec), spec.rho_fixed)
    theta = spec.pack(a0, b0, mu0, rho0, dt, dev)
    warnings: list[str] = []
    iterations, converged, res, H = 0, spec.n_free == 0, None, np.zeros((0, 0))
    f_top = None      # the objective at theta when the last Newton check evaluated it there (None: not known)
    last = {"loss": float("nan")}

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        th = torch.as_tensor(x, dtype=dt, device=dev).requires_grad_(True)
        loss = -objective(plan, spec, th) * scale
        (g,) = torch.autograd.grad(loss, th)
        last["loss"] = float(loss.detach())
        if not torch.isfinite(loss):
            return 1e30, np.zeros_like(x)
        return float(loss.detach()), g.detach().cpu().numpy().astype(np.float64)

    def stepped(f: float) -> None:           # an L-BFGS iteration, a BFGS or Newton step: f after it
        nonlocal iterations
        iterations += 1
        if progress:
            progress(iterations, f)

    def callback(xk: np.ndarray) -> None:
        stepped(-last["loss"] / scale)

    bounds = [(-BOUND, BOUND)] * spec.n_free    # hitting it is reported

    def lbfgs(x0: torch.Tensor, ftol: float) -> tuple[torch.Tensor, optimize.OptimizeResult]:
        from scipy import optimize  # here: a fit that Newton finishes never loads it (0.25 s of imports)

        r = optimize.minimize(fun, x0.cpu().numpy(), jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                              options={"maxiter": max_iter, "gtol": 1e-9, "ftol": ftol})
        return torch.as_tensor(r.x, dtype=dt, device=dev), r

    if spec.n_free:
        with plan.beside_build():
            sample = _warm_start(stats, plan, spec, tol, max_iter) if warm and start is None and curvature else None
        if sample is not None:                # BFGS from the sample's maximum, then the exact Newton check
            theta = _quasi_newton(plan, RidgeCoordinates(spec), *sample, stepped)
            theta, H, f_top, _, converged = _polish(plan, spec, theta, stepped, gain=gain)
        elif curvature:                       # Newton straight from the start, where it climbs there
            theta, H, f_top, converged = _cold_newton(plan, spec, theta, stepped, gain)
        if not converged:                     # (or the sample misled:) L-BFGS from where we are, then Newton
            theta, res = lbfgs(theta, tol)
            f_top = None
            converged = bool(res.success) or res.status == 0
            if curvature:
                theta, H, f_top, _, reached = _polish(plan, spec, theta, stepped, gain=gain)
                if not reached:               # not concave, or out of steps: L-BFGS to the top, Newton again
                    theta, res = lbfgs(theta, min(tol, STOP_GAIN * scale))
                    converged = bool(res.success) or res.status == 0
                    theta, H, f_top, steps, reached = _polish(plan, spec, theta, stepped, gain=gain)
                    if not reached and steps == NEWTON_STEPS:
                        warnings.append(f"the marginal fit took {NEWTON_STEPS} Newton steps after L-BFGS and may "
                                        "still be short of the maximum (a flat, curved ridge in the likelihood); "
                                        "try a smaller [fit] tol")
                converged = converged or reached      # Newton's stopping rule is the stricter one
        if not converged:
            warnings.append(f"the marginal fit stopped after {iterations} iterations without converging "
                            f"({res.message})")
        x = theta.detach().cpu().numpy()
        at_bound = np.isclose(np.abs(x), BOUND)
        if at_bound.any():
            names = spec.theta_names(stats.pair_labels())
            warnings.append("at the edge of the parameter space: " + ", ".join(n for n, b in zip(names, at_bound,
                                                                                              strict=True) if b))
    theta = theta.detach()
    with torch.no_grad():
        g = spec.unpack(theta)
        a, b, mu = g.a, g.b, g.mu
        lp = float(spec.log_prior(theta, g))
        # objective = log_marginal + log-priors: where the Newton check evaluated it at theta, no pass at all
        ll = float(log_marginal(plan, *g)) if f_top is None else f_top - lp
        obj = ll + lp
    cov, w = covariance(H, spec.theta_names(stats.pair_labels()))
    warnings += w
    if float(a) < 0.05 or float(b) < 0.05 or float(a + b) > 1e4:
        warnings.append(f"the fitted eta prior Beta({float(a):.3g}, {float(b):.3g}) is extreme: users may be "
                        "nearly all attentive or all casual, or the prior is poorly identified")
    return GlobalFit(a=float(a), b=float(b), mu=mu.cpu().numpy(), rho=None if g.rho is None else float(g.rho),
                     rho_prior=None if g.rho_prior is None else (float(g.rho_prior[0]), float(g.rho_prior[1])),
                     theta=theta.cpu().numpy(), cov=cov,
                     objective=obj, log_likelihood=ll, iterations=int(iterations), converged=converged,
                     warnings=warnings, spec=spec, hessian=H if H.size else None)


def _cold_newton(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor, on_step: Callable[[float], None],
                 gain: float) -> tuple[torch.Tensor, np.ndarray, float | None, bool]:
    """Newton (:func:`_polish`) from the start: (theta, H, f there, True) when it reaches the stopping rule
    inside |theta| < BOUND (L-BFGS's box), else (the start, no Hessian, None, False) for L-BFGS to climb
    from, as without this try (it costs one exact Hessian then). From (a, b) = (1, 1) a 15.6k-user warm-start
    sample of the 10M-vote benchmark took 2 steps (0.09 s, against 0.18-0.27 s for L-BFGS and Newton after it)."""
    x, H, f, _, reached = _polish(plan, spec, theta, on_step, gain=gain)
    if reached and bool((x.abs() < BOUND).all()):
        return x, H, f, True
    return theta, np.zeros((0, 0)), None, False


def _warm_start(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, tol: float,
                max_iter: int) -> tuple[torch.Tensor, np.ndarray] | None:
    """psi at the maximum for a random sample of users, and -hess f there scaled by N_votes / n_votes
    (the full data's -hess f to O(n^-1/2)); None where the sample would not help."""
    sample = warm_sample(stats, spec) if RidgeCoordinates.applies(spec) else None
    if sample is None:
        return None
    sample_plan = build_plan(sample, plan.device, plan.dtype)
    fit = fit_marginal(sample, sample_plan, spec, tol=tol, max_iter=max_iter,   # itself warm-started if large
                       gain=SAMPLE_GAIN)
    if not fit.converged or fit.hessian is None:
        return None
    coords = RidgeCoordinates(spec)
    psi = torch.as_tensor(coords.from_theta(fit.theta), dtype=plan.dtype, device=plan.device)
    if not bool(torch.isfinite(psi).all()):
        return None
    # the sample fit's Hessian carried into psi (a gradient there, not a second Hessian)
    _, grad = _value_grad(sample_plan, coords, psi)
    A = -coords.psi_hessian(psi, grad, -fit.hessian) * (stats.n_votes / max(sample.n_votes, 1))
    return (psi, A) if positive_definite(np.linalg.eigvalsh(A)) else None


def _quasi_newton(plan: QuadraturePlan, coords: RidgeCoordinates, psi: torch.Tensor, A: np.ndarray,
                  on_step: Callable[[float], None] | None = None) -> torch.Tensor:
    """BFGS steps psi + A^-1 g on the full data, A (~ -hess f) updated from each step's change in gradient,
    while a step predicts a gain above QN_GAIN (at most QN_STEPS; a step is halved until f rises). A step that
    predicts less than QN_LAST_GAIN is taken unevaluated and ends the climb (``on_step`` gets the predicted f):
    the caller's exact Newton check judges that point. Returns theta at the last point reached."""
    f, g = _value_grad(plan, coords, psi)
    for _ in range(QN_STEPS if np.isfinite(f) else 0):
        step = np.linalg.solve(A, g)
        predicted = 0.5 * float(g @ step)
        if predicted <= QN_GAIN:
            break
        step_t = torch.as_tensor(step, dtype=psi.dtype, device=psi.device)
        if predicted <= QN_LAST_GAIN:
            cand = psi + step_t
            if _valid(coords, cand):
                psi = cand
                if on_step:
                    on_step(f + predicted)
            break
        t = 1.0
        for _ in range(8):
            cand = psi + t * step_t
            fn, gn = _value_grad(plan, coords, cand)
            if np.isfinite(fn) and fn >= f:
                break
            t *= 0.5
        else:
            break
        s, y = t * step, g - gn                  # A s ~ -(grad change)
        As, sy = A @ s, float(s @ y)
        if sy > 0:                               # keeps A positive definite
            A = A - np.outer(As, As) / float(s @ As) + np.outer(y, y) / sy
        psi, f, g = cand, fn, gn
        if on_step:
            on_step(f)
    return coords.to_theta(psi).detach()


def _value_grad(plan: QuadraturePlan, spec: GlobalSpec | RidgeCoordinates, x: torch.Tensor) -> tuple[float, np.ndarray]:
    """The objective and its gradient at x; (nan, nan) where x maps to no valid globals."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if not _valid(spec, x):
            return float("nan"), np.full(x.numel(), np.nan)
        f = objective(plan, spec, x)
        (grad,) = torch.autograd.grad(f, x)
    return float(f.detach()), grad.cpu().numpy().astype(np.float64)


def _polish(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor,
            on_step: Callable[[float], None] | None = None, gain: float = NEWTON_GAIN,
            ) -> tuple[torch.Tensor, np.ndarray, float, int, bool]:
    """Newton from theta, in ridge coordinates where they apply; returns theta, the Hessian of -objective
    in theta there, the objective there, steps taken, and whether the predicted gain fell below ``gain``
    (see :func:`_newton`)."""
    coords = RidgeCoordinates(spec) if RidgeCoordinates.applies(spec) else None
    if coords is not None:
        psi = torch.as_tensor(coords.from_theta(theta.cpu().numpy()), dtype=theta.dtype, device=theta.device)
        back = coords.to_theta(psi)
        if not bool(torch.isfinite(back).all()) or float((back - theta).abs().max()) > 1e-8:
            coords = None            # at an extreme (m or mu at 0 or 1 in floating point): stay in theta
    if coords is None:
        x, f, g, hess, steps, reached = _newton(plan, spec, theta, on_step, gain)
        return x, -hess, f, steps, reached
    psi, f, g, hess, steps, reached = _newton(plan, coords, psi, on_step, gain)
    return coords.to_theta(psi).detach(), -coords.theta_hessian(psi, g, hess), f, steps, reached


def _newton(plan: QuadraturePlan, spec: GlobalSpec | RidgeCoordinates, x: torch.Tensor,
            on_step: Callable[[float], None] | None = None, gain: float = NEWTON_GAIN,
            ) -> tuple[torch.Tensor, float, np.ndarray, np.ndarray, int, bool]:
    """Newton steps x + A^-1 g (A = -hess f, exact) while a step predicts a gain g' A^-1 g / 2 above
    ``gain``; a step is halved until f rises. Returns x, f, g and hess f there, steps taken, and True
    when the predicted gain fell below ``gain``, False when f, g or A is not finite, A is not positive
    definite, a step could not raise f, or NEWTON_STEPS ran out.
    """
    f, g, hess = marginal_derivatives(plan, spec, x)
    steps = 0
    while True:
        if not (np.isfinite(f) and np.isfinite(g).all() and np.isfinite(hess).all()):
            return x, f, g, hess, steps, False     # e.g. float32 far from the maximum: no Newton step there
        lam, V = np.linalg.eigh(-hess)
        if not positive_definite(lam):
            return x, f, g, hess, steps, False     # not concave here: covariance() reports it if it stays so
        step = V @ ((V.T @ g) / lam)
        if 0.5 * float(g @ step) <= gain:
            return x, f, g, hess, steps, True
        if steps == NEWTON_STEPS:
            return x, f, g, hess, steps, False
        t = 1.0
        for _ in range(8):
            cand = x + t * torch.as_tensor(step, dtype=x.dtype, device=x.device)
            if np.isfinite(new := _value(plan, spec, cand)) and new >= f:
                break
            t *= 0.5
        else:
            return x, f, g, hess, steps, False
        x, steps = cand, steps + 1
        if on_step:
            on_step(new)                           # the objective after the step
        f, g, hess = marginal_derivatives(plan, spec, x)


def _value(plan: QuadraturePlan, spec: GlobalSpec | RidgeCoordinates, x: torch.Tensor) -> float:
    """The objective at x, or nan where x maps to no valid globals."""
    with torch.no_grad():
        return float(objective(plan, spec, x)) if _valid(spec, x) else float("nan")


def _valid(spec: GlobalSpec | RidgeCoordinates, x: torch.Tensor) -> bool:
    """Whether x maps to finite globals a, b, mu (a step in psi can leave the domain)."""
    g = spec.unpack(x.detach())
    return all(bool(torch.isfinite(t).all()) for t in (g.a, g.b, g.mu))
