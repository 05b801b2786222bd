"""What a fit of the globals returns, and their intervals from the curvature of the objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import special

from heedful.inference.globals import GlobalSpec

ProgressFn = Callable[[int, float], None]


@dataclass
class GlobalFit:
    """Point estimates of the globals, the covariance of theta, and how the optimiser ended."""

    a: float
    b: float
    mu: np.ndarray
    rho: float | None
    theta: np.ndarray
    cov: np.ndarray | None          # covariance of theta (inverse Hessian of -objective)
    objective: float                # the maximised objective (log-likelihood + log-priors)
    log_likelihood: float           # the exact marginal log-likelihood at the estimates
    iterations: int
    converged: bool
    warnings: list[str] = field(default_factory=list)
    eta_map: np.ndarray | None = None   # EM's per-user MAP of eta
    spec: GlobalSpec | None = None      # which parameters theta holds
    rho_prior: tuple[float, float] | None = None   # Beta(a_r, b_r) of per-user rho_u
    profiles: dict[int, dict] = field(default_factory=dict)   # pair index -> profile likelihood of its mu
    hessian: np.ndarray | None = None   # Hessian of -objective in theta at the fit, where the fit computed it


def hessian_fd(grad_fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, step: float = 1e-5,
               central: bool = True, g0: torch.Tensor | None = None) -> np.ndarray:
    """Symmetrised finite differences of an exact gradient: H_ij = d g_i / d theta_j.

    ``central``: (g(theta + h e_j) - g(theta - h e_j)) / 2h, error O(h^2), 2n gradients; else forward
    differences (g(theta + h e_j) - g(theta)) / h, error O(h), n + 1 gradients (use h ~ 1e-6: about 1e-6
    relative in H, far below what an interval needs); ``g0``: the gradient at theta when already known.
    """
    n = theta.numel()
    H = np.zeros((n, n))
    g0 = None if central else (grad_fn(theta) if g0 is None else g0)
    for j in range(n):
        e = torch.zeros_like(theta)
        e[j] = step
        lower = grad_fn(theta - e) if central else g0
        H[:, j] = ((grad_fn(theta + e) - lower) / ((2 if central else 1) * step)).detach().cpu().numpy()
    return 0.5 * (H + H.T)


def positive_definite(eigenvalues: np.ndarray) -> bool:
    """Whether a symmetric matrix with these eigenvalues is safely positive definite (relative 1e-10)."""
    w = eigenvalues
    return bool(np.all(np.isfinite(w)) and w.min() > 1e-10 * max(1.0, abs(w).max()))


def covariance(H: np.ndarray, names: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """Inverse of the Hessian of -objective, or None with a warning when it is not positive definite."""
    if H.size == 0:
        return np.zeros((0, 0)), []
    w, V = np.linalg.eigh(H)
    if not positive_definite(w):
        flat = V[:, int(np.argmin(w))]
        worst = names[int(np.argmax(np.abs(flat)))]
        return None, [f"the likelihood is flat or curved the wrong way along {worst}: the globals are not "
                      "identified from these votes (fix mu, add a prior, or add gold votes)"]
    return (V / w) @ V.T, []


def global_intervals(fit: GlobalFit, level: float = 0.90) -> dict:
    """Central intervals: normal on theta (log a, log b, logit mu), mapped back; delta method for a + b."""
    with np.errstate(over="ignore"):   # an unbounded side of an interval is reported as infinite
        return _global_intervals(fit, level)


def _global_intervals(fit: GlobalFit, level: float) -> dict:
    spec = fit.spec
    z = float(special.ndtri(0.5 + level / 2))
    sd = np.sqrt(np.clip(np.diag(fit.cov), 0, None)) if fit.cov is not None else np.full(len(fit.theta), np.nan)
    out: dict = {"mu": [], "eta_prior": {}}
    i = 0
    if spec.eta_fixed is None:
        la, lb = fit.theta[0], fit.theta[1]
        out["eta_prior"] = {
            "a_lo": float(np.exp(la - z * sd[0])), "a_hi": float(np.exp(la + z * sd[0])),
            "b_lo": float(np.exp(lb - z * sd[1])), "b_hi": float(np.exp(lb + z * sd[1])),
        }
        if fit.cov is not None:
            # mean m = a/(a+b): logit m = log a - log b; concentration: log(a+b)
            g_m = np.array([1.0, -1.0])
            sd_m = float(np.sqrt(g_m @ fit.cov[:2, :2] @ g_m))
            g_c = np.array([fit.a, fit.b]) / (fit.a + fit.b)
            sd_c = float(np.sqrt(g_c @ fit.cov[:2, :2] @ g_c))
        else:
            sd_m = sd_c = np.nan
        lm, lc = la - lb, np.log(fit.a + fit.b)
        out["eta_prior"].update({
            "mean_lo": float(1 / (1 + np.exp(-(lm - z * sd_m)))), "mean_hi": float(1 / (1 + np.exp(-(lm + z * sd_m)))),
            "concentration_lo": float(np.exp(lc - z * sd_c)), "concentration_hi": float(np.exp(lc + z * sd_c)),
        })
        i = 2
    if spec.learn_rho:
        t, s = fit.theta[i], sd[i]
        out["rho"] = (float(1 / (1 + np.exp(-(t - z * s)))), float(1 / (1 + np.exp(-(t + z * s)))))
        i += 1
    elif spec.position and not spec.rho_user:
        out["rho"] = (spec.rho_fixed, spec.rho_fixed)
    if spec.learn_rho_user:
        ar, br = fit.theta[i], fit.theta[i + 1]
        out["rho_user"] = {"a_lo": float(np.exp(ar - z * sd[i])), "a_hi": float(np.exp(ar + z * sd[i])),
                           "b_lo": float(np.exp(br - z * sd[i + 1])), "b_hi": float(np.exp(br + z * sd[i + 1]))}
        i += 2
    if spec.strengths:
        # mu_AB = sigmoid(s_A - s_B): delta method on the strengths' covariance
        M = len(spec.models)
        keep = [m for m in range(M) if m != spec.reference]
        cov_s = np.zeros((M, M))
        if fit.cov is not None:
            cov_s[np.ix_(keep, keep)] = fit.cov[i:, i:]
        else:
            cov_s[:] = np.nan
        s_hat = np.zeros(M)
        s_hat[keep] = fit.theta[i:]
        out["strengths"] = {m: (float(s_hat[j]), float(s_hat[j] - z * np.sqrt(max(cov_s[j, j], 0))),
                                float(s_hat[j] + z * np.sqrt(max(cov_s[j, j], 0)))) for j, m in enumerate(spec.models)}
        for p in range(spec.n_pairs):
            ia, ib = spec.pair_models[p]
            d = s_hat[ia] - s_hat[ib]
            sdd = np.sqrt(max(cov_s[ia, ia] + cov_s[ib, ib] - 2 * cov_s[ia, ib], 0))
            out["mu"].append((float(1 / (1 + np.exp(-(d - z * sdd)))), float(1 / (1 + np.exp(-(d + z * sdd))))))
        return out
    for p in range(spec.n_pairs):
        if p in fit.profiles:
            out["mu"].append((fit.profiles[p]["lo"], fit.profiles[p]["hi"]))
            i += int(spec.free_mu[p])
        elif spec.free_mu[p]:
            t, s = fit.theta[i], sd[i]
            out["mu"].append((float(1 / (1 + np.exp(-(t - z * s)))), float(1 / (1 + np.exp(-(t + z * s))))))
            i += 1
        else:
            out["mu"].append((float(spec.mu_known[p]), float(spec.mu_known[p])))
    return out
