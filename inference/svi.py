"""``--method svi``: stochastic variational inference on the collapsed likelihood (z, t summed out).

Model (:func:`svi_model`): the globals under the priors of :mod:`heedful.inference.nuts`, then

    eta_u ~ Beta(a, b),    log p(y_u | eta_u) = sum_cells count log(c + eta_u (m - c))

with the users plate subsampled (``batch_size`` rows a step, the factor scaled by rows / batch) when the
data are large. Guides (kept apart from the model): the globals by ``AutoDelta`` (default: MAP, with
intervals from the curvature of the exact marginal objective, as ``--method marginal``) or ``AutoNormal``
(``globals="normal"``); every user's eta by

* ``guide="beta"`` (default): q(eta_u) = Beta(a + s1_u, b + s2_u), the prior times a Beta-shaped site for
  the user's likelihood. The family holds the prior itself, so users with little information cost no
  approximation gap whatever (a, b) is;
* ``guide="logit-normal"``: q(eta_u) = sigmoid_* Normal, the prior moment-matched in the logit times a
  Gaussian site. Its gap shrinks as a + b grows, which biases a + b up (measured: 6.8 vs 3.6 + 6.0 = 9.6
  exact on 5,000 users x 20 votes), so intervals come out too narrow.

Both move every q with (a, b) at once. Sites start from a least-squares moment estimate per user.

``tie`` ("auto": when it cuts the rows at least fourfold): users whose (kind, count) cells are identical
have identical ELBO terms and so the same optimal q; they share one site, estimated from ``replicas``
independent draws per step and weighted by the group's size (``poutine.scale`` on the eta site in model
and guide): the optimum of one row per user at a fraction of the cost. ``tie=False``: a row per user.

Convergence rule: the ELBO is averaged over windows of ``window`` steps; a plateau is a window whose
gain over the previous one is within two standard errors of zero while no global moved by more than
``global_tol`` (unconstrained units). At each plateau Adam's learning rate drops (``lr`` x 1, 0.2, 0.04:
smaller steps, less gradient noise); the fit has converged at the plateau of the last one. It stops
early at ``max_steps`` / ``time_limit`` (then ``converged`` is false and a warning says so).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value
from scipy import stats as sstats
from torch.distributions import biject_to

from heedful.inference.globals import GlobalSpec, initial_mu
from heedful.inference.nuts import (
    MAX_STORED_VALUES,
    UserCells,
    _stored_users,
    draw_globals,
    gold_loglik_cells,
    sample_globals,
    signature_grid,
    user_cells,
)
from heedful.inference.posterior import UserPosterior
from heedful.model.likelihood import Kinds

LR_PHASES = (1.0, 0.2, 0.04)   # learning rate multipliers, each used until the ELBO plateaus
REPLICAS = 256                 # draws of eta per group of tied users per step (at most the group's size)
UNTIED_REPLICAS = 8            # draws per user per step with one guide row per user
FULL_BATCH_MAX = 2_000_000     # users; more than this and the users plate is subsampled by default


def svi_model(cells: UserCells, spec: GlobalSpec, batch: int | None = None,
              weights: torch.Tensor | None = None) -> None:
    """Globals, then every user's eta (subsampled plate) with the collapsed count likelihood.

    ``weights``: users per row when rows stand for groups of users with identical votes (see ``tie``).
    """
    g = sample_globals(spec, cells.count.dtype, cells.count.device)
    pyro.factor("gold", gold_loglik_cells(cells, g.mu))
    with pyro.plate("users", cells.n_users, subsample_size=batch) as idx:  # noqa: SIM117 (the scale needs idx)
        with poutine.scale(scale=1.0 if weights is None else weights[idx]):
            eta = pyro.sample("eta", dist.Beta(g.a, g.b))
            ci, local = cells.subset(idx)
            pyro.factor("votes", cells.loglik(eta, g, ci, local))


def globals_model(cells: UserCells, spec: GlobalSpec, batch: int | None = None,
                  weights: torch.Tensor | None = None) -> None:
    """The model's global sites alone: the prototype of the autoguide for the globals (no users plate)."""
    sample_globals(spec, cells.count.dtype, cells.count.device)


def prior_logit_moments(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision of logit(eta) under Beta(a, b): digamma(a) - digamma(b), 1 / (trigamma(a) + trigamma(b))."""
    return torch.digamma(a) - torch.digamma(b), 1.0 / (torch.polygamma(1, a) + torch.polygamma(1, b))


def eta_guide(cells: UserCells, spec: GlobalSpec, batch: int | None = None, weights: torch.Tensor | None = None,
              *, prior: tuple[torch.Tensor, torch.Tensor], init_site: tuple[torch.Tensor, torch.Tensor],
              shared: torch.Tensor | None = None) -> None:
    """q(eta_u) = logit-normal, as the current prior (moment-matched in the logit) times a Gaussian *site*
    (site_mean_u, site_prec_u) standing for the user's likelihood:

        prec_u = prec_prior(a, b) + site_prec_u,  loc_u = (prec_prior mean_prior + site_prec_u site_mean_u) / prec_u

    so every q moves with (a, b) at once (no slow zig-zag between the globals and a million local
    parameters). One site per user (per row; rows ``shared`` the site of row ``shared[row]``).
    """
    site_mean = pyro.param("site_mean", init_site[0])
    site_prec = pyro.param("site_prec", init_site[1], constraint=constraints.positive)
    p_mean, p_prec = prior
    with pyro.plate("users", cells.n_users, subsample_size=batch) as idx:
        j = idx if shared is None else shared[idx]
        prec = p_prec + site_prec[j]
        loc = (p_prec * p_mean + site_prec[j] * site_mean[j]) / prec
        with poutine.scale(scale=1.0 if weights is None else weights[idx]):
            pyro.sample("eta", dist.TransformedDistribution(dist.Normal(loc, prec.rsqrt()),
                                                             [dist.transforms.SigmoidTransform()]))


def beta_guide(cells: UserCells, spec: GlobalSpec, batch: int | None = None, weights: torch.Tensor | None = None,
               *, prior: tuple[torch.Tensor, torch.Tensor], init_site: tuple[torch.Tensor, torch.Tensor],
               shared: torch.Tensor | None = None) -> None:
    """q(eta_u) = Beta(a + s1_u, b + s2_u): the prior times a Beta-shaped site eta^s1 (1 - eta)^s2 for the
    user's likelihood (s1, s2 >= 0). The family holds the prior itself, so users with little information
    cost no approximation gap, whatever (a, b) is (the logit-normal's gap shrinks as a + b grows, which
    pulls a + b up)."""
    s1 = pyro.param("site_a", init_site[0], constraint=constraints.positive)
    s2 = pyro.param("site_b", init_site[1], constraint=constraints.positive)
    a, b = prior
    with pyro.plate("users", cells.n_users, subsample_size=batch) as idx:
        j = idx if shared is None else shared[idx]
        with poutine.scale(scale=1.0 if weights is None else weights[idx]):
            pyro.sample("eta", dist.Beta(a + s1[j], b + s2[j]))


def _ab(spec: GlobalSpec, values: dict[str, torch.Tensor], dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.eta_fixed is not None:
        return torch.tensor(spec.eta_fixed[0], dtype=dt), torch.tensor(spec.eta_fixed[1], dtype=dt)
    m, k = values["eta_mean"], values["eta_conc"]
    return m * k, (1 - m) * k


def replicate(cells: UserCells, k: int) -> tuple[UserCells, torch.Tensor]:
    """Each row of ``cells`` k times (rows r*k .. r*k + k - 1): k independent draws of eta per group of tied
    users, so the ELBO estimate of a group is an average, not one draw scaled by the group's size."""
    n = cells.length.repeat_interleave(k)                       # [R k] cells per replica row
    row = torch.arange(cells.n_users * k)
    src_start = cells.start.repeat_interleave(k)
    local_row = torch.repeat_interleave(row, n)
    offset = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    c = torch.repeat_interleave(src_start, n) + offset
    out = UserCells(cells.n_users * k, local_row, cells.kind[c], cells.count[c], torch.cumsum(n, 0) - n, n,
                    cells.kinds, cells.gold_a, cells.gold_n)
    return out, torch.arange(cells.n_users).repeat_interleave(k)


def initial_state(cells: UserCells, mu0: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Moment start for (a, b) and every q(eta_u).

    A vote picking a side with attentive probability m has P = 1/2 + eta (m - 1/2), so least squares over a
    user's votes gives eta_ls = sum n (m - 1/2) / 2 / d, d = sum n (m - 1/2)^2, with noise variance 1 / (4 d).
    The population mean and variance of eta are the mean of eta_ls and its variance less the mean noise
    (method of moments); each user's start is the precision-weighted mix of eta_ls and the population mean,
    its scale the combined sd, mapped to the logit.
    """
    m = cells.kinds.attentive_prob(mu0)[cells.kind] - 0.5
    U = cells.n_users
    s = torch.zeros(U, dtype=m.dtype).index_add(0, cells.user, cells.count * m / 2)
    d = torch.zeros(U, dtype=m.dtype).index_add(0, cells.user, cells.count * m * m)
    ok = d > 0
    ls = s[ok] / d[ok]
    mean = float(ls.mean().clamp(0.05, 0.95)) if bool(ok.any()) else 0.5
    var = float(ls.var() - (1 / (4 * d[ok])).mean()) if int(ok.sum()) > 1 else 0.0
    var = min(max(var, 1e-3), 0.9 * mean * (1 - mean))
    k = mean * (1 - mean) / var - 1
    prec0 = 1.0 / var
    eta0 = torch.where(ok, (s / d.clamp_min(1e-12) * 4 * d + mean * prec0) / (4 * d + prec0),
                       torch.full_like(d, mean)).clamp(0.02, 0.98)
    sd = 1.0 / torch.sqrt(4.0 * d + prec0)
    return mean * k, (1 - mean) * k, torch.log(eta0) - torch.log1p(-eta0), (sd / (eta0 * (1 - eta0))).clamp(0.05, 3.0)


def fit_svi(ctx) -> object:
    """The registry entry for ``--method svi`` (see :mod:`heedful.inference.estimator`)."""
    from heedful.inference.curvature import marginal_derivatives
    from heedful.inference.diagnostics import build_inference_data, summarize
    from heedful.inference.estimator import MethodResult
    from heedful.inference.marginal import objective
    from heedful.inference.result import GlobalFit, covariance

    opt = ctx.options
    stats, spec, plan = ctx.stats, ctx.spec, ctx.plan
    dt, dev = torch.float64, torch.device("cpu")
    seed = int(opt.get("seed", 0))
    n_draws = int(opt.get("draws", 1000))
    lr = float(opt.get("lr", 0.05))
    window, max_steps = int(opt.get("window", 25)), int(opt.get("max_steps", 3000))
    min_steps = int(opt.get("min_steps", 4 * window))
    global_tol = float(opt.get("global_tol", 0.005))
    time_limit = float(opt.get("time_limit", math.inf))
    U = stats.n_users
    k = plan.kinds
    cells = user_cells(stats, spec, dev, dt, Kinds(k.pair.to(dev), k.pick_a.to(dev), k.first.to(dev), k.gold.to(dev)))
    mu0 = torch.as_tensor(initial_mu(stats, spec), dtype=dt)
    a0, b0, init_loc, init_scale = initial_state(cells, mu0)
    # tie: users with identical (kind, count) cells share q (the per-user optimum is the same for them)
    tie = opt.get("tie", "auto")
    rows, weights, row_of_user, shared, groups = cells, None, torch.arange(U), None, U
    if tie in (True, "auto", "true", "yes"):
        grid = signature_grid(cells, n_grid=3)
        if tie != "auto" or grid.n_sig <= U // 4:
            R = groups = grid.n_sig
            K = int(opt.get("replicas", min(REPLICAS, max(1, U // R))))
            rows, shared = replicate(grid.sig_cells, K)
            weights = grid.mult[shared] / K
            row_of_user = grid.user_sig
            init_loc = torch.zeros(R, dtype=dt).index_copy(0, row_of_user, init_loc)
            init_scale = torch.ones(R, dtype=dt).index_copy(0, row_of_user, init_scale)
    if shared is None and int(opt.get("replicas", UNTIED_REPLICAS)) > 1:
        K = int(opt.get("replicas", UNTIED_REPLICAS))
        rows, shared = replicate(cells, K)
        weights = torch.full((rows.n_users,), 1.0 / K, dtype=dt)
    n_rows = rows.n_users
    batch = opt.get("batch_size")
    batch = None if (batch is None and n_rows <= FULL_BATCH_MAX) else int(batch or FULL_BATCH_MAX // 4)
    batch = None if batch is not None and batch >= n_rows else batch
    init_values = {}
    if spec.eta_fixed is None:
        init_values = {"eta_mean": torch.tensor(a0 / (a0 + b0), dtype=dt), "eta_conc": torch.tensor(a0 + b0, dtype=dt)}
    if spec.free_mu.any() and not spec.strengths:
        init_values["mu_free"] = mu0[torch.as_tensor(spec.free_mu)]

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = svi_model
    which = opt.get("globals", "delta")
    init_fn = init_to_value(values=init_values)
    auto = (AutoNormal(globals_model, init_loc_fn=init_fn, init_scale=0.05) if which == "normal"
            else AutoDelta(globals_model, init_loc_fn=init_fn))

    p_mean0, p_prec0 = prior_logit_moments(torch.tensor(a0, dtype=dt), torch.tensor(b0, dtype=dt)) \
        if spec.eta_fixed is None else prior_logit_moments(*_ab(spec, {}, dt))
    site_prec0 = (init_scale ** -2 - p_prec0).clamp_min(0.05)
    site_mean0 = (init_loc * (site_prec0 + p_prec0) - p_prec0 * p_mean0) / site_prec0

    family = opt.get("guide", "beta")
    eta0 = torch.sigmoid(init_loc)
    n_eff = (eta0 * (1 - eta0) / (init_scale * eta0 * (1 - eta0)) ** 2 - a0 - b0 - 1).clamp_min(0.5)
    beta_site0 = ((eta0 * n_eff).clamp_min(0.05), ((1 - eta0) * n_eff).clamp_min(0.05))

    def guide(cells: UserCells, spec: GlobalSpec, batch: int | None = None,
              weights: torch.Tensor | None = None) -> None:
        values = auto(cells, spec, batch, weights)
        if family == "beta":
            beta_guide(cells, spec, batch, weights, prior=_ab(spec, values, dt), init_site=beta_site0, shared=shared)
        else:
            eta_guide(cells, spec, batch, weights, prior=prior_logit_moments(*_ab(spec, values, dt)),
                      init_site=(site_mean0, site_prec0), shared=shared)

    optim = pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 100.0})
    svi = SVI(model, guide, optim, Trace_ELBO())
    scale = 1.0 / max(stats.n_votes, 1)
    losses: list[float] = []
    converged, t0 = False, time.perf_counter()
    prev, prev_g = None, None
    step, phase, phase_start = 0, 0, 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was not registered in the param store.*")
        for step in range(1, max_steps + 1):
            losses.append(svi.step(rows, spec, batch, weights))
            if ctx.progress and step % 10 == 0:
                ctx.progress(step, -float(np.mean(losses[-10:])))
            if step % window == 0:
                w = np.asarray(losses[-window:])
                cur = (w.mean(), w.std(ddof=1) / math.sqrt(window))
                cur_g = _global_point(auto)
                if prev is not None and step - phase_start >= (min_steps if phase == 0 else 2 * window):
                    gain = prev[0] - cur[0]                  # loss decrease = ELBO gain
                    moved = max((float((cur_g[k] - prev_g[k]).abs().max()) for k in cur_g), default=0.0)
                    if gain < 2.0 * math.hypot(prev[1], cur[1]) and moved < global_tol:
                        if phase == len(LR_PHASES) - 1:
                            converged = True
                            break
                        phase, phase_start = phase + 1, step       # plateau: a smaller step, less noise
                        _set_lr(optim, lr * LR_PHASES[phase])
                        cur = None
                prev, prev_g = cur, cur_g
            if time.perf_counter() - t0 > time_limit:
                break
    svi_s = time.perf_counter() - t0
    fit_warnings = [] if converged else [
        f"SVI stopped after {step} steps without meeting its convergence rule (ELBO still rising by more than "
        "its noise); raise max_steps or time_limit"]

    # -- the globals: point (AutoDelta) or draws (AutoNormal) -------------------------------------------
    with torch.no_grad():
        if which == "normal":
            pyro.set_rng_seed(seed + 1)
            sites: dict[str, list] = {}
            for _ in range(n_draws):
                for name, v in auto().items():
                    sites.setdefault(name, []).append(v.detach())
            samples = {kk: torch.stack(v)[None] for kk, v in sites.items()}
        else:
            point = {kk: v.detach() for kk, v in auto().items()}
            samples = {kk: v.expand(n_draws, *v.shape)[None] for kk, v in point.items()}
    gd = draw_globals(spec, samples, (1, n_draws))
    a_m, b_m = float(gd["a"].mean()), float(gd["b"].mean())
    mu_m = gd["mu"].reshape(-1, spec.n_pairs).mean(0)
    rho_m = float(gd["rho"].mean()) if "rho" in gd else None
    theta = spec.pack(a_m, b_m, mu_m.numpy(), rho_m, dt, dev)
    if spec.n_free:     # f = the objective, log p(votes, gold | globals) + log-priors
        obj, _, hess = marginal_derivatives(plan, spec, theta)
        cov, w = covariance(-hess, spec.theta_names(stats.pair_labels()))
        fit_warnings += w
    else:
        cov = np.zeros((0, 0))
        with torch.no_grad():
            obj = float(objective(plan, spec, theta))
    with torch.no_grad():
        ll = obj - float(spec.log_prior(theta, spec.unpack(theta)))

    # -- per-user summaries and draws from q ---------------------------------------------------------
    stored = _stored_users(U, n_draws, int(opt.get("max_stored_values", MAX_STORED_VALUES)), seed)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        a_q, b_q = _ab(spec, auto.median(), dt)
        if family == "beta":
            qa = a_q + pyro.param("site_a").detach()
            qb = b_q + pyro.param("site_b").detach()
            post = beta_summaries(qa, qb, ctx.level, row_of_user)
            torch.manual_seed(seed + 2)
            eta = dist.Beta(qa[row_of_user[stored]], qb[row_of_user[stored]]).sample((n_draws,)).float()[None]
        else:
            p_mean, p_prec = prior_logit_moments(a_q, b_q)
            s_mean = pyro.param("site_mean").detach()[row_of_user]
            s_prec = pyro.param("site_prec").detach()[row_of_user]
            prec = p_prec + s_prec
            loc, sc = (p_prec * p_mean + s_prec * s_mean) / prec, prec.rsqrt()
            post = logit_normal_summaries(loc, sc, ctx.level)
            z = torch.randn(n_draws, stored.shape[0], generator=gen, dtype=dt)
            eta = torch.sigmoid(loc[stored] + sc[stored] * z).float()[None]
    idata = build_inference_data(stats, spec, cells, samples, gd, eta, stored, None, seed=seed, method="svi")
    diag = summarize(idata, method="svi", check_mixing=False)
    every = max(1, len(losses) // 200)
    diag.update({"globals_guide": which, "steps": step, "batch_size": batch or n_rows, "svi_s": round(svi_s, 2),
                 "guide_rows": n_rows, "guide_groups": groups, "tied": groups < U, "guide": family,
                 "converged": converged, "elbo_per_vote": [-float(v) * scale for v in losses[::every]],
                 "elbo_every": every, "lr": lr, "stored_users": int(stored.shape[0])})
    fit = GlobalFit(a=a_m, b=b_m, mu=mu_m.numpy(), rho=rho_m, theta=theta.numpy(), cov=cov, objective=obj,
                    log_likelihood=ll, iterations=step, converged=converged, warnings=fit_warnings, spec=spec)
    return MethodResult(fit=fit, posterior=post, inference_data=idata, diagnostics=diag)


def _set_lr(optim, lr: float) -> None:
    for o in optim.optim_objs.values():
        for group in o.param_groups:
            group["lr"] = lr


def _global_point(auto) -> dict[str, torch.Tensor]:
    """The globals' current point (AutoDelta) or location (AutoNormal), unconstrained."""
    with torch.no_grad():
        return {k: biject_to(auto._prototype_trace.nodes[k]["fn"].support).inv(v).detach().clone()
                for k, v in auto.median().items()} if hasattr(auto, "_prototype_trace") and \
            auto._prototype_trace is not None else {}


def beta_summaries(qa: torch.Tensor, qb: torch.Tensor, level: float, row_of_user: torch.Tensor) -> UserPosterior:
    """Mean, median, central interval and sd of Beta(qa, qb) per row, given to each user of the row."""
    a_, b_ = qa.numpy(), qb.numpy()
    lo, med, hi = (sstats.beta.ppf(p, a_, b_) for p in ((1 - level) / 2, 0.5, (1 + level) / 2))
    mean = a_ / (a_ + b_)
    sd = np.sqrt(a_ * b_ / ((a_ + b_) ** 2 * (a_ + b_ + 1)))
    r = row_of_user.numpy()
    return UserPosterior(mean=mean[r], mode=med[r], lo=lo[r], hi=hi[r], sd=sd[r])


def logit_normal_summaries(loc: torch.Tensor, scale: torch.Tensor, level: float, nodes: int = 32) -> UserPosterior:
    """Median, central interval (exact quantiles), mean and sd (Gauss-Hermite) of sigmoid(Normal(loc, scale))."""
    z = float(sstats.norm.ppf(0.5 + level / 2))
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    x, w = torch.as_tensor(x, dtype=loc.dtype), torch.as_tensor(w / w.sum(), dtype=loc.dtype)
    e = torch.sigmoid(loc[:, None] + scale[:, None] * x)
    mean = (e * w).sum(1)
    sd = ((e * e * w).sum(1) - mean ** 2).clamp_min(0).sqrt()
    return UserPosterior(mean=mean.numpy(), mode=torch.sigmoid(loc).numpy(),
                         lo=torch.sigmoid(loc - z * scale).numpy(), hi=torch.sigmoid(loc + z * scale).numpy(),
                         sd=sd.numpy())
