"""SVI: per-user logit-normal posteriors close to the exact posterior, subsampling, InferenceData."""

import numpy as np
import pytest
import torch
from scipy import special

from heedful.config import PairPrior, Priors
from heedful.inference import Attentiveness
from heedful.inference.svi import logit_normal_summaries
from heedful.simulate import simulate

KNOWN = Priors(pairs=(PairPrior("strong-model", "weak-model", mu=0.8),))


@pytest.fixture(scope="module")
def data():
    sim = simulate(2000, 20, seed=11)
    return sim, Attentiveness("marginal", KNOWN).fit(sim.votes)


def test_svi_matches_the_exact_posterior(data):
    sim, exact = data
    m = Attentiveness("svi", KNOWN, options={"seed": 0}).fit(sim.votes)
    assert m.converged_ and m.diagnostics_["steps"] < 3000
    assert np.mean(np.abs(m.users_.eta_mean - exact.users_.eta_mean)) < 0.02
    assert m.eta_prior_["a"] / (m.eta_prior_["a"] + m.eta_prior_["b"]) == pytest.approx(
        exact.eta_prior_["mean"], abs=0.02)
    w_svi = m.users_.eta_hi - m.users_.eta_lo
    w_exact = exact.users_.eta_hi - exact.users_.eta_lo
    assert np.median(w_svi / w_exact) == pytest.approx(1.0, abs=0.1)
    assert np.isfinite(m.diagnostics_["elbo_per_vote"]).all()
    idata = m.inference_data_
    for group in ("posterior", "observed_data", "log_likelihood", "posterior_predictive"):
        assert group in idata.groups()
    assert idata.posterior["eta"].shape[:2] == (1, 1000)


def test_svi_one_row_per_user_subsampled_agrees_with_tied(data):
    """A guide row per user (8 draws each a step), half of those rows a step (factor scaled by rows / batch),
    against tied rows."""
    sim, exact = data
    tied = Attentiveness("svi", KNOWN, options={"seed": 1}).fit(sim.votes)
    assert tied.diagnostics_["tied"] and tied.diagnostics_["guide_groups"] < 100
    own = Attentiveness("svi", KNOWN, options={"seed": 1, "batch_size": 8000, "tie": False}).fit(sim.votes)
    assert not own.diagnostics_["tied"] and own.diagnostics_["batch_size"] == 8000
    # noisier than tied rows (each user sees ~4 draws a step here): measured 0.037 against the exact means
    assert np.mean(np.abs(own.users_.eta_mean - exact.users_.eta_mean)) < 0.05
    assert np.mean(np.abs(own.users_.eta_mean - tied.users_.eta_mean)) < 0.05
    assert np.mean(np.abs(tied.users_.eta_mean - exact.users_.eta_mean)) < 0.02


def test_svi_normal_globals_and_logit_normal_guide():
    sim = simulate(1500, 20, seed=12)
    m = Attentiveness("svi", Priors(), options={"seed": 2, "globals": "normal", "draws": 300,
                                                "guide": "logit-normal"}).fit(sim.votes)
    mu = m.inference_data_.posterior["mu"].values.ravel()
    assert mu.std() > 0 and 0.6 < mu.mean() < 0.99
    assert (m.users_.eta_lo < m.users_.eta_mean).all() and (m.users_.eta_mean < m.users_.eta_hi).all()


def test_logit_normal_summaries_against_monte_carlo():
    loc, scale = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.2, 0.8], dtype=torch.float64)
    s = logit_normal_summaries(loc, scale, 0.9)
    x = special.expit(np.random.default_rng(0).normal(loc.numpy(), scale.numpy(), size=(400_000, 3)))
    np.testing.assert_allclose(s.mean, x.mean(0), atol=2e-3)
    np.testing.assert_allclose(s.sd, x.std(0), atol=2e-3)
    np.testing.assert_allclose(s.lo, np.quantile(x, 0.05, axis=0), atol=3e-3)
    np.testing.assert_allclose(s.hi, np.quantile(x, 0.95, axis=0), atol=3e-3)
