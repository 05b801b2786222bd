"""The global parameters and their packing into one unconstrained vector theta.

theta = [log a, log b]          when the population prior is learned
      + [logit rho]             when casual users' position bias is learned
      + [logit mu_p ...]        per pair whose mu is not known        (mu = "pairs", the default)
      | [s_m ...]               strength of every model but the reference (mu = "strengths"):
                                mu_AB = sigmoid(s_A - s_B), s_reference = 0
Config pairs are oriented to the canonical order of :mod:`heedful.suffstats` (mu -> 1 - mu,
Beta(s, t) -> Beta(t, s) when the config lists the pair the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from heedful.config import Priors
from heedful.errors import ConfigError
from heedful.suffstats import VoteStats


class Globals(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor
    mu: torch.Tensor               # [P]
    rho: torch.Tensor | None       # one rho for every casual user; None: a fair coin (or per-user rho)
    rho_prior: tuple[torch.Tensor, torch.Tensor] | None = None   # Beta(a_r, b_r) of a per-user rho_u


@dataclass
class GlobalSpec:
    n_pairs: int
    eta_fixed: tuple[float, float] | None       # None: a and b are learned
    mu_known: np.ndarray                        # [P], nan where mu is not known
    mu_alpha: np.ndarray                        # [P] Beta prior on mu (1, 1: flat)
    mu_beta: np.ndarray
    mu_source: list[str]                        # "known" | "prior" | "learned" | "strengths"
    position: bool = False                      # casual users favour the first-shown answer
    rho_fixed: float | None = None              # known rho (with position=True)
    rho_prior: tuple[float, float] = (1.0, 1.0)
    rho_user: bool = False                      # rho_u per user ~ Beta(a_r, b_r)
    rho_user_fixed: tuple[float, float] | None = None   # None: a_r, b_r learned
    strengths: bool = False
    pair_models: np.ndarray | None = None       # [P, 2] model index of canonical a, b
    models: list[str] = field(default_factory=list)
    reference: int = 0
    strength_sd: float = 0.0                    # Normal(0, sd) prior on strengths; 0: flat
    warnings: list[str] = field(default_factory=list)

    @property
    def free_mu(self) -> np.ndarray:
        return np.isnan(self.mu_known) & (not self.strengths)

    @property
    def learn_rho(self) -> bool:
        return self.position and not self.rho_user and self.rho_fixed is None

    @property
    def learn_rho_user(self) -> bool:
        return self.rho_user and self.rho_user_fixed is None

    @property
    def n_free(self) -> int:
        n_mu = len(self.models) - 1 if self.strengths else int(self.free_mu.sum())
        return (0 if self.eta_fixed else 2) + int(self.learn_rho) + 2 * int(self.learn_rho_user) + n_mu

    def unpack(self, theta: torch.Tensor) -> Globals:
        """theta -> (a, b, mu[P], rho) as differentiable tensors."""
        dt, dev = theta.dtype, theta.device
        i = 0
        if self.eta_fixed is None:
            a, b = torch.exp(theta[0]), torch.exp(theta[1])
            i = 2
        else:
            a = torch.tensor(self.eta_fixed[0], dtype=dt, device=dev)
            b = torch.tensor(self.eta_fixed[1], dtype=dt, device=dev)
        rho, rho_prior = None, None
        if self.learn_rho:
            rho = torch.sigmoid(theta[i])
            i += 1
        elif self.rho_user:
            if self.learn_rho_user:
                rho_prior = (torch.exp(theta[i]), torch.exp(theta[i + 1]))
                i += 2
            else:
                rho_prior = tuple(torch.tensor(v, dtype=dt, device=dev) for v in self.rho_user_fixed)
        elif self.position:
            rho = torch.tensor(self.rho_fixed, dtype=dt, device=dev)
        rest = theta[i:]
        if self.strengths:
            s = torch.cat([rest[: self.reference], rest.new_zeros(1), rest[self.reference:]])
            pm = torch.as_tensor(self.pair_models, device=dev)
            mu = torch.sigmoid(s[pm[:, 0]] - s[pm[:, 1]])
        else:
            mu = torch.as_tensor(np.nan_to_num(self.mu_known, nan=0.5), dtype=dt, device=dev)
            free = torch.as_tensor(self.free_mu, device=dev)
            if bool(free.any()):
                mu = mu.masked_scatter(free, torch.sigmoid(rest))
        return Globals(a, b, mu, rho, rho_prior)

    def pack(self, a: float, b: float, mu: np.ndarray, rho: float | None, dtype: torch.dtype,
             device: torch.device, rho_prior: tuple[float, float] = (2.0, 2.0)) -> torch.Tensor:
        parts = [] if self.eta_fixed else [np.log([a, b])]
        if self.learn_rho:
            r = float(np.clip(0.5 if rho is None else rho, 1e-6, 1 - 1e-6))
            parts.append([np.log(r) - np.log1p(-r)])
        if self.learn_rho_user:
            parts.append(np.log(rho_prior))
        if self.strengths:
            parts.append(self._strengths_from_mu(np.asarray(mu, dtype=float)))
        else:
            m = np.clip(np.asarray(mu, dtype=float)[self.free_mu], 1e-6, 1 - 1e-6)
            parts.append(np.log(m) - np.log1p(-m))
        return torch.as_tensor(np.concatenate([np.asarray(p, dtype=float) for p in parts]), dtype=dtype, device=device)

    def _strengths_from_mu(self, mu: np.ndarray) -> np.ndarray:
        """Least-squares strengths with logit(mu_AB) = s_A - s_B and s_reference = 0."""
        M = len(self.models)
        X = np.zeros((self.n_pairs, M))
        X[np.arange(self.n_pairs), self.pair_models[:, 0]] = 1
        X[np.arange(self.n_pairs), self.pair_models[:, 1]] = -1
        keep = [m for m in range(M) if m != self.reference]
        m = np.clip(mu, 0.02, 0.98)
        s, *_ = np.linalg.lstsq(X[:, keep], np.log(m) - np.log1p(-m), rcond=None)
        return s

    def theta_names(self, pair_labels: list[str]) -> list[str]:
        names = [] if self.eta_fixed else ["log_a", "log_b"]
        names += ["logit_rho"] if self.learn_rho else []
        names += ["log_a_rho", "log_b_rho"] if self.learn_rho_user else []
        if self.strengths:
            return names + [f"strength[{m}]" for i, m in enumerate(self.models) if i != self.reference]
        return names + [f"logit_mu[{pair_labels[p]}]" for p in np.flatnonzero(self.free_mu)]

    def log_prior(self, theta: torch.Tensor, g: Globals) -> torch.Tensor:
        """log-priors of the globals that have one (MAP in the natural parameters, no Jacobian)."""
        mu = g.mu
        lp = mu.new_zeros(())
        has = torch.as_tensor(np.array([s == "prior" for s in self.mu_source]), device=mu.device)
        if bool(has.any()):
            al = torch.as_tensor(self.mu_alpha, dtype=mu.dtype, device=mu.device)
            be = torch.as_tensor(self.mu_beta, dtype=mu.dtype, device=mu.device)
            lb = torch.lgamma(al) + torch.lgamma(be) - torch.lgamma(al + be)
            lp = lp + ((torch.xlogy(al - 1, mu) + torch.xlogy(be - 1, 1 - mu) - lb) * has).sum()
        if self.learn_rho and self.rho_prior != (1.0, 1.0):
            ra, rb = self.rho_prior
            lp = lp + (ra - 1) * torch.log(g.rho) + (rb - 1) * torch.log1p(-g.rho)
        if self.strengths and self.strength_sd > 0:
            s = theta[self.n_free - (len(self.models) - 1):]
            lp = lp - 0.5 * (s * s).sum() / self.strength_sd ** 2
        return lp


def global_spec(stats: VoteStats, priors: Priors) -> GlobalSpec:
    P = stats.n_pairs
    known = np.full(P, np.nan)
    alpha, beta = np.ones(P), np.ones(P)
    source = ["learned"] * P
    warnings = []
    for pp in priors.pairs:
        hit = stats.pair_index(pp.model_a, pp.model_b)
        if hit is None:
            warnings.append(f"config pair {pp.model_a} vs {pp.model_b} never occurs in the votes; ignored")
            continue
        p, flipped = hit
        o = pp.oriented(flipped)
        if o.mu is not None:
            known[p], source[p] = o.mu, "known"
        elif o.beta is not None:
            alpha[p], beta[p] = o.beta
            source[p] = "prior"
    position = priors.casual == "position"
    if position and not stats.has_order:
        raise ConfigError("behaviour.casual = \"position\" needs a shown_first column (a | b) in the votes")
    spec = GlobalSpec(P, priors.eta, known, alpha, beta, source, position=position, rho_fixed=priors.rho,
                      rho_prior=priors.rho_prior, rho_user=position and priors.rho_user is not None,
                      rho_user_fixed=priors.rho_user if isinstance(priors.rho_user, tuple) else None,
                      warnings=warnings)
    if priors.mu_model == "strengths":
        if priors.pairs:
            raise ConfigError("[generators] mu = \"strengths\" learns every pair's mu from model strengths; "
                              "remove the [[pairs]] entries or use mu = \"pairs\"")
        models = stats.models()
        ref = priors.reference or models[0]
        if ref not in models:
            raise ConfigError(f"[generators] reference = {ref!r} is not a model in the votes")
        index = {m: i for i, m in enumerate(models)}
        spec.strengths, spec.models, spec.reference = True, models, index[ref]
        spec.pair_models = np.array([[index[a], index[b]] for a, b in stats.pairs], dtype=np.int64).reshape(-1, 2)
        spec.strength_sd = priors.strength_sd
        spec.mu_source = ["strengths"] * P
    return spec


# fewest users in a warm start's random sample. 8,192 rather than 65,536: 1M users then climb through
# 125k and 15.6k (the bottom level's Newton steps cost a tenth), marginal 2.6 -> 2.1-2.5 s, EM 3.8 -> 3.7 s
# at 10M votes, and 100k users warm-start too (0.67 -> 0.51 s, 0.44 -> 0.27 s); the maxima agree to 1e-8
WARM_USERS = 1 << 13
WARM_FACTOR = 8         # ... a 1 / WARM_FACTOR sample, used from WARM_FACTOR x WARM_USERS users on
WARM_PAIR_VOTES = 200   # ... when it has at least this many votes on every pair with a free mu


def warm_sample(stats: VoteStats, spec: GlobalSpec) -> VoteStats | None:
    """A random 1 / WARM_FACTOR of the users (at least WARM_USERS) whose fit starts the full one, or None
    when the data has fewer than WARM_FACTOR x WARM_USERS users or the sample is thin on a free pair."""
    if stats.n_users < WARM_FACTOR * WARM_USERS:
        return None
    sample = stats.sample_users(max(WARM_USERS, stats.n_users // WARM_FACTOR), seed=0)
    return None if (sample.pair_votes()[spec.free_mu] < WARM_PAIR_VOTES).any() else sample


def initial_mu(stats: VoteStats, spec: GlobalSpec, eta_guess: float = 0.5) -> np.ndarray:
    """Start mu from each pair's rate of canonical-A picks r: mu0 = 1/2 + (r - 1/2) / eta_guess."""
    n = np.maximum(stats.pair_votes(), 1)
    r = (stats.pair_a_votes() + 0.5) / (n + 1.0)
    mu0 = np.clip(0.5 + (r - 0.5) / eta_guess, 0.05, 0.95)
    mu0 = np.where(np.abs(mu0 - 0.5) < 0.02, 0.5 + 0.02 * np.sign(mu0 - 0.5 + 1e-12), mu0)
    with np.errstate(invalid="ignore"):
        gold_rate = stats.gold_a / np.maximum(stats.gold_n, 1)
    mu0 = np.where(stats.gold_n >= 5, np.clip(gold_rate, 0.05, 0.95), mu0)
    return np.where(np.isnan(spec.mu_known), mu0, spec.mu_known)
