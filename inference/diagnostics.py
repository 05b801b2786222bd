"""ArviZ InferenceData for the sampling methods, built explicitly with ``az.from_dict``, and diagnostics.

Groups (dims ``chain``, ``draw``; ``user`` = the stored users' ids, ``pair`` = "A vs B"):

* posterior: ``a``, ``b``, ``mu[pair]``, ``rho`` / ``strength`` when present, ``eta[user]``
* sample_stats: ``diverging``, ``lp`` (log density up to a constant), ``step_size`` (NUTS only)
* observed_data: per user ``n_votes``, ``n_favoured`` (picks of the answer that mu favours: canonical
  model_a when the posterior mean of mu_p >= 1/2, else model_b) and ``choice_rate`` = n_favoured / n_votes
* log_likelihood: ``votes[user]`` = log p(y_u | eta_u, mu, rho) for each draw (z, t summed out)
* posterior_predictive: ``n_favoured`` and ``choice_rate`` replicated from each draw
* prior: the globals drawn from their priors (for prior-vs-posterior plots)

``from_pyro`` is not used: on the ArviZ that installs on Python 3.11 it drops the log-likelihood of
enumerated sites, and ``from_dict`` works the same on ArviZ 1.x.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import torch

from heedful.inference.globals import GlobalSpec
from heedful.suffstats import VoteStats

RHAT_MAX, ESS_MIN = 1.01, 400
GLOBAL_VARS = ("a", "b", "mu", "rho", "strength")
CHUNK = 4_000_000


@contextlib.contextmanager
def _quiet():
    """No warnings, and ArviZ's logger only for errors (one chain of SVI draws is not a shape problem)."""
    log = logging.getLogger("arviz")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def prior_draws(spec: GlobalSpec, n: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Globals drawn from the samplers' priors (the sites of :func:`heedful.inference.nuts.sample_globals`,
    drawn as one batch)."""
    from heedful.inference.nuts import ETA_CONC_PRIOR, ETA_MEAN_PRIOR, STRENGTH_SD, draw_globals

    rng = np.random.default_rng(seed)
    sites: dict[str, np.ndarray] = {}
    if spec.eta_fixed is None:
        sites["eta_mean"] = rng.beta(*ETA_MEAN_PRIOR, size=n)
        sites["eta_conc"] = rng.lognormal(*ETA_CONC_PRIOR, size=n)
    if spec.learn_rho:
        sites["rho"] = rng.beta(*spec.rho_prior, size=n)
    if spec.strengths:
        sites["strength"] = rng.normal(0.0, spec.strength_sd or STRENGTH_SD, size=(n, len(spec.models) - 1))
    elif spec.free_mu.any():
        sites["mu_free"] = rng.beta(spec.mu_alpha[spec.free_mu], spec.mu_beta[spec.free_mu],
                                    size=(n, int(spec.free_mu.sum())))
    if not sites:
        return {}
    samples = {k: torch.as_tensor(v)[None] for k, v in sites.items()}
    return _globals_dict(spec, draw_globals(spec, samples), samples)


def _globals_dict(spec: GlobalSpec, gd: dict[str, torch.Tensor], samples: dict[str, torch.Tensor]) -> dict:
    out = {"a": gd["a"].numpy(), "b": gd["b"].numpy(), "mu": gd["mu"].numpy()}
    if "rho" in gd:
        out["rho"] = gd["rho"].numpy()
    if "strength" in samples:
        out["strength"] = samples["strength"].numpy()
    return out


def favoured(mu_draws: torch.Tensor) -> torch.Tensor:
    """Per pair, whether canonical model_a is the side mu favours (posterior mean of mu >= 1/2)."""
    return mu_draws.reshape(-1, mu_draws.shape[-1]).mean(0) >= 0.5


@torch.no_grad()
def predictive(cells, gd: dict[str, torch.Tensor], eta: torch.Tensor, users: torch.Tensor, seed: int = 0
               ) -> dict[str, np.ndarray]:
    """Observed per-user counts, per-draw log-likelihood and replicated counts for ``users``.

    ``eta``: [chains, draws, len(users)]. Per cell, p = c + eta (m - c) is the probability of the cell's
    pick; the favoured side's probability is p or 1 - p; replicated picks ~ Binomial(count, q).
    """
    C, D, S = eta.shape
    idx, local = cells.subset(users)
    kind, cnt = cells.kind[idx], cells.count[idx]
    k = cells.kinds
    fav = favoured(gd["mu"])
    pick_fav = k.pick_a[kind] == fav[k.pair[kind]]
    n_votes = torch.zeros(S, dtype=cnt.dtype).index_add(0, local, cnt)
    n_fav = torch.zeros(S, dtype=cnt.dtype).index_add(0, local, cnt * pick_fav)
    flat_eta = eta.reshape(C * D, S).to(cnt.dtype)
    mu = gd["mu"].reshape(C * D, -1).to(cnt.dtype)
    rho = gd["rho"].reshape(C * D).to(cnt.dtype) if "rho" in gd else None
    ll = torch.empty(C * D, S, dtype=torch.float64)
    rep = torch.empty(C * D, S, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    step = max(1, CHUNK // max(idx.shape[0], 1))
    first = k.first[kind]
    for s in range(0, C * D, step):   # chunks of draws: [n, cells] at a time
        e = flat_eta[s:s + step]
        m = _attentive(k, mu[s:s + step], kind)
        half = torch.full_like(m, 0.5)
        c = half if rho is None else torch.where(first == 1, rho[s:s + step, None],
                                                 torch.where(first == 2, 1 - rho[s:s + step, None], half))
        p = (c + e[:, local] * (m - c)).clamp(1e-12, 1 - 1e-12)
        cl = torch.xlogy(cnt, p)
        ll[s:s + step] = torch.zeros(e.shape[0], S, dtype=cl.dtype).index_add(1, local, cl)
        q = torch.where(pick_fav, p, 1 - p)
        draw = torch.binomial(cnt.expand_as(q).contiguous(), q, generator=gen)
        rep[s:s + step] = torch.zeros(e.shape[0], S, dtype=cl.dtype).index_add(1, local, draw)
    n = n_votes.clamp_min(1)
    return {
        "n_votes": n_votes.numpy(), "n_favoured": n_fav.numpy(), "choice_rate": (n_fav / n).numpy(),
        "log_lik": ll.reshape(C, D, S).numpy(),
        "rep_favoured": rep.reshape(C, D, S).numpy(), "rep_rate": (rep / n).reshape(C, D, S).numpy(),
    }


def _attentive(kinds, mu: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """m per (draw, cell) for mu [n, P]."""
    mu_k = mu[:, kinds.pair[kind]]
    m = torch.where(kinds.pick_a[kind], mu_k, 1.0 - mu_k)
    g = kinds.gold[kind]
    return torch.where(g == 1, torch.ones_like(m), torch.where(g == 2, torch.zeros_like(m), m))


def build_inference_data(stats: VoteStats, spec: GlobalSpec, cells, samples: dict[str, torch.Tensor],
                         gd: dict[str, torch.Tensor], eta: torch.Tensor, users: torch.Tensor, rec=None, *,
                         seed: int = 0, method: str = ""):
    """Assemble the InferenceData (see the module docstring); ``users`` are the stored users' indices."""
    az = _az()
    post = _globals_dict(spec, gd, samples)
    post["eta"] = eta.numpy()
    pr = predictive(cells, gd, eta, users, seed)
    ids = np.asarray(stats.users)[users.numpy()].astype(str)
    coords = {"user": ids, "pair": stats.pair_labels()}
    dims = {"mu": ["pair"], "eta": ["user"], "votes": ["user"], "n_votes": ["user"], "n_favoured": ["user"],
            "choice_rate": ["user"]}
    if "strength" in post:
        coords["model"] = [m for i, m in enumerate(spec.models) if i != spec.reference]
        dims["strength"] = ["model"]
    kwargs = {}
    if rec is not None:
        kwargs["sample_stats"] = {"diverging": rec.diverging, "lp": rec.lp, "step_size": rec.step_size}
    prior = prior_draws(spec, 1000, seed)
    if prior:
        kwargs["prior"] = prior
    with _quiet():
        idata = az.from_dict(
            posterior=post,
            observed_data={"n_votes": pr["n_votes"], "n_favoured": pr["n_favoured"],
                           "choice_rate": pr["choice_rate"]},
            log_likelihood={"votes": pr["log_lik"]},
            posterior_predictive={"n_favoured": pr["rep_favoured"], "choice_rate": pr["rep_rate"]},
            coords=coords, dims=dims, **kwargs)
    idata.posterior.attrs.update({"method": method, "heedful_favoured_side": "canonical model_a where the "
                                  "posterior mean of mu >= 0.5", "mu_source": ",".join(spec.mu_source)})
    idata.posterior.attrs["mu_prior_alpha"] = list(map(float, spec.mu_alpha))
    idata.posterior.attrs["mu_prior_beta"] = list(map(float, spec.mu_beta))
    return idata


def summarize(idata, method: str, max_users: int = 1000, check_mixing: bool = True) -> dict:
    """``az.summary`` of the globals (r_hat, ess_bulk, ess_tail), of users' eta (worst cases), divergences,
    and the warnings: r_hat > 1.01, ess < 400, divergences > 0 (``check_mixing``: sampling methods)."""
    az = _az()
    names = [v for v in GLOBAL_VARS if v in idata.posterior]
    with _quiet():
        tab = az.summary(idata, var_names=names, kind="all", round_to="none", hdi_prob=0.9)
        tab = tab[(tab["sd"] > 1e-12 * tab["mean"].abs().clip(lower=1)) & tab["r_hat"].notna()]  # known: not sampled
        users = idata.posterior["eta"].isel(user=slice(0, max_users if check_mixing else 0))
        ut = az.summary(users, kind="diagnostics", round_to="none") if users.sizes["user"] else None
    out: dict = {"method": method, "globals": {
        str(i): {k: _num(v) for k, v in row.items()} for i, row in tab.iterrows()}}
    div = int(idata.sample_stats["diverging"].sum()) if "sample_stats" in idata.groups() else 0
    out["divergences"] = div
    if not check_mixing:       # independent draws from a variational posterior: nothing to mix
        out["warnings"] = []
        return out
    out["users"] = {"n_summarised": int(users.sizes["user"]), "max_r_hat": _num(ut["r_hat"].max()),
                    "min_ess_bulk": _num(ut["ess_bulk"].min()), "min_ess_tail": _num(ut["ess_tail"].min()),
                    "worst_r_hat": [str(s) for s in ut["r_hat"].sort_values(ascending=False).index[:5]]}
    out["max_r_hat"] = _extreme(max, tab["r_hat"].max(), ut["r_hat"].max())      # None with one chain
    out["min_ess_bulk"] = _extreme(min, tab["ess_bulk"].min(), ut["ess_bulk"].min())
    out["min_ess_tail"] = _extreme(min, tab["ess_tail"].min(), ut["ess_tail"].min())
    out["warnings"] = nuts_warnings(tab, ut, div)
    return out


def nuts_warnings(tab, ut, divergences: int) -> list[str]:
    w = []
    bad = tab.index[tab["r_hat"] > RHAT_MAX].tolist()
    if bad:
        w.append(f"r_hat > {RHAT_MAX} for {', '.join(map(str, bad))}: the chains disagree; run longer")
    bad_u = int((ut["r_hat"] > RHAT_MAX).sum())
    if bad_u:
        w.append(f"r_hat > {RHAT_MAX} for {bad_u} users' eta")
    low = tab.index[(tab["ess_bulk"] < ESS_MIN) | (tab["ess_tail"] < ESS_MIN)].tolist()
    if low:
        w.append(f"effective sample size < {ESS_MIN} for {', '.join(map(str, low))}: draw more")
    low_u = int(((ut["ess_bulk"] < ESS_MIN) | (ut["ess_tail"] < ESS_MIN)).sum())
    if low_u:
        w.append(f"effective sample size < {ESS_MIN} for {low_u} users' eta")
    if divergences:
        w.append(f"{divergences} divergent transitions: the sampler may have missed part of the posterior")
    return w


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _extreme(pick, *values) -> float | None:
    """max or min of the finite values, None if there are none (R-hat of a single chain is NaN)."""
    finite = [v for v in map(_num, values) if v is not None]
    return pick(finite) if finite else None


def compare(reference, other) -> dict:
    """Agreement of two fits' users tables: mean |difference| of eta_mean, and interval width ratios."""
    r, o = reference.users_, other.users_
    w_r, w_o = (r.eta_hi - r.eta_lo).to_numpy(), (o.eta_hi - o.eta_lo).to_numpy()
    return {"mean_abs_diff_eta_mean": float(np.mean(np.abs(r.eta_mean.to_numpy() - o.eta_mean.to_numpy()))),
            "max_abs_diff_eta_mean": float(np.max(np.abs(r.eta_mean.to_numpy() - o.eta_mean.to_numpy()))),
            "median_width_ratio": float(np.median(w_o / np.maximum(w_r, 1e-12))),
            "mean_width_reference": float(w_r.mean()), "mean_width_other": float(w_o.mean())}
