"""The estimator object: votes in, per-user attentiveness and the globals out (crowd-kit style).

>>> model = Attentiveness(method="marginal").fit(votes)     # fit returns self
>>> model.users_        # one row per user: n_votes, eta_hat, eta_mean, eta_lo, eta_hi, ...
>>> model.pairs_        # one row per pair: mu with its interval, votes, ties
>>> model.params()      # the params.json document
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Self

import numpy as np
import pandas as pd
import torch

from heedful import __version__
from heedful.config import Priors
from heedful.device import resolve_device, resolve_dtype
from heedful.errors import InputError
from heedful.inference.em import fit_em
from heedful.inference.globals import GlobalSpec, global_spec
from heedful.inference.marginal import fit_marginal
from heedful.inference.posterior import UserPosterior, user_posterior
from heedful.inference.profile import profile_mu
from heedful.inference.result import GlobalFit, ProgressFn, global_intervals
from heedful.model.likelihood import QuadraturePlan, build_plan
from heedful.suffstats import VoteStats, vote_stats
from heedful.votes import validate_votes


@dataclass
class FitContext:
    """What every fitting method receives: the data in all its forms and the estimator's settings."""

    stats: VoteStats
    plan: QuadraturePlan
    spec: GlobalSpec
    tol: float
    max_iter: int
    level: float
    progress: ProgressFn | None
    options: dict = field(default_factory=dict)   # method-specific (draws, chains, seed, ...)

    @cached_property
    def cells(self) -> dict[str, torch.Tensor]:
        """The cells as tensors on the plan's device (:meth:`VoteStats.tensors`), built on first use: only the
        methods that keep eta_u per cell (em) need them (at 10M votes, 70 MB of float counts)."""
        return self.stats.tensors(self.plan.device, self.plan.dtype)


@dataclass
class MethodResult:
    """A method's output: the globals, and optionally its own per-user posterior and extra artefacts."""

    fit: GlobalFit
    posterior: UserPosterior | None = None        # None: computed from fit by the exact posterior
    inference_data: object | None = None          # an arviz.InferenceData for sampling methods
    diagnostics: dict = field(default_factory=dict)


def _marginal(ctx: FitContext) -> MethodResult:
    """Exact-marginal fit; profile likelihoods for the mu's whose Hessian interval is missing (or all, if asked)."""
    fit = fit_marginal(ctx.stats, ctx.plan, ctx.spec, tol=ctx.tol, max_iter=ctx.max_iter, progress=ctx.progress,
                       warm=_flag(ctx.options.get("warm", True), "warm"))
    if not ctx.spec.strengths:
        sd = np.sqrt(np.diag(fit.cov)) if fit.cov is not None else None
        free = np.flatnonzero(ctx.spec.free_mu)
        offset = ctx.spec.n_free - len(free)
        for j, p in enumerate(free):
            flat = sd is None or not np.isfinite(sd[offset + j]) or sd[offset + j] > 5
            mode = ctx.options.get("profile", "auto")
            if (flat and mode == "auto") or mode is True:
                fit.profiles[int(p)] = profile_mu(ctx.stats, ctx.plan, ctx.spec, fit, int(p), ctx.level)
    return MethodResult(fit)


def _em(ctx: FitContext) -> MethodResult:
    return MethodResult(fit_em(ctx.stats, ctx.plan, ctx.spec, ctx.cells, tol=ctx.tol, max_iter=ctx.max_iter,
                               progress=ctx.progress, solver=str(ctx.options.get("solver", "auto")),
                               warm=_flag(ctx.options.get("warm", True), "warm")))


def _flag(value: object, name: str) -> bool:
    """A yes/no method option (``--option warm=false``)."""
    if isinstance(value, bool):
        return value
    raise InputError(f"--option {name} takes true or false, not {value!r}")


# name -> fitting function, or "module:function" imported on first use (keeps start-up light)
FITTERS: dict[str, Callable[[FitContext], MethodResult] | str] = {
    "marginal": _marginal,
    "em": _em,
    "svi": "heedful.inference.svi:fit_svi",
    "nuts": "heedful.inference.nuts:fit_nuts",
}
METHODS = tuple(FITTERS)


def _fitter(name: str) -> Callable[[FitContext], MethodResult]:
    f = FITTERS[name]
    if isinstance(f, str):
        import importlib

        module, func = f.split(":")
        try:
            f = getattr(importlib.import_module(module), func)
        except ImportError as e:
            raise InputError(f"--method {name} is not available in this installation ({e})") from None
        FITTERS[name] = f
    return f


class _Clock:
    """Wall time of each phase of a fit (the device synchronised at each lap, so GPU work is counted)."""

    def __init__(self, dev: torch.device) -> None:
        self.dev, self.t, self.laps = dev, time.perf_counter(), {}

    def lap(self, name: str) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now


class Attentiveness:
    """User behaviour model fitted to comparison-mode votes.

    Parameters: ``method`` (``marginal``: exact-marginal empirical Bayes, the default; ``em``: the
    paper's MAP EM), ``priors`` (:class:`heedful.config.Priors`), ``device``/``dtype``, ``level``
    (of the central intervals), ``progress`` (callback ``(iteration, objective)``).

    Attributes after ``fit``: ``users_``, ``pairs_``, ``eta_prior_``, ``log_likelihood_``,
    ``n_iter_``, ``converged_``, ``warnings_``, ``stats_``, ``fit_``, ``posterior_``, ``inference_data_``
    (sampling methods), ``diagnostics_``. ``posterior_.mode`` is None where the method keeps eta_u
    (em: ``fit_.eta_map``, the modes, is ``users_.eta_hat``).
    """

    def __init__(self, method: str = "marginal", priors: Priors | None = None, *, device: str = "auto",
                 dtype: str = "float64", level: float = 0.90, tol: float | None = None,
                 max_iter: int | None = None, progress: ProgressFn | None = None,
                 options: dict | None = None) -> None:
        if method not in FITTERS:
            raise InputError(f"--method must be one of {', '.join(FITTERS)}, not {method!r}")
        if not 0 < level < 1:
            raise InputError(f"level must lie in (0, 1), got {level}")
        self.method = method
        self.priors = priors or Priors()
        self.device = device
        self.dtype = dtype
        self.level = level
        self.tol = tol if tol is not None else self.priors.tol
        default_iter = {"em": 2000}.get(method, 500)
        self.max_iter = next(v for v in (max_iter, self.priors.max_iter, default_iter) if v is not None)
        self.progress = progress
        self.options = dict(options or {})

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, votes: pd.DataFrame | VoteStats) -> Self:
        t0 = time.perf_counter()
        dev, dt = resolve_device(self.device), resolve_dtype(self.dtype)
        clock = _Clock(dev)
        stats = votes if isinstance(votes, VoteStats) else vote_stats(validate_votes(votes), validated=True)
        if stats.n_votes == 0:
            raise InputError("every vote is a tie: there is nothing to fit (ties are left out of the likelihood)")
        spec = global_spec(stats, self.priors)
        plan = build_plan(stats, dev, dt)
        clock.lap("counts_to_device")
        options = {"profile": self.priors.profile, **self.options}
        ctx = FitContext(stats, plan, spec, self.tol, self.max_iter, self.level, self.progress, options)
        result = _fitter(self.method)(ctx)
        gfit = result.fit
        clock.lap("fit")
        post = result.posterior or user_posterior(plan, None, gfit.a, gfit.b,
                                                  torch.as_tensor(gfit.mu, dtype=dt, device=dev), gfit.rho,
                                                  level=self.level, rho_prior=gfit.rho_prior,
                                                  modes=gfit.eta_map is None)   # EM's eta_map: the modes
        clock.lap("posterior")
        self.stats_, self.spec_, self.fit_, self.posterior_ = stats, spec, gfit, post
        self.inference_data_ = result.inference_data
        self.diagnostics_ = result.diagnostics
        self._plan = plan
        self._finish(time.perf_counter() - t0, dev, dt)
        clock.lap("summaries")
        self.timings_ = clock.laps
        return self

    def _finish(self, elapsed: float, dev: torch.device, dt: torch.dtype) -> None:
        stats, spec, gfit, post = self.stats_, self.spec_, self.fit_, self.posterior_
        iv = global_intervals(gfit, self.level)
        eta_hat = gfit.eta_map if gfit.eta_map is not None else post.mode
        self.users_ = pd.DataFrame({
            "user_id": stats.users,
            "n_votes": stats.user_votes(),
            "n_ties": stats.user_ties,
            "eta_hat": eta_hat,
            "eta_mean": post.mean,
            "eta_lo": post.lo,
            "eta_hi": post.hi,
            "eta_sd": post.sd,
        })
        pv = stats.pair_votes()
        self.pairs_ = pd.DataFrame({
            "model_a": [p[0] for p in stats.pairs],
            "model_b": [p[1] for p in stats.pairs],
            "mu": gfit.mu,
            "mu_lo": [lo for lo, _ in iv["mu"]],
            "mu_hi": [hi for _, hi in iv["mu"]],
            "n_votes": pv,
            "n_ties": stats.pair_ties,
            "a_rate": stats.pair_a_votes() / np.maximum(pv, 1),
            "source": spec.mu_source,
        })
        self.eta_prior_ = {"a": gfit.a, "b": gfit.b, "learned": spec.eta_fixed is None and self.method != "em",
                           "mean": gfit.a / (gfit.a + gfit.b), "concentration": gfit.a + gfit.b, **iv["eta_prior"]}
        self.rho_ = None if gfit.rho is None else {"rho": gfit.rho, "lo": iv["rho"][0], "hi": iv["rho"][1],
                                                    "learned": spec.learn_rho}
        if gfit.rho_prior is not None:
            ar, br = gfit.rho_prior
            self.rho_ = {"per_user": True, "a": ar, "b": br, "mean": ar / (ar + br), "learned": spec.learn_rho_user,
                         **iv.get("rho_user", {})}
        self.strengths_ = None if "strengths" not in iv else {
            m: {"strength": v[0], "lo": v[1], "hi": v[2], "reference": i == spec.reference}
            for i, (m, v) in enumerate(iv["strengths"].items())}
        warnings = list(spec.warnings) + list(gfit.warnings)
        labels = stats.pair_labels()
        warnings += [f"{labels[p]}: {w}" for p, prof in gfit.profiles.items() for w in prof.get("warnings", [])]
        width = self.pairs_.mu_hi - self.pairs_.mu_lo
        for r in self.pairs_[(self.pairs_.source != "known") & (width > self.priors.mu_interval_warn)].itertuples():
            warnings.append(f"mu for {r.model_a} vs {r.model_b} is weakly identified: its {self.level:.0%} interval "
                            f"[{r.mu_lo:.3f}, {r.mu_hi:.3f}] is wider than {self.priors.mu_interval_warn:g}; "
                            "fix it in the config, give it a prior, or add gold votes")
        for r in self.pairs_[(self.pairs_.mu - 0.5).abs() < 0.02].itertuples():
            warnings.append(f"mu for {r.model_a} vs {r.model_b} is {r.mu:.3f}, close to 1/2: votes on this pair "
                            "say almost nothing about attentiveness")
        if stats.n_ties:
            warnings.append(f"{stats.n_ties} tie votes were counted and left out of the likelihood")
        self.warnings_ = warnings
        self.log_likelihood_ = gfit.log_likelihood
        self.n_iter_ = gfit.iterations
        self.converged_ = gfit.converged
        self.elapsed_ = elapsed
        self._device, self._dtype = dev, dt

    def _profiles(self) -> dict:
        labels = self.stats_.pair_labels()
        return {labels[p]: prof for p, prof in self.fit_.profiles.items()}

    # -- results ---------------------------------------------------------------------------------
    def n_inattentive(self) -> int:
        """Users whose posterior mean of eta is below the config's casual_threshold (default 1/2)."""
        return int((self.users_.eta_mean < self.priors.casual_threshold).sum())

    def prob_above(self, tau: float) -> np.ndarray:
        """P(eta_u > tau | votes) for every user, in the order of ``users_``."""
        if not 0 < tau < 1:
            raise InputError(f"tau must lie in (0, 1), got {tau}")
        mu = torch.as_tensor(self.fit_.mu, dtype=self._dtype, device=self._device)
        post = user_posterior(self._plan, None, self.fit_.a, self.fit_.b, mu, self.fit_.rho,
                              level=self.level, tau=tau, rho_prior=self.fit_.rho_prior, modes=False)
        return post.prob_above

    def params(self) -> dict:
        """The params.json document: per-pair mu with interval and votes, the eta prior, fit status."""
        s = self.stats_
        return {
            "method": self.method,
            "mu": [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                   for row in self.pairs_.to_dict(orient="records")],
            "eta_prior": self.eta_prior_,
            "position_bias": self.rho_,
            "profiles": {stats_label: prof for stats_label, prof in self._profiles().items()},
            "strengths": self.strengths_,
            "n_gold": s.n_gold,
            "log_likelihood": self.log_likelihood_,
            "objective": self.fit_.objective,
            "iterations": self.n_iter_,
            "converged": self.converged_,
            "warnings": self.warnings_,
            "interval_level": self.level,
            "n_rows": s.n_rows,
            "n_users": s.n_users,
            "n_votes": s.n_votes,
            "n_ties": s.n_ties,
            "n_pairs": s.n_pairs,
            "n_inattentive": self.n_inattentive(),
            "casual_threshold": self.priors.casual_threshold,
            "config": self.priors.source,
            "device": str(self._device),
            "dtype": str(self._dtype).replace("torch.", ""),
            "elapsed_s": round(self.elapsed_, 3),
            "timings_s": {k: round(v, 3) for k, v in getattr(self, "timings_", {}).items()},
            "heedful_version": __version__,
            **({"diagnostics": self.diagnostics_} if self.diagnostics_ else {}),
        }


__all__ = ["Attentiveness", "METHODS", "GlobalFit", "GlobalSpec", "QuadraturePlan", "UserPosterior"]
