"""EM's joint MAP: the profile Newton solver reaches plain EM's fixed point, fast and monotonically."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from heedful.config import PairPrior, Priors, priors_from_dict
from heedful.errors import InputError
from heedful.inference import em
from heedful.inference.em import fit_em
from heedful.inference.globals import global_spec
from heedful.model.likelihood import build_plan
from heedful.simulate import default_pairs, simulate
from heedful.suffstats import vote_stats

CPU = torch.device("cpu")
UB = 1 - 1e-12   # EM's largest eta


def _fit(votes: pd.DataFrame, priors: Priors, solver: str, **kw):
    stats = vote_stats(votes)
    plan = build_plan(stats, CPU, torch.float64)
    return fit_em(stats, plan, global_spec(stats, priors), stats.tensors(CPU, torch.float64), solver=solver, **kw)


def _agree(votes: pd.DataFrame, priors: Priors, em_iter: int = 20000):
    """Plain EM run to its fixed point and profile Newton at the default tol; both fits."""
    plain = _fit(votes, priors, "em", tol=1e-16, max_iter=em_iter)
    newton = _fit(votes, priors, "newton", tol=1e-9)
    assert newton.converged
    assert np.abs(newton.mu - plain.mu).max() < 1e-6, (newton.mu, plain.mu)
    assert np.abs(newton.eta_map - plain.eta_map).max() < 1e-6
    assert newton.objective >= plain.objective - 1e-12 * abs(plain.objective)
    return plain, newton


def _typed_votes(reps: int = 15) -> pd.DataFrame:
    """Users of a few types, (gpt a-picks, b-picks, claude a-picks, b-picks) each: some always pick the
    better model (eta* = 1 - 1e-12), some the worse (eta* = 0), the rest something in between."""
    types = [(6, 0, 4, 0), (0, 6, 0, 4), (1, 5, 1, 3), (5, 1, 3, 1), (4, 2, 4, 1), (5, 2, 2, 1), (2, 1, 4, 2)]
    rows = []
    for t, (a1, b1, a2, b2) in enumerate(types):
        for r in range(reps):
            for pair, na, nb in ((("gpt", "llama"), a1, b1), (("claude", "vicuna"), a2, b2)):
                rows += [(f"u{t}-{r}", *pair, "a")] * na + [(f"u{t}-{r}", *pair, "b")] * nb
    return pd.DataFrame(rows, columns=["user_id", "model_a", "model_b", "choice"])


def test_newton_reaches_plain_em_fixed_point():
    sim = simulate(300, 15, pairs=default_pairs(3, 0.8), vote_counts="geometric", tie_rate=0.1, seed=4)
    plain, newton = _agree(sim.votes, Priors(eta=(2.0, 2.0)))
    assert newton.iterations < 15 < plain.iterations


def test_newton_reaches_plain_em_fixed_point_with_users_on_the_eta_bounds():
    """Beta(1, 1): the MAP of eta sits on 0 or 1 - 1e-12 for whole user types; Beta(20, 20) keeps mu inside."""
    priors = Priors(eta=(1.0, 1.0), pairs=(PairPrior("gpt", "llama", beta=(20.0, 20.0)),
                                           PairPrior("vicuna", "claude", beta=(20.0, 20.0))))
    plain, newton = _agree(_typed_votes(), priors)
    assert (newton.eta_map == 0).sum() == 30 and (newton.eta_map == UB).sum() == 15
    assert ((newton.mu > 0.8) & (newton.mu < 0.9)).all()


def test_newton_reaches_plain_em_fixed_point_with_gold_position_bias_and_known_mu():
    sim = simulate(400, 12, pairs=default_pairs(3, 0.8), eta_prior=(3, 3), position_share=1.0, position_rho=0.7,
                   gold_rate=0.1, seed=14)
    priors = priors_from_dict({"population": {"eta": "Beta(3, 3)"}, "behaviour": {"casual": "position"},
                               "pairs": [{"model_a": "model-00", "model_b": "model-01", "mu": 0.6}]})
    plain, newton = _agree(sim.votes, priors)
    assert newton.rho == pytest.approx(plain.rho, abs=1e-6) and abs(newton.rho - 0.7) < 0.05
    assert newton.mu[0] == 0.6


def test_a_beta_prior_on_rho_enters_both_solvers():
    """behaviour.rho = "Beta(a, b)": plain EM's M-step and the Newton step both maximise F + log Beta(rho)."""
    sim = simulate(300, 10, pairs=default_pairs(2, 0.8), eta_prior=(2, 2), position_share=1.0, position_rho=0.8,
                   seed=21)
    flat = {"population": {"eta": "Beta(2, 2)"}, "behaviour": {"casual": "position"}}
    strong = {"population": {"eta": "Beta(2, 2)"}, "behaviour": {"casual": "position", "rho": "Beta(50, 50)"}}
    plain, newton = _agree(sim.votes, priors_from_dict(strong))
    assert newton.rho == pytest.approx(plain.rho, abs=1e-6)
    free = _fit(sim.votes, priors_from_dict(flat), "newton")
    assert abs(newton.rho - 0.5) < abs(free.rho - 0.5) - 0.05     # pulled towards the prior's mean


def test_newton_converges_where_plain_em_crawls():
    """Beta(1, 1) and mu on its bound: plain EM is still short of tol after 300 iterations; Newton needs a few.
    The trace never falls, ends at the returned objective, and progress sees every value after the first."""
    sim = simulate(300, 15, pairs=default_pairs(3, 0.8), vote_counts="geometric", tie_rate=0.1, seed=4)
    priors = Priors(eta=(1.0, 1.0))
    assert not _fit(sim.votes, priors, "em", max_iter=300).converged
    trace, seen = [], []
    fit = _fit(sim.votes, priors, "auto", trace=trace, progress=lambda it, obj: seen.append((it, obj)))
    assert fit.converged and fit.iterations <= 10 and not any("without converging" in w for w in fit.warnings)
    assert (np.diff(trace) >= 0).all() and trace[-1] == fit.objective
    assert [obj for _, obj in seen] == trace[1:] and seen[-1][0] == fit.iterations
    assert fit.mu[2] == 1 - 1e-9   # on EM's clamp


def test_sparse_and_dense_curvature_agree(monkeypatch):
    sim = simulate(300, 12, pairs=default_pairs(4, 0.75), eta_prior=(3, 3), position_share=1.0, seed=3)
    priors = priors_from_dict({"population": {"eta": "Beta(2, 2)"}, "behaviour": {"casual": "position"}})
    dense = _fit(sim.votes, priors, "newton")
    monkeypatch.setattr(em, "DENSE_SCHUR_COLS", 0)
    sparse = _fit(sim.votes, priors, "newton")
    assert np.abs(sparse.mu - dense.mu).max() < 1e-9 and sparse.rho == pytest.approx(dense.rho, abs=1e-9)
    assert sparse.iterations == dense.iterations


def test_nothing_global_to_fit_is_one_eta_solve():
    sim = simulate(200, 10, seed=5)
    priors = Priors(eta=(2.0, 3.0), pairs=(PairPrior("strong-model", "weak-model", mu=0.8),))
    trace: list[float] = []
    plain, newton = _agree(sim.votes, priors)
    fit = _fit(sim.votes, priors, "newton", trace=trace)
    assert fit.iterations == 1 and fit.converged and len(trace) == 2


def test_per_user_rho_is_fitted_by_plain_em():
    sim = simulate(150, 10, position_share=1.0, seed=6)
    priors = priors_from_dict({"population": {"eta": "Beta(2, 2)"},
                               "behaviour": {"casual": "position", "rho_per_user": "Beta(2, 2)"}})
    auto, plain = _fit(sim.votes, priors, "auto", max_iter=50), _fit(sim.votes, priors, "em", max_iter=50)
    assert auto.iterations == plain.iterations and np.array_equal(auto.eta_map, plain.eta_map)
    with pytest.raises(InputError, match="solver"):
        _fit(sim.votes, priors, "squarem")


def test_cli_option_picks_the_em_solver(tmp_path):
    from typer.testing import CliRunner

    from heedful.cli import app

    votes = tmp_path / "v.parquet"
    simulate(300, 15, pairs=default_pairs(3, 0.8), vote_counts="geometric", seed=4).votes.to_parquet(votes)
    iters = {}
    for solver in ("newton", "em"):
        r = CliRunner().invoke(app, ["fit", str(votes), "-o", str(tmp_path / solver), "--method", "em",
                                     "--option", f"solver={solver}"])
        assert r.exit_code == 0, r.output
        iters[solver] = json.loads((tmp_path / solver / "params.json").read_text())["iterations"]
    assert iters["newton"] < 15 < iters["em"]
    bad = CliRunner().invoke(app, ["fit", str(votes), "-o", str(tmp_path / "x"), "--method", "em",
                                   "--option", "solver=bogus"])
    assert bad.exit_code != 0 and "em solver must be one of" in str(bad.exception or bad.output)


def test_a_warm_start_from_a_user_sample_reaches_the_same_fixed_point(monkeypatch):
    """Above WARM_FACTOR x WARM_USERS users profile Newton starts at a user sample's (mu, rho) (the sample
    itself warm-started): fewer full iterations, the same joint MAP as the cold start."""
    import heedful.inference.globals as G

    sim = simulate(12_000, 10, pairs=default_pairs(4, 0.8), position_share=0.5, gold_rate=0.02, seed=6)
    priors = Priors(eta=(2.0, 3.0), casual="position")
    monkeypatch.setattr(G, "WARM_FACTOR", 10**9)
    cold = _fit(sim.votes, priors, "newton")
    starts = []
    run = em._Profile.run
    monkeypatch.setattr(em._Profile, "run", lambda self, mu, *a: starts.append(mu.clone()) or run(self, mu, *a))
    monkeypatch.setattr(G, "WARM_FACTOR", 4)
    monkeypatch.setattr(G, "WARM_USERS", 512)      # 12,000 users: a sample of 3,000 from one of 750
    warm = _fit(sim.votes, priors, "newton")
    assert len(starts) == 3
    assert not torch.equal(starts[-1], starts[0])  # the full fit started where the samples ended
    assert warm.converged and warm.iterations < cold.iterations
    # both stop within tol of the optimum, at points a last Newton step of a few 1e-6 in mu apart (the warm fit
    # stops on quadratic convergence, 1e-12 |F| short of the optimum; see the test below)
    np.testing.assert_allclose(warm.mu, cold.mu, atol=1e-5)
    np.testing.assert_allclose(warm.eta_map, cold.eta_map, atol=1e-5)
    assert warm.rho == pytest.approx(cold.rho, abs=1e-5)
    assert warm.objective == pytest.approx(cold.objective, rel=1e-12)


def test_em_eta_map_is_the_posterior_mode_so_the_fit_skips_the_refinement():
    """EM's eta_u maximise log L_u(eta) + (a-1) log eta + (b-1) log(1-eta) at its globals: the modes of the
    users' posteriors. The fit therefore asks user_posterior for no modes; every other summary is the same
    as with them (the mean and sd to rounding; the interval to the grid's 1e-6: without modes and with an integer
    prior the summaries are exact, tests/test_polynomial_posterior.py), and the modes it would have computed equal
    eta_map."""
    from heedful.inference import Attentiveness
    from heedful.inference.posterior import user_posterior

    votes = simulate(600, 12, pairs=default_pairs(3, 0.8), seed=5).votes
    model = Attentiveness(method="em", priors=priors_from_dict({"population": {"eta": "Beta(2, 2)"}})).fit(votes)
    assert model.posterior_.mode is None
    mu = torch.as_tensor(model.fit_.mu, dtype=torch.float64)
    args = (model._plan, None, model.fit_.a, model.fit_.b, mu, model.fit_.rho)
    full = user_posterior(*args, level=model.level)
    assert np.abs(full.mode - model.fit_.eta_map).max() < 1e-6
    np.testing.assert_array_equal(model.users_.eta_hat, model.fit_.eta_map)
    for name in ("mean", "sd"):
        np.testing.assert_allclose(getattr(model.posterior_, name), getattr(full, name), rtol=1e-12, atol=1e-15)
    for name in ("lo", "hi"):
        np.testing.assert_allclose(getattr(model.posterior_, name), getattr(full, name), rtol=0, atol=1e-6)


def test_cells_in_any_order_give_the_same_fit():
    """_Profile checks the (user, kind) order pairwise and sorts the cells when it does not hold: cells shuffled,
    or two kinds of one user swapped, give the sorted cells' fit (here with a known mu: that pair's cells are
    left out of V)."""
    import dataclasses

    pairs = default_pairs(3, 0.8)
    sim = simulate(400, 10, pairs=pairs, position_share=0.5, seed=8)
    stats = vote_stats(sim.votes)
    n = len(stats.cell_user)
    first_user = np.flatnonzero(stats.cell_user == stats.cell_user[0])
    assert len(first_user) >= 2
    swap = np.arange(n)
    swap[first_user[:2]] = first_user[1::-1]
    priors = Priors(eta=(2.0, 2.0), casual="position", pairs=(PairPrior(*pairs[0][:2], mu=pairs[0][2]),))
    assert not global_spec(stats, priors).free_mu.all()
    fits = []
    for order in (np.arange(n), swap, np.random.default_rng(0).permutation(n)):
        s = dataclasses.replace(stats, cell_user=stats.cell_user[order], cell_kind=stats.cell_kind[order],
                                cell_count=stats.cell_count[order])
        cells = s.tensors(CPU, torch.float64)
        assert em._ascending(cells["cell_user"], cells["cell_kind"]) == (len(fits) == 0)
        fits.append(fit_em(s, build_plan(s, CPU, torch.float64), global_spec(s, priors), cells, solver="newton"))
    for f in fits[1:]:
        np.testing.assert_allclose(f.mu, fits[0].mu, atol=1e-10)
        np.testing.assert_allclose(f.eta_map, fits[0].eta_map, atol=1e-10)
        assert f.objective == pytest.approx(fits[0].objective, rel=1e-12)


def test_the_warm_start_samples_build_no_buckets(monkeypatch):
    """Profile Newton on a warm-start sample needs the plan's kinds and gold counts only: the sample plans are
    lazy, and the buckets are built once, for the full data's plan (its marginal curvature at the end)."""
    import heedful.inference.globals as G
    import heedful.model.likelihood as L

    sim = simulate(6_000, 8, pairs=default_pairs(3, 0.8), seed=6)
    monkeypatch.setattr(G, "WARM_FACTOR", 4)
    monkeypatch.setattr(G, "WARM_USERS", 256)      # samples of 1,500 and 375 users
    runs, built = [], []
    run = em._Profile.run
    monkeypatch.setattr(em._Profile, "run", lambda self, *a: runs.append(self.U) or run(self, *a))
    build = L._buckets
    monkeypatch.setattr(L, "_buckets", lambda stats, *a: built.append(stats.n_users) or build(stats, *a))
    fit = _fit(sim.votes, Priors(eta=(2.0, 2.0)), "newton")
    assert fit.converged and runs == [375, 1500, 6000]
    assert built == [6000]


def test_newton_stops_once_quadratic_convergence_leaves_less_than_tol(monkeypatch):
    """A full Newton step whose predicted gain fell SETTLE_RATIO-fold or more since the last one, and whose
    square over the last one is below tol |F|, is taken with the exact eta solve and ends the fit when its
    gain matches the prediction: one iteration (a curvature and an eta solve) fewer than waiting for a
    prediction below tol, the same optimum, and one more Newton step from the result predicts less than tol |F|.
    Beta(1, 1) puts one mu on its clamp, so no full step's gain alone ends the fit."""
    sim = simulate(300, 15, pairs=default_pairs(3, 0.8), vote_counts="geometric", tie_rate=0.1, seed=4)
    priors = Priors(eta=(1.0, 1.0))
    seen = []
    curvature = em._Profile.curvature
    monkeypatch.setattr(em._Profile, "curvature", lambda self, *a: seen.append(r := curvature(self, *a)) or r)
    fit = _fit(sim.votes, priors, "newton", warm=False)
    n_settled = len(seen)
    seen.clear()
    monkeypatch.setattr(em, "SETTLE_RATIO", 0.0)
    waited = _fit(sim.votes, priors, "newton", warm=False)
    assert fit.converged and waited.converged and fit.mu[2] == 1 - 1e-9
    assert len(seen) == n_settled + 1 and waited.iterations == fit.iterations + 1
    assert fit.objective >= waited.objective - 1e-12 * abs(waited.objective)
    np.testing.assert_allclose(fit.mu, waited.mu, atol=1e-6)

    stats = vote_stats(sim.votes)
    prof = em._Profile(stats, build_plan(stats, CPU, torch.float64), global_spec(stats, priors),
                       stats.tensors(CPU, torch.float64), 1.0, 1.0)
    prof.set_globals(fit.mu, fit.rho)
    eta, obj, g, h = prof.solve_eta(torch.as_tensor(fit.eta_map), prof.xtol)
    grad, Hs = prof.curvature(eta, g, h, fit.mu, fit.rho)[:2]
    inner = fit.mu < 1 - 1e-9                      # the clamped mu's gradient points out of the box
    assert grad[~inner].min() > 0
    assert 0.5 * grad[inner] @ np.linalg.solve(-Hs[np.ix_(inner, inner)], grad[inner]) <= 1e-9 * abs(obj)


@pytest.mark.parametrize("case", ["flat", "beta", "position"])
def test_the_first_eta_solve_starts_inside_each_users_grid_bracket(case):
    """``start_eta`` puts each user within one START_GRID cell of eta*_u (exactly on a box end where eta*_u is
    there), users without a cell under Beta(1, 1) at 1/2; solving from there reaches the eta* of the solve
    from eta = 1/2 in fewer passes over the cells."""
    sim = simulate(500, 8, pairs=default_pairs(3, 0.8), vote_counts="geometric", tie_rate=0.2, seed=9,
                   position_share=1.0 if case == "position" else 0.0, position_rho=0.7)
    if case == "position":
        priors = priors_from_dict({"population": {"eta": "Beta(2, 2)"}, "behaviour": {"casual": "position"}})
        a = b = 2.0
    else:
        a, b = (1.0, 1.0) if case == "flat" else (2.0, 3.0)
        priors = Priors(eta=(a, b))
    stats = vote_stats(sim.votes)
    spec = global_spec(stats, priors)
    prof = em._Profile(stats, build_plan(stats, CPU, torch.float64), spec, stats.tensors(CPU, torch.float64), a, b)
    mu = np.array([0.7, 0.75, 1 - 1e-9])            # one mu on its clamp: f_u' has a pole next to eta = 1
    prof.set_globals(mu, 0.7 if spec.learn_rho else None)
    start = prof.start_eta()
    prof.passes = 0
    ref, ref_obj = prof.solve_eta(torch.full((prof.U,), 0.5, dtype=torch.float64), prof.xtol)[:2]
    half_passes, prof.passes = prof.passes, 0
    eta, obj = prof.solve_eta(start, prof.xtol)[:2]
    empty = prof.crow[1:] == prof.crow[:-1]
    assert bool(empty.any())
    assert bool(((ref <= 0) <= (start == 0)).all()) and bool(((ref >= prof.ub) <= (start == prof.ub)).all())
    assert (start - ref).abs().max() <= prof.ub / (em.START_GRID - 1)
    if case == "flat":
        assert bool((ref == 0).any()) and bool((ref >= prof.ub).any()) and bool((start[empty] == 0.5).all())
    torch.testing.assert_close(eta, ref, atol=1e-9, rtol=0)
    assert obj == pytest.approx(ref_obj, rel=1e-13) and prof.passes < half_passes


@pytest.mark.parametrize("index", [torch.int32, torch.int64])
def test_run_starts_are_the_csr_row_pointers_of_the_runs(index):
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 1000):
        start = torch.from_numpy(rng.random(n) < 0.3)
        start[0] = True                                  # a run begins at the first cell
        crow = em._run_starts(start, index)
        expect = torch.cat([torch.nonzero(start).flatten(), torch.tensor([n])])
        assert crow.dtype == index
        assert torch.equal(crow.long(), expect)
        lens = crow[1:] - crow[:-1]
        assert bool((lens > 0).all()) and int(lens.sum()) == n      # the runs tile the cells
    every = torch.ones(5, dtype=torch.bool)
    assert em._run_starts(every, index).tolist() == [0, 1, 2, 3, 4, 5]
