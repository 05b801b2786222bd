"""Profile-likelihood intervals for a pair's mu: honest where the Hessian is flat or mu sits at a bound.

    l_p(mu) = max over the other globals of [log marginal likelihood + log priors], with mu_p = mu
    interval = {mu : 2 (l_max - l_p(mu)) <= chi2_1(level)}

Walks outwards from the estimate in logit steps, re-maximising the others from the previous point
(and from Beta(1, 1) when that point's eta prior is degenerate). A step starts at 0.5 and doubles (up to
4) after each step over which the profile changed by less than a quarter of the threshold; once a step crosses it, the
crossing is found by regula falsi (Illinois) on f(t) = l_max - l_p(t) - chi2_1(level) / 2, to
|f| <= 1e-3 or a bracket 1/64 wide. A side that never crosses before |logit mu| = 9 is reported as
reaching 0 or 1.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import special

from heedful.inference.globals import GlobalSpec
from heedful.inference.result import GlobalFit
from heedful.model.likelihood import QuadraturePlan
from heedful.suffstats import VoteStats

STEP, MAX_STEP, EDGE = 0.5, 4.0, 9.0   # logit steps of the walk, and its end
ROOT_F_TOL, ROOT_T_TOL, ROOT_ITERS = 1e-3, 1.0 / 64, 12   # the crossing: |f| in log-likelihood, bracket in logit


def _log_beta(x: float, a: float, b: float) -> float:
    return float(special.xlogy(a - 1, x) + special.xlog1py(b - 1, -x) - special.betaln(a, b))


def profile_mu(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, fit: GlobalFit, p: int,
               level: float = 0.90, tol: float = 1e-7) -> dict:
    """Profile of mu_p: {"mu": [...], "objective": [...], "lo": float, "hi": float} (sorted by mu)."""
    from heedful.inference.marginal import fit_marginal  # marginal uses this module's caller

    drop = float(special.ndtri(0.5 + level / 2)) ** 2 / 2     # chi2(1) quantile / 2
    t_hat = float(np.clip(np.log(fit.mu[p]) - np.log1p(-fit.mu[p]), -EDGE, EDGE))
    has_prior = spec.mu_source[p] == "prior"

    def refit(t: float, start: tuple) -> tuple[float, tuple]:
        """l_p at logit mu = t, maximising the rest from `start` (and from Beta(1, 1) if start is degenerate)."""
        mu_p = float(1 / (1 + np.exp(-t)))
        known = spec.mu_known.copy()
        known[p] = mu_p
        src = list(spec.mu_source)
        src[p] = "known"
        sp = replace(spec, mu_known=known, mu_source=src, warnings=[])
        mu_start = start[2].copy()
        mu_start[p] = mu_p
        f = fit_marginal(stats, plan, sp, tol=tol, start=(start[0], start[1], mu_start, start[3]), curvature=False)
        if spec.eta_fixed is None and not (0.05 < start[0] < 100 and 0.05 < start[1] < 100):
            # a degenerate prior (a or b near 0 or huge) is a flat region where the refit stays put;
            # restart from Beta(1, 1) as well and keep the better maximum
            g = fit_marginal(stats, plan, sp, tol=tol, start=(1.0, 1.0, mu_start, start[3]), curvature=False)
            f = g if g.objective > f.objective else f
        obj = f.objective + (_log_beta(mu_p, spec.mu_alpha[p], spec.mu_beta[p]) if has_prior else 0.0)
        return obj, (f.a, f.b, f.mu, f.rho)

    points = [(t_hat, fit.objective)]
    top = fit.objective
    ends = {}
    for direction in (-1.0, 1.0):
        t, prev_obj, step = t_hat, fit.objective, STEP
        start = (fit.a, fit.b, fit.mu.copy(), fit.rho)
        ends[direction] = 0.0 if direction < 0 else 1.0
        while direction * t < EDGE - 1e-9:
            prev_t, t = t, float(np.clip(t + direction * step, -EDGE, EDGE))
            obj, nxt = refit(t, start)
            points.append((t, obj))
            top = max(top, obj)
            if top - obj > drop:   # crossed between prev_t and t
                cross = _crossing(lambda u, s=start: refit(u, s)[0], top - drop, prev_t, prev_obj, t, obj, points)
                ends[direction] = float(1 / (1 + np.exp(-cross)))
                break
            if abs(obj - prev_obj) < drop / 4:     # the profile changes slowly here: longer steps
                step = min(2 * step, MAX_STEP)
            prev_obj, start = obj, nxt
    warnings = []
    if top > fit.objective + 1e-3:
        best_t = max(points, key=lambda q: q[1])[0]
        warnings.append(f"the profile found a higher likelihood (+{top - fit.objective:.3g}) at mu = "
                        f"{1 / (1 + np.exp(-best_t)):.3f}: the likelihood is nearly flat along this mu")
    points = [(float(1 / (1 + np.exp(-t))), o) for t, o in points]
    points.sort()
    return {"mu": [m for m, _ in points], "objective": [o for _, o in points], "lo": ends[-1.0], "hi": ends[1.0],
            "level": level, "warnings": warnings}


def _crossing(objective, cut: float, t_in: float, obj_in: float, t_out: float, obj_out: float,
              points: list) -> float:
    """Where the profile ``objective`` (a refit per call) falls to ``cut``, between t_in (above it: inside the
    interval) and t_out (below it), by the Illinois method on f(t) = cut - objective(t). Each refit's (t, l_p)
    is added to ``points``."""
    f_in, f_out = cut - obj_in, cut - obj_out
    last = 0                      # which end the previous guess replaced: +1 t_out, -1 t_in
    for _ in range(ROOT_ITERS):
        if abs(t_out - t_in) <= ROOT_T_TOL:
            break
        guess = t_out - f_out * (t_out - t_in) / (f_out - f_in)
        if not min(t_in, t_out) < guess < max(t_in, t_out):
            guess = 0.5 * (t_in + t_out)
        obj = objective(guess)
        points.append((guess, obj))
        f_g = cut - obj
        if abs(f_g) <= ROOT_F_TOL:
            return guess
        if f_g > 0:
            t_out, f_out = guess, f_g
            f_in = 0.5 * f_in if last == 1 else f_in       # the same end twice: halve the other's value
            last = 1
        else:
            t_in, f_in = guess, f_g
            f_out = 0.5 * f_out if last == -1 else f_out
            last = -1
    return t_out - f_out * (t_out - t_in) / (f_out - f_in)
