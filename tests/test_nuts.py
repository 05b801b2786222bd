"""NUTS: the collapsed form's pieces against the core's exact marginal and posterior, the two forms against
each other, per-vote attentiveness against the closed form, and the InferenceData it writes."""

import numpy as np
import pandas as pd
import pytest
import torch
from pyro.infer.mcmc.util import initialize_model

from heedful.config import PairPrior, Priors
from heedful.inference import Attentiveness
from heedful.inference import nuts as N
from heedful.inference.diagnostics import nuts_warnings
from heedful.inference.globals import global_spec
from heedful.inference.posterior import user_posterior
from heedful.model.likelihood import build_plan, log_marginal
from heedful.outputs import write_inference_data
from heedful.simulate import default_pairs, simulate
from heedful.suffstats import vote_stats

CPU, F64 = torch.device("cpu"), torch.float64


def _setup(votes: pd.DataFrame, priors: Priors):
    stats = vote_stats(votes)
    spec = global_spec(stats, priors)
    plan = build_plan(stats, CPU, F64)
    cells = N.user_cells(stats, spec, CPU, F64, plan.kinds)
    return stats, spec, plan, cells


def _rich_votes(seed: int = 0, users: int = 150) -> pd.DataFrame:
    """Three pairs, varying votes per user, shown-first order and some gold labels."""
    v = simulate(users, 8, pairs=default_pairs(3, 0.8), vote_counts="geometric", seed=seed).votes
    rng = np.random.default_rng(seed)
    gold = np.where(rng.random(len(v)) < 0.1, v.true_better, None)
    return v.assign(gold=gold)


@pytest.mark.parametrize("casual", ["uniform", "position"])
def test_grid_marginal_equals_gauss_jacobi(casual):
    stats, spec, plan, cells = _setup(_rich_votes(), Priors(casual=casual))
    grid = N.signature_grid(cells)
    assert grid.n_sig < stats.n_users
    mu = torch.tensor([0.7, 0.85, 0.6], dtype=F64)
    for a, b in [(3.0, 5.0), (0.4, 0.7), (20.0, 2.0)]:
        g = N.Globals(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64), mu,
                      torch.tensor(0.7, dtype=F64) if casual == "position" else None)
        exact = float(log_marginal(plan, *g))
        assert float(grid.log_marginal(g)) == pytest.approx(exact, rel=1e-8, abs=1e-6)
        assert float(N.CollapsedPotential(grid, spec).log_marginal(g)) == pytest.approx(exact, rel=1e-8, abs=1e-6)


@pytest.mark.parametrize("exact", [False, True])
def test_collapsed_potential_is_the_pyro_model_density(exact):
    """The hand-written potential equals -log density of ``collapsed_model`` under Pyro's own transforms,
    with the marginal on the signature grid or (as ``fit_nuts`` uses it) by Gauss-Jacobi through the plan."""
    stats, spec, plan, cells = _setup(_rich_votes(1), Priors(casual="position", pairs=(
        PairPrior("model-00", "model-01", beta=(8.0, 2.0)),)))
    grid = N.signature_grid(cells)
    fast = plan if exact else None
    _, pyro_potential, _, _ = initialize_model(N.collapsed_model, (grid, spec, fast))
    pot = N.CollapsedPotential(grid, spec, fast)
    rng = np.random.default_rng(0)
    for _ in range(3):
        z = {"eta_mean": torch.tensor(rng.normal(), dtype=F64), "eta_conc": torch.tensor(rng.normal(1, 1), dtype=F64),
             "rho": torch.tensor(rng.normal(), dtype=F64), "mu_free": torch.as_tensor(rng.normal(1, 0.5, 3))}
        assert float(pot(z)) == pytest.approx(float(pyro_potential(z)), rel=1e-10)


def test_conditional_draws_follow_the_exact_posterior():
    """With the globals fixed, inverse-CDF draws of eta reproduce the core's exact per-user posterior."""
    stats, spec, plan, cells = _setup(_rich_votes(2, users=50), Priors())
    grid = N.signature_grid(cells)
    a, b, mu = 2.0, 3.0, torch.tensor([0.7, 0.85, 0.6], dtype=F64)
    D = 2000
    draws = {"a": torch.full((1, D), a, dtype=F64), "b": torch.full((1, D), b, dtype=F64),
             "mu": mu.expand(1, D, 3).clone()}
    users = torch.arange(stats.n_users)
    eta, post = N.conditional_eta(grid, draws, spec, users, 0.9, seed=0)
    exact = user_posterior(plan, stats.tensors(CPU, F64), a, b, mu, None, level=0.9)
    np.testing.assert_allclose(post.mean, exact.mean, atol=1e-6)        # the same quadrature, exact
    np.testing.assert_allclose(post.lo, exact.lo, atol=4e-3)
    np.testing.assert_allclose(post.hi, exact.hi, atol=4e-3)
    e = eta[0].double().numpy()
    se = exact.sd / np.sqrt(D)
    assert np.mean(np.abs(e.mean(0) - exact.mean) < 4 * se + 1e-3) > 0.99
    inside = ((e >= exact.lo) & (e <= exact.hi)).mean()
    assert inside == pytest.approx(0.9, abs=0.015)


def _fit(votes, priors, **opt):
    return Attentiveness("nuts", priors, options={"chains": 2, "seed": 3, **opt}).fit(votes)


def test_collapsed_and_full_forms_agree():
    """Same joint posterior two ways: eta_u sampled by NUTS, or drawn exactly given NUTS's globals."""
    votes = simulate(30, 15, eta_prior=(3.0, 3.0), seed=4).votes
    priors = Priors(eta=(3.0, 3.0), pairs=(PairPrior("strong-model", "weak-model", beta=(8.0, 2.0)),))
    full = _fit(votes, priors, form="full", draws=400, warmup=150, chains=1)
    coll = _fit(votes, priors, form="collapsed", draws=500, warmup=200, chains=1)
    assert full.diagnostics_["form"] == "full" and coll.diagnostics_["form"] == "collapsed"
    assert abs(full.pairs_.mu[0] - coll.pairs_.mu[0]) < 0.02
    d = np.abs(full.users_.eta_mean - coll.users_.eta_mean)
    assert d.mean() < 0.015 and d.max() < 0.05
    w_f = full.users_.eta_hi - full.users_.eta_lo
    w_c = coll.users_.eta_hi - coll.users_.eta_lo
    assert np.median(w_f / w_c) == pytest.approx(1.0, abs=0.08)


def test_nuts_recovers_globals_and_writes_inference_data(tmp_path):
    sim = simulate(800, 20, seed=5)
    priors = Priors(pairs=(PairPrior("strong-model", "weak-model", mu=0.8),))
    m = _fit(sim.votes, priors, draws=300, warmup=200)
    d = m.diagnostics_
    assert d["form"] == "collapsed" and d["divergences"] == 0 and d["max_r_hat"] < 1.05
    assert {"a", "b"} <= set(d["globals"])
    marg = Attentiveness("marginal", priors).fit(sim.votes)
    assert np.mean(np.abs(marg.users_.eta_mean - m.users_.eta_mean)) < 0.01

    def coverage(model):
        u = model.users_.merge(sim.users, on="user_id")
        return np.mean((u.true_eta >= u.eta_lo) & (u.true_eta <= u.eta_hi))

    # coverage varies with the estimated (a, b) from data set to data set; NUTS adds their uncertainty
    assert 0.84 <= coverage(m) <= 0.98 and abs(coverage(m) - coverage(marg)) < 0.03
    idata = m.inference_data_
    for group in ("posterior", "sample_stats", "observed_data", "log_likelihood", "posterior_predictive", "prior"):
        assert group in idata.groups()
    assert idata.posterior["eta"].shape == (2, 300, 800)
    assert idata.log_likelihood["votes"].shape == (2, 300, 800)
    assert idata.posterior_predictive["n_favoured"].shape == (2, 300, 800)
    np.testing.assert_array_equal(idata.observed_data["n_votes"].values, 20)
    write_inference_data(tmp_path / "posterior.nc", idata)
    import arviz as az
    back = az.from_netcdf(tmp_path / "posterior.nc")
    assert float(back.posterior["a"].mean()) == pytest.approx(float(idata.posterior["a"].mean()))
    assert "diagnostics" in m.params()


def test_everything_known_needs_no_sampling():
    votes = simulate(60, 10, seed=6).votes
    priors = Priors(eta=(3.0, 5.0), pairs=(PairPrior("strong-model", "weak-model", mu=0.8),))
    m = _fit(votes, priors, draws=200)
    exact = Attentiveness("marginal", priors).fit(votes)
    np.testing.assert_allclose(m.users_.eta_mean, exact.users_.eta_mean, atol=1e-6)


def test_per_vote_attentiveness_by_infer_discrete():
    """infer_discrete's z samples average to eta m / (c + eta (m - c)) for each (user, kind) cell."""
    stats, spec, plan, cells = _setup(_rich_votes(7), Priors(casual="position"))
    U, D = stats.n_users, 400
    rng = np.random.default_rng(0)
    eta = torch.as_tensor(rng.uniform(0.1, 0.9, U)).expand(1, D, U)
    mu = torch.tensor([0.7, 0.85, 0.6], dtype=F64)
    draws = {"a": torch.full((1, D), 2.0, dtype=F64), "b": torch.full((1, D), 2.0, dtype=F64),
             "mu": mu.expand(1, D, 3), "rho": torch.full((1, D), 0.7, dtype=F64)}
    pz = N.attentive_probability(cells, eta, draws, n_draws=D, seed=0).numpy()
    k = cells.kinds
    m = k.attentive_prob(mu)[cells.kind]
    first = k.first[cells.kind]
    c = torch.where(first == 1, 0.7, torch.where(first == 2, 0.3, 0.5)).to(F64)
    e = eta[0, 0][cells.user]
    exact = (e * m / (c + e * (m - c))).numpy()
    assert np.max(np.abs(pz - exact)) < 5 * np.sqrt(0.25 / D)


def test_warnings_name_the_problem():
    tab = pd.DataFrame({"r_hat": [1.0, 1.05], "ess_bulk": [1000, 100], "ess_tail": [900, 800]}, index=["a", "b"])
    ut = pd.DataFrame({"r_hat": [1.0, 1.02], "ess_bulk": [500, 500], "ess_tail": [500, 500]})
    w = " | ".join(nuts_warnings(tab, ut, 3))
    assert "r_hat > 1.01 for b" in w and "1 users' eta" in w and "size < 400 for b" in w and "3 divergent" in w
    assert nuts_warnings(tab.iloc[:1], ut.iloc[:1], 0) == []


def test_cli_nuts_with_options(tmp_path):
    """`heedful fit --method nuts --option per_vote=true` writes posterior.nc with the per-vote group."""
    import json

    import arviz as az
    from typer.testing import CliRunner

    from heedful.cli import app
    from heedful.outputs import write_table

    write_table(tmp_path / "votes.parquet", simulate(150, 12, seed=8).votes)
    (tmp_path / "priors.toml").write_text('[[pairs]]\nmodel_a = "strong-model"\nmodel_b = "weak-model"\nmu = 0.8\n')
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "votes.parquet"), "-o", str(tmp_path / "out"), "--method",
                                 "nuts", "--config", str(tmp_path / "priors.toml"), "--draws", "150", "--chains",
                                 "2", "--seed", "1", "--option", "per_vote=true", "--option", "form=collapsed"])
    assert r.exit_code == 0, r.output
    params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert params["diagnostics"]["form"] == "collapsed" and "per_vote" in params["diagnostics"]
    idata = az.from_netcdf(tmp_path / "out" / "posterior.nc")
    p = idata.predictions["attentive_prob"].values.ravel()
    assert ((p >= 0) & (p <= 1)).all() and p.std() > 0
    bad = CliRunner().invoke(app, ["fit", str(tmp_path / "votes.parquet"), "-o", str(tmp_path / "x"), "--method",
                                   "nuts", "--option", "oops"])
    assert bad.exit_code != 0


@pytest.mark.parametrize("casual", ["uniform", "position"])
def test_batched_bins_by_patterns_equal_the_per_cell_sum(casual):
    """The conditional's bins from the (kind, count) patterns through the signature incidence equal the
    direct sum of every signature cell's log-likelihood (the same additions, so to the last bit here)."""
    stats, spec, plan, cells = _setup(_rich_votes(3, 300), Priors(casual=casual))
    grid = N.signature_grid(cells)
    assert grid.pattern_kind.shape[0] < grid.sig_cells.kind.shape[0]
    g = torch.Generator().manual_seed(1)
    n = 3
    a, b = 1.5 + torch.rand(n, generator=g, dtype=F64), 2.0 + torch.rand(n, generator=g, dtype=F64)
    mu = 0.55 + 0.4 * torch.rand(n, stats.n_pairs, generator=g, dtype=F64)
    rho = 0.3 + 0.4 * torch.rand(n, generator=g, dtype=F64) if spec.position else None
    got = N.batched_bins(grid, a, b, mu, rho)
    for i in range(n):
        gi = N.Globals(a[i], b[i], mu[i], None if rho is None else rho[i])
        want = torch.softmax(grid.log_bins(gi), dim=1)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-15)


def test_one_chain_reports_no_r_hat_and_raises_no_warning():
    """R-hat needs two chains: with one, max_r_hat is None (not NaN), the ESS is still reported, and no
    RuntimeWarning about an all-NaN reduction escapes."""
    import warnings

    votes = simulate(20, 8, seed=6).votes
    priors = Priors(pairs=(PairPrior("strong-model", "weak-model", beta=(8.0, 2.0)),))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        m = _fit(votes, priors, draws=40, warmup=40, chains=1)
    assert m.diagnostics_["max_r_hat"] is None
    assert m.diagnostics_["min_ess_bulk"] is not None and m.diagnostics_["min_ess_bulk"] > 0
