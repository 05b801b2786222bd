"""The fits: brute-force agreement, EM monotonicity, parameter recovery, honest intervals."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import optimize, sparse, special, stats

from heedful.config import PairPrior, Priors
from heedful.inference import Attentiveness
from heedful.inference.em import fit_em
from heedful.inference.globals import global_spec
from heedful.model.likelihood import build_plan
from heedful.simulate import default_pairs, simulate
from heedful.suffstats import vote_stats

KNOWN = Priors(pairs=(PairPrior("strong-model", "weak-model", mu=0.8),))


def _brute_force_loglik(votes: pd.DataFrame, nodes: int = 400):
    """Exact marginal log-likelihood from raw rows on a dense Gauss-Legendre grid, written independently.

    Returns f(a, b, mu: dict[pair -> P(alphabetically first model better)]).
    """
    v = votes[votes.choice != "tie"]
    lo = np.minimum(v.model_a, v.model_b)
    hi = np.maximum(v.model_a, v.model_b)
    picked = np.where(v.choice == "a", v.model_a, v.model_b)
    counts = pd.DataFrame({"u": v.user_id.to_numpy(), "pair": (lo + "|" + hi).to_numpy(),
                           "y": (picked == lo).astype(int)}).value_counts().rename("n").reset_index()
    user_code, _ = pd.factorize(counts.u)
    rows_to_users = sparse.csr_matrix((np.ones(len(counts)), (user_code, np.arange(len(counts)))))
    sign = np.where(counts.y.to_numpy() == 1, 1.0, -1.0)[:, None]
    x, w = special.roots_legendre(nodes)
    eta, w = (x + 1) / 2, w / 2

    def f(a: float, b: float, mu: dict) -> float:
        m = counts.pair.map(mu).to_numpy(dtype=float)[:, None]
        ll = rows_to_users @ (counts.n.to_numpy()[:, None] * np.log(0.5 + sign * (m - 0.5) * eta[None, :]))
        return float(np.log(np.exp(ll) @ (stats.beta.pdf(eta, a, b) * w)).sum())

    return f


def test_marginal_fit_equals_brute_force_maximisation():
    pairs = [("gpt", "llama", 0.8), ("claude", "vicuna", 0.7)]
    sim = simulate(400, 12, eta_prior=(3.0, 4.0), pairs=pairs, seed=3)
    priors = Priors(pairs=(PairPrior("gpt", "llama", mu=0.8),))
    model = Attentiveness(priors=priors).fit(sim.votes)
    f = _brute_force_loglik(sim.votes)

    def neg(th):
        return -f(np.exp(th[0]), np.exp(th[1]), {"gpt|llama": 0.8, "claude|vicuna": special.expit(th[2])})

    res = optimize.minimize(neg, x0=[0.5, 0.5, 0.5], method="Nelder-Mead",
                            options={"xatol": 1e-9, "fatol": 1e-11, "maxiter": 20000, "maxfev": 40000})
    a, b, mu = np.exp(res.x[0]), np.exp(res.x[1]), special.expit(res.x[2])
    ep = model.eta_prior_
    fitted_mu = model.pairs_.set_index("model_a").loc["claude", "mu"]
    assert ep["a"] == pytest.approx(a, rel=1e-3)
    assert ep["b"] == pytest.approx(b, rel=1e-3)
    assert fitted_mu == pytest.approx(mu, rel=1e-3)
    assert model.log_likelihood_ == pytest.approx(-res.fun, abs=1e-6)


def test_em_objective_never_decreases():
    sim = simulate(300, 15, pairs=default_pairs(3, 0.8), vote_counts="geometric", tie_rate=0.1, seed=4)
    stats_ = vote_stats(sim.votes)
    import torch

    plan = build_plan(stats_, torch.device("cpu"), torch.float64)
    spec = global_spec(stats_, Priors(eta=(2.0, 2.0)))
    trace: list[float] = []
    fit = fit_em(stats_, plan, spec, stats_.tensors(torch.device("cpu"), torch.float64), tol=1e-12,
                 max_iter=300, trace=trace)
    steps = np.diff(trace)
    assert len(trace) > 5
    assert (steps >= -1e-9 * np.abs(trace[1:])).all(), steps.min()
    assert np.all((fit.eta_map >= 0) & (fit.eta_map <= 1))


def test_em_and_marginal_rank_users_alike_but_em_overstates_mu():
    """Joint MAP over every eta_u and mu (EM) pushes the eta's apart and mu toward 1; integrating eta out doesn't."""
    sim = simulate(400, 60, pairs=default_pairs(2, 0.8), eta_prior=(3, 3), seed=5)
    marg = Attentiveness(priors=Priors(eta=(3.0, 3.0))).fit(sim.votes)
    em = Attentiveness(method="em", priors=Priors(eta=(3.0, 3.0))).fit(sim.votes)
    assert stats.spearmanr(marg.users_.eta_mean, em.users_.eta_hat).statistic > 0.98
    truth = np.array([0.6, 0.9])
    assert ((marg.pairs_.mu_lo <= truth) & (truth <= marg.pairs_.mu_hi)).all()
    assert (np.abs(em.pairs_.mu - truth) >= np.abs(marg.pairs_.mu - truth) - 0.01).all()


def test_population_mean_recovered_with_mu_known():
    sim = simulate(10_000, 10, mu=0.8, eta_prior=(3.0, 5.0), seed=1)
    ep = Attentiveness(priors=KNOWN).fit(sim.votes).eta_prior_
    assert abs(ep["mean"] - 0.375) < 0.01
    assert ep["mean_lo"] <= 0.375 <= ep["mean_hi"]


@pytest.mark.slow
def test_population_prior_recovered_at_50k_users():
    sim = simulate(50_000, 20, mu=0.8, eta_prior=(3.0, 5.0), seed=2)
    ep = Attentiveness(priors=KNOWN).fit(sim.votes).eta_prior_
    assert ep["a"] == pytest.approx(3.0, rel=0.10)
    assert ep["b"] == pytest.approx(5.0, rel=0.10)


def test_eta_intervals_cover_the_truth_at_the_stated_rate():
    sim = simulate(10_000, 20, mu=0.8, eta_prior=(3.0, 5.0), seed=6)
    u = Attentiveness(priors=KNOWN).fit(sim.votes).users_.merge(sim.users, on="user_id")
    inside = ((u.true_eta >= u.eta_lo) & (u.true_eta <= u.eta_hi)).mean()
    assert 0.86 <= inside <= 0.94
    assert ((u.eta_lo <= u.eta_mean) & (u.eta_mean <= u.eta_hi)).all()
    assert ((u.eta_hat >= 0) & (u.eta_hat <= 1)).all()


def test_free_mu_interval_covers_truth_or_warns():
    sim = simulate(10_000, 50, mu=0.8, eta_prior=(3.0, 5.0), seed=7)
    model = Attentiveness().fit(sim.votes)
    row = model.pairs_.iloc[0]
    covered = row.mu_lo <= 0.8 <= row.mu_hi
    warned = any("weakly identified" in w for w in model.warnings_)
    assert covered or warned


def test_storage_order_does_not_matter():
    sim = simulate(200, 10, seed=8)
    v = sim.votes
    swapped = v.assign(model_a=v.model_b, model_b=v.model_a,
                       choice=v.choice.map({"a": "b", "b": "a", "tie": "tie"}),
                       shown_first=v.shown_first.map({"a": "b", "b": "a"}))
    m1 = Attentiveness(priors=KNOWN).fit(v)
    m2 = Attentiveness(priors=KNOWN).fit(swapped)
    assert m1.log_likelihood_ == pytest.approx(m2.log_likelihood_, abs=1e-9)
    assert np.allclose(m1.users_.eta_mean, m2.users_.eta_mean)


def test_ties_are_counted_and_left_out():
    sim = simulate(200, 10, tie_rate=0.2, seed=9)
    model = Attentiveness(priors=KNOWN).fit(sim.votes)
    n_ties = int((sim.votes.choice == "tie").sum())
    assert model.params()["n_ties"] == n_ties == int(model.users_.n_ties.sum())
    assert int(model.users_.n_votes.sum()) == len(sim.votes) - n_ties
    no_ties = Attentiveness(priors=KNOWN).fit(sim.votes[sim.votes.choice != "tie"])
    assert model.log_likelihood_ == pytest.approx(no_ties.log_likelihood_, abs=1e-9)


def _newton_gain(model) -> float:
    """g' H^-1 g / 2 at the fitted globals: the log-posterior a Newton step from there would still gain."""
    from heedful.inference.marginal import objective
    from heedful.inference.result import hessian_fd

    plan, spec = model._plan, model.spec_
    theta = torch.as_tensor(model.fit_.theta, dtype=torch.float64)

    def grad(th):
        th = th.detach().clone().requires_grad_(True)
        return torch.autograd.grad(-objective(plan, spec, th), th)[0]

    g = grad(theta).numpy()
    H = hessian_fd(grad, theta, 1e-5)
    return 0.5 * float(g @ np.linalg.solve(H, g))


def _ridge_votes():
    """Ten pairs, 10 votes per user: the scale of mu - 1/2 against the eta prior is weakly identified."""
    pairs = [(f"m{2 * i:02d}", f"m{2 * i + 1:02d}", float(m)) for i, m in enumerate(np.linspace(0.6, 0.9, 10))]
    return simulate(50_000, 10, pairs=pairs, eta_prior=(3.0, 5.0), seed=1).votes


def test_marginal_fit_reaches_the_maximum_along_a_weakly_identified_ridge():
    model = Attentiveness().fit(_ridge_votes())
    assert _newton_gain(model) < 2e-5


def test_stopping_on_the_relative_change_alone_stops_short_of_the_maximum(monkeypatch):
    """Why the marginal fit climbs on with Newton: L-BFGS's relative-change rule alone stops early."""
    from heedful.inference import marginal

    monkeypatch.setattr(marginal, "STOP_GAIN", 1e9)
    monkeypatch.setattr(marginal, "NEWTON_STEPS", 0)
    assert _newton_gain(Attentiveness().fit(_ridge_votes())) > 5e-4


def test_profile_interval_ends_where_the_brute_force_profile_crosses_the_threshold():
    """The profile's ends: l_max - l_p(mu) = chi2_1(level) / 2, with l_p re-maximised independently over (a, b)."""
    pairs = [("gpt", "llama", 0.8), ("claude", "vicuna", 0.7)]
    sim = simulate(400, 12, eta_prior=(3.0, 4.0), pairs=pairs, seed=3)
    priors = Priors(pairs=(PairPrior("gpt", "llama", mu=0.8),))
    model = Attentiveness(priors=priors, options={"profile": True}).fit(sim.votes)
    p = int(np.flatnonzero(model.pairs_.model_a == "claude")[0])
    prof, mu_hat = model.fit_.profiles[p], model.pairs_.mu.iloc[p]
    f = _brute_force_loglik(sim.votes)

    def drop_at(mu: float) -> float:
        res = optimize.minimize(lambda th: -f(np.exp(th[0]), np.exp(th[1]), {"gpt|llama": 0.8, "claude|vicuna": mu}),
                                x0=[np.log(model.eta_prior_["a"]), np.log(model.eta_prior_["b"])],
                                method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
        return model.log_likelihood_ + res.fun

    drop = stats.chi2.ppf(prof["level"], 1) / 2
    assert 0.5 < prof["lo"] < mu_hat < prof["hi"] < 1.0
    for end, outward in ((prof["lo"], -0.01), (prof["hi"], 0.01)):
        assert drop_at(end) == pytest.approx(drop, abs=0.01)
        assert drop_at(end + outward) > drop + 0.05                        # a crossing, not a plateau
