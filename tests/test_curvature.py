"""The exact derivatives of the marginal objective, and the ridge coordinates Newton works in."""

import dataclasses

import numpy as np
import pytest
import torch

import heedful.inference.globals as G
import heedful.inference.marginal as M
from heedful.config import PairPrior, Priors
from heedful.inference.curvature import marginal_derivatives
from heedful.inference.globals import global_spec, initial_mu
from heedful.inference.marginal import _polish, fit_marginal, objective
from heedful.inference.result import hessian_fd
from heedful.inference.ridge import RidgeCoordinates
from heedful.model.likelihood import build_plan
from heedful.simulate import default_pairs, pairs_from_strengths, simulate
from heedful.suffstats import vote_stats

F64 = torch.float64
PAIRS = default_pairs(3, 0.8)
RIDGE_PAIRS = [(f"m{2 * i:02d}", f"m{2 * i + 1:02d}", float(m)) for i, m in enumerate(np.linspace(0.6, 0.9, 10))]

CASES = {
    "learned prior, free mu": dict(priors=Priors()),
    "learned rho with a prior": dict(priors=Priors(casual="position", rho_prior=(2.0, 2.0)), position_share=0.5),
    "per-user rho, learned": dict(priors=Priors(casual="position", rho_user="learn"), position_share=0.5),
    "strengths": dict(priors=Priors(mu_model="strengths", strength_sd=2.0),
                      pairs=pairs_from_strengths({"x": 1.0, "y": 0.3, "z": -0.5})),
    "known mu, Beta prior, gold": dict(priors=Priors(pairs=(PairPrior("model-00", "model-01", mu=0.62),
                                                             PairPrior("model-02", "model-03", beta=(4.0, 2.0)))),
                                       gold_rate=0.05),
    "eta fixed": dict(priors=Priors(eta=(3.0, 5.0))),
}


def _setup(case: str, users: int = 300):
    c = dict(CASES[case])
    priors = c.pop("priors")
    sim = simulate(users, 8, pairs=c.pop("pairs", PAIRS), vote_counts="lognormal", seed=3, **c)
    stats = vote_stats(sim.votes)
    plan = build_plan(stats, torch.device("cpu"), F64)
    spec = global_spec(stats, priors)
    mu0 = 0.9 * initial_mu(stats, spec) + 0.05
    theta = spec.pack(2.5, 4.0, mu0, 0.7 if spec.learn_rho else None, F64, torch.device("cpu"))
    return stats, plan, spec, theta


def _autograd_grad(plan, spec, th):
    th = th.detach().clone().requires_grad_(True)
    return torch.autograd.grad(objective(plan, spec, th), th)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_exact_derivatives_match_autograd_and_finite_differences(case):
    _, plan, spec, theta = _setup(case)
    f, g, H = marginal_derivatives(plan, spec, theta)
    assert f == pytest.approx(float(objective(plan, spec, theta)), rel=1e-13)
    np.testing.assert_allclose(g, _autograd_grad(plan, spec, theta).numpy(), rtol=1e-10, atol=1e-9)
    H_fd = hessian_fd(lambda th: _autograd_grad(plan, spec, th), theta, 1e-5)
    scale = np.abs(H).max()
    assert np.abs(H - H_fd).max() < 1e-6 * scale, case
    assert np.allclose(H, H.T)


@pytest.mark.parametrize("case", list(CASES))
def test_the_marginal_nodes_are_exact_and_one_fewer_is_not(case):
    """Each bucket's n_nodes = n_max // 2 + 1 Gauss-Jacobi nodes integrate L_u (degree n_u) exactly: the objective,
    its gradient and its Hessian equal those on three nodes more, to rounding. One node fewer misses (n_max is
    even in a bucket of this data, so 2 (n_nodes - 1) - 1 < n_max there); the posterior keeps one node more
    than the marginal for its moments (the same 2 for the one-vote bucket)."""
    _, plan, spec, theta = _setup(case)

    def with_nodes(extra: int):
        buckets = [dataclasses.replace(bk, n_nodes=bk.n_nodes + extra) for bk in plan.buckets]
        return marginal_derivatives(dataclasses.replace(plan, pending=buckets), spec, theta)

    f, g, H = marginal_derivatives(plan, spec, theta)
    f3, g3, H3 = with_nodes(3)
    assert f == pytest.approx(f3, rel=1e-13, abs=1e-9)
    np.testing.assert_allclose(g, g3, rtol=1e-10, atol=1e-8)
    assert np.abs(H - H3).max() < 1e-9 * np.abs(H).max()
    f1, *_ = with_nodes(-1)
    assert abs(f1 - f) > 1e-6 * abs(f)
    assert all(bk.moment_nodes >= bk.n_nodes for bk in plan.buckets)
    assert plan.buckets[-1].moment_nodes == plan.buckets[-1].n_nodes + 1


def test_ridge_coordinates_round_trip_and_carry_the_hessian_back_to_theta():
    _, plan, spec, theta = _setup("learned rho with a prior")
    coords = RidgeCoordinates(spec)
    assert RidgeCoordinates.applies(spec)
    psi = torch.as_tensor(coords.from_theta(theta.numpy()), dtype=F64)
    np.testing.assert_allclose(coords.to_theta(psi).numpy(), theta.numpy(), rtol=0, atol=1e-12)
    # a point that is not stationary: the term sum_k g_k d2 theta_k / d psi2 matters there
    _, g_psi, H_psi = marginal_derivatives(plan, coords, psi)
    _, _, H_theta = marginal_derivatives(plan, spec, theta)
    np.testing.assert_allclose(coords.theta_hessian(psi, g_psi, H_psi), H_theta, rtol=1e-8,
                               atol=1e-9 * np.abs(H_theta).max())


@pytest.mark.parametrize("case", ["strengths", "eta fixed"])
def test_ridge_coordinates_only_where_the_ridge_exists(case):
    _, _, spec, _ = _setup(case)
    assert not RidgeCoordinates.applies(spec)


def test_newton_in_ridge_coordinates_reaches_the_top_from_where_lbfgs_stops():
    """Ten pairs, 10 votes per user: L-BFGS's relative-change rule stops on the flat ridge; Newton in psi
    then gets to a predicted gain below 1e-6 in a few steps (in theta it zigzags: the gain halves per step)."""
    stats = vote_stats(simulate(20_000, 10, pairs=RIDGE_PAIRS, eta_prior=(3.0, 5.0), seed=1).votes)
    plan = build_plan(stats, torch.device("cpu"), F64)
    spec = global_spec(stats, Priors())
    start = fit_marginal(stats, plan, spec, curvature=False)
    theta = torch.as_tensor(start.theta, dtype=F64)
    top, A, f_top, steps, reached = _polish(plan, spec, theta)
    assert reached and steps <= 5
    assert float(objective(plan, spec, top)) > start.objective
    assert f_top == pytest.approx(float(objective(plan, spec, top)), abs=1e-7)   # the fit's value, no extra pass
    g = _autograd_grad(plan, spec, top).numpy()
    assert 0.5 * g @ np.linalg.solve(A, g) < 1e-6


def test_a_fit_that_newton_finishes_is_converged_even_when_lbfgs_ran_out_of_iterations():
    stats = vote_stats(simulate(20_000, 10, pairs=RIDGE_PAIRS, eta_prior=(3.0, 5.0), seed=1).votes)
    plan = build_plan(stats, torch.device("cpu"), F64)
    spec = global_spec(stats, Priors())
    full = fit_marginal(stats, plan, spec)
    assert full.cov is not None
    short = fit_marginal(stats, plan, spec, max_iter=4)      # L-BFGS stops after 4 iterations, not converged
    assert short.converged and not any("without converging" in w for w in short.warnings)
    assert short.objective == pytest.approx(full.objective, abs=1e-5)
    np.testing.assert_allclose(short.mu, full.mu, atol=1e-4)


def _ridge_setup(users: int = 20_000, **kw):
    sim = simulate(users, 10, pairs=RIDGE_PAIRS, eta_prior=(3.0, 5.0), seed=1, **kw)
    stats = vote_stats(sim.votes)
    return stats, build_plan(stats, torch.device("cpu"), F64)


@pytest.mark.parametrize("priors,kw", [(Priors(), {}),
                                       (Priors(casual="position"), dict(position_share=0.5, gold_rate=0.02))])
def test_warm_start_from_a_user_sample_reaches_the_same_maximum(monkeypatch, priors, kw):
    """Above WARM_FACTOR x WARM_USERS users the climb starts at a sample's maximum (BFGS, then Newton's check);
    the maximum and its curvature are those of the cold climb (L-BFGS, then Newton)."""
    stats, plan = _ridge_setup(**kw)
    spec = global_spec(stats, priors)
    monkeypatch.setattr(G, "WARM_FACTOR", 10**9)
    cold = fit_marginal(stats, plan, spec)
    calls = []
    qn = M._quasi_newton
    monkeypatch.setattr(M, "_quasi_newton", lambda *a, **k: calls.append(a[2]) or qn(*a, **k))
    monkeypatch.setattr(G, "WARM_FACTOR", 4)
    monkeypatch.setattr(G, "WARM_USERS", 1024)        # 20,000 users: a sample of 5,000, itself warm-started
    warm = fit_marginal(stats, plan, spec)
    assert len(calls) == 2                            # two levels: 5,000 users from 1,250, 20,000 from 5,000
    assert warm.converged and cold.converged
    assert warm.objective == pytest.approx(cold.objective, abs=2e-6)
    np.testing.assert_allclose(warm.theta, cold.theta, atol=2e-4)
    np.testing.assert_allclose(warm.cov, cold.cov, rtol=2e-3, atol=1e-6)


def test_the_last_bfgs_step_is_left_to_the_newton_check(monkeypatch):
    """A BFGS step that predicts less than QN_LAST_GAIN is taken without a pass over the data of its own: fewer
    full-data passes, and the Newton check there passes at once, at the maximum of the climb that evaluates it."""
    stats, plan = _ridge_setup()
    spec = global_spec(stats, Priors())
    monkeypatch.setattr(G, "WARM_FACTOR", 4)
    monkeypatch.setattr(G, "WARM_USERS", 1024)
    passes, newton_steps = [], []
    value_grad, newton = M._value_grad, M._newton
    monkeypatch.setattr(M, "_value_grad", lambda p, *a: passes.append(p is plan) or value_grad(p, *a))
    monkeypatch.setattr(M, "_newton", lambda p, *a: (r := newton(p, *a), p is plan and newton_steps.append(r[4]))[0])

    def fit(last_gain: float):
        passes.clear(), newton_steps.clear()
        monkeypatch.setattr(M, "QN_LAST_GAIN", last_gain)
        return fit_marginal(stats, plan, spec), sum(passes), list(newton_steps)

    default = M.QN_LAST_GAIN
    evaluated, n_evaluated, _ = fit(0.0)                  # every BFGS step evaluated, as before
    left, n_left, steps = fit(default)
    assert n_left < n_evaluated
    assert steps == [0] and left.converged                # the check took no step: the unevaluated one was enough
    assert left.objective == pytest.approx(evaluated.objective, abs=M.NEWTON_GAIN)
    np.testing.assert_allclose(left.cov, evaluated.cov, rtol=1e-2, atol=1e-6)


def test_a_warm_start_that_misleads_falls_back_to_the_cold_climb(monkeypatch):
    stats, plan = _ridge_setup()
    spec = global_spec(stats, Priors())
    cold = fit_marginal(stats, plan, spec)
    monkeypatch.setattr(G, "WARM_FACTOR", 4)
    monkeypatch.setattr(G, "WARM_USERS", 1024)
    far = spec.pack(1.0, 1.0, np.full(10, 0.55), None, F64, torch.device("cpu"))
    monkeypatch.setattr(M, "_quasi_newton", lambda *a, **k: far)     # BFGS "ends" far from the top
    monkeypatch.setattr(M, "NEWTON_STEPS", 1)                        # ... where one Newton step cannot finish
    fit = fit_marginal(stats, plan, spec)
    assert fit.objective == pytest.approx(cold.objective, abs=1e-5)
    np.testing.assert_allclose(fit.mu, cold.mu, atol=1e-3)


def test_sample_users_keeps_each_sampled_users_cells_and_thins_pair_counts():
    stats = vote_stats(simulate(3_000, 6, pairs=PAIRS, gold_rate=0.1, seed=2).votes)
    sample = stats.sample_users(1_000, seed=5)
    assert (np.diff(stats.cell_user) >= 0).all()      # cells by user: the path of runs; shuffled below: the mask
    assert sample.n_users == 1_000 and sample.pairs == stats.pairs
    pos = stats.users.get_indexer(sample.users)
    assert (np.diff(pos) > 0).all()                   # original order kept
    np.testing.assert_array_equal(sample.user_votes(), stats.user_votes()[pos])
    np.testing.assert_array_equal(sample.user_ties, stats.user_ties[pos])
    assert ((sample.gold_a <= stats.gold_a) & (sample.gold_n - sample.gold_a <= stats.gold_n - stats.gold_a)).all()
    assert 0.2 < sample.gold_n.sum() / stats.gold_n.sum() < 0.5
    again = stats.sample_users(1_000, seed=5)
    assert list(again.users) == list(sample.users)
    # cells not sorted by user (the mask path): the same users, and each one's same cells
    perm = np.random.default_rng(0).permutation(len(stats.cell_user))
    shuffled = dataclasses.replace(stats, cell_user=stats.cell_user[perm], cell_kind=stats.cell_kind[perm],
                                   cell_count=stats.cell_count[perm]).sample_users(1_000, seed=5)
    assert list(shuffled.users) == list(sample.users) and shuffled.n_rows == sample.n_rows

    def cells(s):
        return sorted(zip(s.cell_user.tolist(), s.cell_kind.tolist(), s.cell_count.tolist(), strict=True))

    assert cells(shuffled) == cells(sample)


def test_the_warm_option_turns_the_warm_start_off(monkeypatch, tmp_path):
    """``--option warm=false`` (Attentiveness options) takes the cold climb; a non-boolean value is an error."""
    from heedful.errors import InputError
    from heedful.inference import Attentiveness

    stats, _ = _ridge_setup()
    monkeypatch.setattr(G, "WARM_FACTOR", 4)
    monkeypatch.setattr(G, "WARM_USERS", 1024)
    calls = []
    qn = M._quasi_newton
    monkeypatch.setattr(M, "_quasi_newton", lambda *a, **k: calls.append(1) or qn(*a, **k))
    warm = Attentiveness(options={"warm": True}).fit(stats)
    assert calls
    calls.clear()
    cold = Attentiveness(options={"warm": False}).fit(stats)
    assert not calls
    assert warm.log_likelihood_ == pytest.approx(cold.log_likelihood_, abs=2e-6)
    with pytest.raises(InputError, match="warm takes true or false"):
        Attentiveness(options={"warm": "maybe"}).fit(stats)
