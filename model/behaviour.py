"""The user behaviour model as Pyro programs: plain functions of tensors with named plates.

Generative story for vote n by user u on pair p (y_n = 1: the user picked the canonical model_a):

    mu_p  ~ Beta(alpha_p, beta_p)          P(model_a's answer is truly better); known mu: condition
    eta_u ~ Beta(a, b)                      attentiveness (the quality factor)
    z_n   ~ Bernoulli(eta_u)                attentive on this vote          (enumerated, never sampled)
    t_n   ~ Bernoulli(mu_p)                 model_a's answer truly better   (enumerated, never sampled)
    rho_u ~ Beta(a_r, b_r)                  per-user position bias (optional; else one rho, or none)
    g_n   = t_n                             a gold label, where one is given (observed)
    y_n   ~ Bernoulli(t_n if z_n else c_n)  c_n = 1/2, or rho / 1 - rho when model_a was shown first / second

Summing z and t gives P(y_n | eta_u) = c + eta_u (m - c), the form the fast path
(:mod:`heedful.model.likelihood`) evaluates on counts. ``vote_model`` keeps every vote (for
TraceEnum_ELBO and infer_discrete); ``count_model`` is the same model collapsed to (user, kind)
counts with z and t summed analytically and eta_u kept (for SVI and NUTS over every user);
``global_model`` also integrates eta out exactly and leaves only the globals.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from heedful.model.likelihood import CASUAL, QuadraturePlan, cell_loglik, log_marginal

_EPS = 1e-12  # keeps P(y = t | attentive) off 0 and 1 so log-probabilities stay finite


def vote_model(user: torch.Tensor, pair: torch.Tensor, y: torch.Tensor | None, *, n_users: int, n_pairs: int,
               a: torch.Tensor, b: torch.Tensor, mu_alpha: torch.Tensor, mu_beta: torch.Tensor,
               first: torch.Tensor | None = None, gold: torch.Tensor | None = None,
               rho: torch.Tensor | float = CASUAL, rho_prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Vote-level program.

    ``user``/``pair``: long [N]; ``y``: float [N] of 0/1 (None to simulate); ``first``: long [N], 0 order
    unknown, 1 canonical model_a shown first, 2 model_b shown first; ``gold``: float [N], 1 / 0 for a gold
    label saying model_a / model_b is better, -1 for none. Condition on ``{"mu": value}`` for a known mu;
    a learned mu without a prior is Beta(1, 1).
    """
    with pyro.plate("pairs", n_pairs):
        mu = pyro.sample("mu", dist.Beta(mu_alpha, mu_beta))
    with pyro.plate("users", n_users):
        eta = pyro.sample("eta", dist.Beta(a, b))
        rho_u = pyro.sample("rho", dist.Beta(*rho_prior)) if rho_prior is not None else None
    with pyro.plate("votes", user.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(eta[user]), infer={"enumerate": "parallel"})
        t = pyro.sample("t", dist.Bernoulli(mu[pair]), infer={"enumerate": "parallel"})
        t_sharp = t.clamp(_EPS, 1.0 - _EPS)
        if gold is not None:
            with poutine.mask(mask=gold >= 0):
                pyro.sample("gold", dist.Bernoulli(t_sharp), obs=gold.clamp(min=0))
        casual = torch.full(user.shape, CASUAL, dtype=t.dtype)
        if first is not None:
            rho = torch.as_tensor(rho, dtype=t.dtype) if rho_u is None else rho_u[user]
            casual = torch.where(first == 1, rho, torch.where(first == 2, 1.0 - rho, casual))
        p = torch.where(z.bool(), t_sharp, casual)
        pyro.sample("y", dist.Bernoulli(p), obs=y)


def count_model(plan: QuadraturePlan, cells: dict[str, torch.Tensor], *, a: torch.Tensor, b: torch.Tensor,
                mu_alpha: torch.Tensor, mu_beta: torch.Tensor, rho: torch.Tensor | None = None,
                rho_prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The same model on (user, kind) counts: z and t summed out, eta_u (and rho_u) kept as latent sites."""
    with pyro.plate("pairs", plan.n_pairs):
        mu = pyro.sample("mu", dist.Beta(mu_alpha, mu_beta))
    with pyro.plate("users", plan.n_users):
        eta = pyro.sample("eta", dist.Beta(a, b))
        if rho_prior is not None:
            rho = pyro.sample("rho", dist.Beta(*rho_prior))
    pyro.factor("gold", (torch.xlogy(plan.gold_a, mu) + torch.xlogy(plan.gold_n - plan.gold_a, 1 - mu)).sum())
    with pyro.plate("cells", cells["cell_user"].shape[0]):
        pyro.factor("votes", cell_loglik(eta, mu, rho, plan, cells))


def global_model(plan: QuadraturePlan, *, a: torch.Tensor, b: torch.Tensor, mu_alpha: torch.Tensor,
                 mu_beta: torch.Tensor, rho: torch.Tensor | None = None,
                 rho_prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Only the globals: eta (and rho_u), z and t integrated out exactly (Gauss-Jacobi) into one factor."""
    with pyro.plate("pairs", plan.n_pairs):
        mu = pyro.sample("mu", dist.Beta(mu_alpha, mu_beta))
    pyro.factor("marginal", log_marginal(plan, a, b, mu, rho, rho_prior))
