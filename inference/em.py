"""The EM algorithm of the paper: MAP of every eta_u and of the free mu's, z as the missing data.

Objective (never decreases):  sum_cells count log(c + eta_u (m - c)) + sum_u log Beta(eta_u; a, b)
                              + gold term + log-priors,
with m, c the attentive and casual probabilities of the cell's kind (see :mod:`heedful.suffstats`).
E-step, per cell: r = eta m / (c + eta (m - c)) = P(attentive | the pick).
M-step:  eta_u = (sum_cells count r + a - 1) / (n_u + a + b - 2)
         mu_p  = (A_p + gold_a + alpha - 1) / (A_p + B_p + gold_n + alpha + beta - 2),
                 A_p, B_p = attentive picks of canonical A / B on votes without a gold label
         rho   = casual picks of the first-shown answer / casual votes with a known order.
The population prior (a, b) stays fixed (a, b >= 1 so that the MAP exists).
"""

from __future__ import annotations

import numpy as np
import torch

from heedful.errors import InputError
from heedful.inference.globals import Globals, GlobalSpec, initial_mu
from heedful.inference.result import GlobalFit, ProgressFn, covariance, hessian_fd
from heedful.model.likelihood import QuadraturePlan, casual_prob, gold_loglik, log_marginal, vote_loglik
from heedful.suffstats import VoteStats

EM_DEFAULT_PRIOR = (1.0, 1.0)


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
    return ll + lp + spec.log_prior(torch.zeros(0, dtype=eta.dtype), g._replace(rho=None))


def fit_em(stats: VoteStats, plan: QuadraturePlan, spec: GlobalSpec, cells: dict[str, torch.Tensor], *,
           tol: float = 1e-9, max_iter: int = 500, progress: ProgressFn | None = None,
           trace: list[float] | None = None) -> GlobalFit:
    """Run EM to a relative change of the objective below ``tol``; ``trace`` collects every objective value."""
    if spec.strengths:
        raise InputError("--method em fits one mu per pair; for [generators] mu = \"strengths\" use --method marginal")
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
    cu, kind, cnt = cells["cell_user"], cells["cell_kind"], cells["count"]
    kinds = plan.kinds
    first = kinds.first[kind]
    U, P = stats.n_users, stats.n_pairs
    n_user = torch.zeros(U, dtype=dt, device=dev).index_add_(0, cu, cnt)
    at, bt = torch.tensor(float(a), dtype=dt, device=dev), torch.tensor(float(b), dtype=dt, device=dev)
    mu = torch.as_tensor(initial_mu(stats, spec), dtype=dt, device=dev)
    rho = None if not spec.position else torch.tensor(spec.rho_fixed or 0.5, dtype=dt, device=dev)
    rho_prior = None
    if spec.rho_user:
        ra, rb = spec.rho_user_fixed or (1.0, 1.0)
        if spec.rho_user_fixed is None:
            warnings.append("em keeps the per-user rho prior fixed; used Beta(1, 1) (--method marginal learns it)")
        if ra < 1 or rb < 1:
            raise InputError(f"--method em needs a per-user rho prior with a, b >= 1; got Beta({ra:g}, {rb:g})")
        rho = torch.full((U,), 0.5, dtype=dt, device=dev)
        rho_prior = (torch.tensor(ra, dtype=dt, device=dev), torch.tensor(rb, dtype=dt, device=dev))
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
        return float(ll + lp + spec.log_prior(torch.zeros(0, dtype=dt), g._replace(rho=None))), (b_e, b_m, b_c, b_q)

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
            rho = ((cas * (first == 1)).sum() / cas.sum().clamp_min(1e-300)).clamp(1e-9, 1 - 1e-9)
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

    def grad(th: torch.Tensor) -> torch.Tensor:
        th = th.detach().clone().requires_grad_(True)
        gl = mu_spec.unpack(th)
        return torch.autograd.grad(-(log_marginal(plan, *gl) + mu_spec.log_prior(th, gl)), th)[0]

    H = hessian_fd(grad, theta) if theta.numel() else np.zeros((0, 0))
    cov, w = covariance(H, mu_spec.theta_names(stats.pair_labels()))
    if w:
        warnings.append("no intervals for mu: EM's joint MAP lies where the marginal likelihood is not concave "
                        "(EM overstates mu when users have few votes); --method marginal gives intervals")
    with torch.no_grad():
        ll = float(log_marginal(plan, *mu_spec.unpack(theta)[:2], mu, None if spec.rho_user else rho,
                                rho_prior))
    return GlobalFit(a=float(a), b=float(b), mu=mu.cpu().numpy(), rho=rho_f, theta=theta.cpu().numpy(), cov=cov,
                     objective=obj, log_likelihood=ll, iterations=it, converged=converged, warnings=warnings,
                     eta_map=eta.cpu().numpy(), spec=mu_spec,
                     rho_prior=None if rho_prior is None else (float(rho_prior[0]), float(rho_prior[1])))
