"""The global parameters (eta prior a, b and each pair's mu): which are free, and their packing.

Free parameters are optimised in an unconstrained vector theta = [log a, log b] (when the population
prior is learned) + [logit mu_p for every pair whose mu is not known]. Config pairs are oriented to
the canonical order of :mod:`heedful.suffstats` (mu -> 1 - mu, Beta(s, t) -> Beta(t, s) if reversed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from heedful.config import Priors
from heedful.suffstats import VoteStats


@dataclass
class GlobalSpec:
    n_pairs: int
    eta_fixed: tuple[float, float] | None       # None: a and b are learned
    mu_known: np.ndarray                        # [P], nan where mu is not known
    mu_alpha: np.ndarray                        # [P] Beta prior on mu (1, 1: flat)
    mu_beta: np.ndarray
    mu_source: list[str]                        # "known" | "prior" | "learned"
    warnings: list[str] = field(default_factory=list)

    @property
    def free_mu(self) -> np.ndarray:
        return np.isnan(self.mu_known)

    @property
    def n_free(self) -> int:
        return (0 if self.eta_fixed else 2) + int(self.free_mu.sum())

    def unpack(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """theta -> (a, b, mu[P]) as differentiable tensors."""
        dt, dev = theta.dtype, theta.device
        if self.eta_fixed is None:
            a, b = torch.exp(theta[0]), torch.exp(theta[1])
            rest = theta[2:]
        else:
            a = torch.tensor(self.eta_fixed[0], dtype=dt, device=dev)
            b = torch.tensor(self.eta_fixed[1], dtype=dt, device=dev)
            rest = theta
        mu = torch.as_tensor(np.nan_to_num(self.mu_known, nan=0.5), dtype=dt, device=dev)
        free = torch.as_tensor(self.free_mu, device=dev)
        if bool(free.any()):
            mu = mu.masked_scatter(free, torch.sigmoid(rest))
        return a, b, mu

    def pack(self, a: float, b: float, mu: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        parts = [] if self.eta_fixed else [np.log([a, b])]
        m = np.clip(np.asarray(mu, dtype=float)[self.free_mu], 1e-6, 1 - 1e-6)
        parts.append(np.log(m) - np.log1p(-m))
        return torch.as_tensor(np.concatenate(parts), dtype=dtype, device=device)

    def theta_names(self, pair_labels: list[str]) -> list[str]:
        names = [] if self.eta_fixed else ["log_a", "log_b"]
        return names + [f"logit_mu[{pair_labels[p]}]" for p in np.flatnonzero(self.free_mu)]

    def log_mu_prior(self, mu: torch.Tensor) -> torch.Tensor:
        """sum_p log Beta(mu_p; alpha_p, beta_p) over pairs with a prior (no Jacobian: MAP in mu)."""
        has = torch.as_tensor(np.array([s == "prior" for s in self.mu_source]), device=mu.device)
        if not bool(has.any()):
            return mu.new_zeros(())
        al = torch.as_tensor(self.mu_alpha, dtype=mu.dtype, device=mu.device)
        be = torch.as_tensor(self.mu_beta, dtype=mu.dtype, device=mu.device)
        lp = torch.xlogy(al - 1, mu) + torch.xlogy(be - 1, 1 - mu) - (torch.lgamma(al) + torch.lgamma(be)
                                                                        - torch.lgamma(al + be))
        return (lp * has).sum()


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
    return GlobalSpec(P, priors.eta, known, alpha, beta, source, warnings)


def initial_mu(stats: VoteStats, spec: GlobalSpec, eta_guess: float = 0.5) -> np.ndarray:
    """Start mu from each pair's rate of canonical-A picks r: mu0 = 1/2 + (r - 1/2) / eta_guess."""
    n = np.maximum(stats.pair_votes(), 1)
    r = (stats.pair_a_votes() + 0.5) / (n + 1.0)
    mu0 = np.clip(0.5 + (r - 0.5) / eta_guess, 0.05, 0.95)
    mu0 = np.where(np.abs(mu0 - 0.5) < 0.02, 0.5 + 0.02 * np.sign(mu0 - 0.5 + 1e-12), mu0)
    return np.where(np.isnan(spec.mu_known), mu0, spec.mu_known)
