"""The user behaviour model as Pyro programs: plain functions of tensors with named plates.

Generative story for vote n by user u on pair p (y_n = 1: the user picked the canonical model_a):

    mu_p  ~ Beta(alpha_p, beta_p)          P(model_a's answer is truly better); known mu: condition
    eta_u ~ Beta(a, b)                      attentiveness (the quality factor)
    z_n   ~ Bernoulli(eta_u)                attentive on this vote          (enumerated, never sampled)
    t_n   ~ Bernoulli(mu_p)                 model_a's answer truly better   (enumerated, never sampled)
    y_n   ~ Bernoulli(t_n if z_n else c)    c = 1/2: a casual user flips a coin

Summing z and t gives P(y_n = 1 | eta_u, mu_p) = eta_u mu_p + (1 - eta_u) c, the form the fast path
(:mod:`heedful.model.likelihood`) evaluates on counts. ``vote_model`` keeps every vote (for
TraceEnum_ELBO and infer_discrete); ``count_model`` is the same model collapsed to the (user, pair)
counts with z and t summed analytically and eta_u kept (for SVI and NUTS over every user);
``global_model`` also integrates eta out exactly and leaves only mu, a, b.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from heedful.model.likelihood import CASUAL, QuadraturePlan, log_marginal, pattern_loglik

_EPS = 1e-12  # keeps P(y = t | attentive) off 0 and 1 so log-probabilities stay finite


def vote_model(user: torch.Tensor, pair: torch.Tensor, y: torch.Tensor | None, *, n_users: int,
               n_pairs: int, a: torch.Tensor, b: torch.Tensor, mu_alpha: torch.Tensor,
               mu_beta: torch.Tensor, casual: float = CASUAL) -> None:
    """Vote-level program. ``user``/``pair``: long [N]; ``y``: float [N] of 0/1, or None to simulate.

    Condition on ``{"mu": value}`` (pyro.poutine.condition) for a known mu; a learned mu without a
    prior is Beta(1, 1).
    """
    with pyro.plate("pairs", n_pairs):
        mu = pyro.sample("mu", dist.Beta(mu_alpha, mu_beta))
    with pyro.plate("users", n_users):
        eta = pyro.sample("eta", dist.Beta(a, b))
    with pyro.plate("votes", user.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(eta[user]), infer={"enumerate": "parallel"})
        t = pyro.sample("t", dist.Bernoulli(mu[pair]), infer={"enumerate": "parallel"})
        attentive = t.clamp(_EPS, 1.0 - _EPS)
        p = torch.where(z.bool(), attentive, torch.full_like(attentive, casual))
        pyro.sample("y", dist.Bernoulli(p), obs=y)


def count_model(cell_user: torch.Tensor, cell_pair: torch.Tensor, k: torch.Tensor, n: torch.Tensor, *,
                n_users: int, n_pairs: int, a: torch.Tensor, b: torch.Tensor, mu_alpha: torch.Tensor,
                mu_beta: torch.Tensor, casual: float = CASUAL) -> None:
    """The same model on (user, pair) counts: z and t summed out, eta_u kept as a latent site."""
    with pyro.plate("pairs", n_pairs):
        mu = pyro.sample("mu", dist.Beta(mu_alpha, mu_beta))
    with pyro.plate("users", n_users):
        eta = pyro.sample("eta", dist.Beta(a, b))
    with pyro.plate("cells", cell_user.shape[0]):
        pyro.factor("votes", pattern_loglik(eta[cell_user], mu[cell_pair], k, n, casual))


def global_model(plan: QuadraturePlan, *, n_pairs: int, a: torch.Tensor, b: torch.Tensor,
                 mu_alpha: torch.Tensor, mu_beta: torch.Tensor) -> None:
    """Only the globals: eta and z integrated out exactly (Gauss-Jacobi) into one factor."""
    with pyro.plate("pairs", n_pairs):
        mu = pyro.sample("mu", dist.Beta(mu_alpha, mu_beta))
    pyro.factor("marginal", log_marginal(plan, a, b, mu))
