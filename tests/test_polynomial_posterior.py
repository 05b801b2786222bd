"""Exact posterior summaries where the density is a polynomial (integer a, b; EM's posterior), against adaptive
quadrature; the Chebyshev operators against exact polynomial arithmetic."""

import numpy as np
import pandas as pd
import pytest
import torch
from numpy.polynomial import Polynomial
from scipy import integrate, optimize
from test_posterior import _spread_votes, _with_gold

from heedful.inference import polynomial_posterior
from heedful.inference.posterior import user_posterior
from heedful.model.likelihood import build_plan
from heedful.model.quadrature import chebyshev_operators
from heedful.suffstats import vote_stats

F64 = torch.float64
MU = {("A", "B"): 0.8, ("C", "D"): 0.65}


@pytest.mark.parametrize("n", [1, 2, 5, 11, 40, 65])
def test_the_chebyshev_operators_give_integrals_moments_and_coefficients_of_a_polynomial(n):
    rng = np.random.default_rng(n)
    poly = Polynomial(rng.normal(size=n))                          # degree n - 1
    t, W = chebyshev_operators(n)
    assert np.all((t > 0) & (t < 1))
    out = W @ poly(t)
    prim = [(poly * Polynomial([0, 1]) ** k).integ() for k in range(4)]
    scale = np.abs(poly.coef).sum()
    for k in range(4):                                             # Z, int t p, int t^2 p, int t^3 p
        assert out[k] == pytest.approx(prim[k](1.0) - prim[k](0.0), abs=1e-12 * scale)
    x = np.linspace(0, 1, 17)
    cdf, dens = out[4:n + 5], out[n + 5:]
    np.testing.assert_allclose(np.polynomial.chebyshev.chebval(2 * x - 1, cdf), prim[0](x) - prim[0](0.0),
                               rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(np.polynomial.chebyshev.chebval(2 * x - 1, dens), poly(x), rtol=0, atol=1e-12 * scale)


def _reference(d: pd.DataFrame, a: float, b: float, rho: float | None, tau: float) -> dict[str, float]:
    """Mean, sd, 5% and 95% quantiles and P(eta > tau) of one user's posterior by adaptive quadrature."""
    y = (d.choice == "a").to_numpy()
    pm = np.array([MU[(ma, mb)] for ma, mb in zip(d.model_a, d.model_b, strict=True)])
    m = np.where(y, pm, 1 - pm)
    if "gold" in d:
        m = np.where(d.gold.isna(), m, np.where(d.gold == d.choice, 1.0, 0.0))
    c = np.full(len(d), 0.5) if rho is None else np.where(y == (d.shown_first == "a").to_numpy(), rho, 1 - rho)

    def dens(e):
        return np.prod(c + e * (m - c)) * e ** (a - 1) * (1 - e) ** (b - 1)

    def quad(f, lo, hi):
        return integrate.quad(f, lo, hi, limit=200, epsabs=1e-15, epsrel=1e-13)[0]

    z = quad(dens, 0, 1)
    mean = quad(lambda e: e * dens(e), 0, 1) / z
    var = quad(lambda e: (e - mean) ** 2 * dens(e), 0, 1) / z

    def cdf(t):
        return quad(dens, 0, t) / z if t <= 0.5 else 1 - quad(dens, t, 1) / z

    return {"mean": mean, "sd": np.sqrt(var), "tail": 1 - cdf(tau),
            "lo": optimize.brentq(lambda t: cdf(t) - 0.05, 0, 1, xtol=1e-15),
            "hi": optimize.brentq(lambda t: cdf(t) - 0.95, 0, 1, xtol=1e-15)}


def _spy(monkeypatch) -> list[tuple[int, bool]]:
    """Record (the bucket's n_max, whether the exact summaries were kept) of each polynomial pass."""
    calls = []
    real = polynomial_posterior.polynomial_summaries

    def spy(bk, *args):
        got = real(bk, *args)
        calls.append((bk.max_votes, got is not None))
        return got

    monkeypatch.setattr(polynomial_posterior, "polynomial_summaries", spy)
    return calls


@pytest.mark.parametrize("a, b, rho, tau, gold", [(1.0, 1.0, None, 0.5, False), (2.0, 3.0, 0.7, 0.55, True),
                                                  (1.0, 4.0, None, 0.3, True), (3.0, 1.0, 0.6, 0.9, False)])
def test_the_summaries_are_exact_against_adaptive_quadrature(monkeypatch, a, b, rho, tau, gold):
    """1 to 60 votes, a position bias, gold labels (factors vanishing at an end): every bucket takes the
    polynomial path and every summary is within 1e-10 of adaptive quadrature (the grid: 1e-6)."""
    df = _spread_votes([1, 2, 3, 5, 9, 14, 20, 33, 45, 60] * 2, seed=7)
    df = _with_gold(df, seed=8) if gold else df
    st = vote_stats(df)
    plan = build_plan(st, torch.device("cpu"), F64)
    calls = _spy(monkeypatch)
    post = user_posterior(plan, None, a, b, torch.tensor([MU[p] for p in st.pairs], dtype=F64), rho, tau=tau,
                          modes=False)
    assert len(calls) == len(plan.buckets) and all(kept for _, kept in calls), calls
    for u in range(st.n_users):
        ref = _reference(df[df.user_id == st.users[u]], a, b, rho, tau)
        for ours, theirs in (("mean", "mean"), ("sd", "sd"), ("lo", "lo"), ("hi", "hi"), ("prob_above", "tail")):
            assert getattr(post, ours)[u] == pytest.approx(ref[theirs], abs=1e-10), (u, ours)


def test_only_integer_priors_without_modes_and_light_buckets_take_the_polynomial_path(monkeypatch):
    """A bucket of degree above MAX_DEGREE, a non-integer prior, and modes asked for all keep the grid."""
    st = vote_stats(_spread_votes([3, 9, 300], seed=3))
    plan = build_plan(st, torch.device("cpu"), F64)
    mu = torch.tensor([MU[p] for p in st.pairs], dtype=F64)
    calls = _spy(monkeypatch)
    user_posterior(plan, None, 1.0, 1.0, mu, None, modes=False)
    heavy = [bk.max_votes for bk in plan.buckets if bk.max_votes + 1.0 + 1.0 - 2 > polynomial_posterior.MAX_DEGREE]
    assert heavy and calls and not any(n in heavy for n, _ in calls), (heavy, calls)
    calls.clear()
    user_posterior(plan, None, 1.5, 1.0, mu, None, modes=False)
    user_posterior(plan, None, 1.0, 1.0, mu, None, modes=True)
    assert not calls


def test_a_newton_iteration_that_does_not_settle_gives_the_bucket_to_the_grid(monkeypatch):
    """No step settles (XTOL below zero): the polynomial path gives up and the summaries are the grid's."""
    st = vote_stats(_spread_votes([1, 4, 9, 20] * 5, seed=1))
    plan = build_plan(st, torch.device("cpu"), F64)
    args = (plan, None, 1.0, 2.0, torch.tensor([MU[p] for p in st.pairs], dtype=F64), None)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(polynomial_posterior, "XTOL", -1.0)
    given_up = user_posterior(*args, tau=0.5, modes=False)
    assert calls and not any(kept for _, kept in calls)
    monkeypatch.setattr(polynomial_posterior, "MAX_DEGREE", -1)
    grid = user_posterior(*args, tau=0.5, modes=False)
    for f in ("mean", "sd", "lo", "hi", "prob_above"):
        np.testing.assert_array_equal(getattr(given_up, f), getattr(grid, f), err_msg=f)


def test_the_summaries_do_not_depend_on_the_chunks(monkeypatch):
    st = vote_stats(_spread_votes([1, 2, 5, 9, 14] * 7, seed=4))
    plan = build_plan(st, torch.device("cpu"), F64)
    args = (plan, None, 1.0, 1.0, torch.tensor([MU[p] for p in st.pairs], dtype=F64), 0.55)
    whole = user_posterior(*args, tau=0.4, modes=False)
    monkeypatch.setattr(polynomial_posterior, "ROWS", 3)
    chunked = user_posterior(*args, tau=0.4, modes=False)
    for f in ("mean", "sd", "lo", "hi", "prob_above"):
        np.testing.assert_allclose(getattr(chunked, f), getattr(whole, f), rtol=0, atol=1e-14, err_msg=f)
