"""Behaviour real users have: strengths, position bias (global and per user), gold labels."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import special, stats

from heedful.config import PairPrior, Priors, priors_from_dict
from heedful.inference import Attentiveness
from heedful.model.likelihood import build_plan, log_marginal
from heedful.simulate import default_strengths, pairs_from_strengths, simulate
from heedful.suffstats import vote_stats

F64 = torch.float64


def test_per_user_rho_marginal_equals_brute_force_2d_integral():
    sim = simulate(8, 6, pairs=pairs_from_strengths(default_strengths(3)), position_share=0.5, gold_rate=0.2,
                   seed=11)
    v = sim.votes[sim.votes.choice != "tie"]
    st = vote_stats(sim.votes)
    plan = build_plan(st, torch.device("cpu"), F64)
    a, b, ar, br = 2.0, 3.0, 1.5, 2.5
    mu = {(x, y): m for x, y, m in pairs_from_strengths(default_strengths(3))}
    mu_t = torch.tensor([mu[tuple(p)] for p in st.pairs], dtype=F64)
    fast = float(log_marginal(plan, torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64), mu_t, None,
                              (torch.tensor(ar, dtype=F64), torch.tensor(br, dtype=F64))))
    # brute force from the rows: P(pick | eta, rho) = c + eta (m - c), with m from mu or gold, c from rho
    first_model = np.where(v.model_a < v.model_b, v.model_a, v.model_b)
    picked = np.where(v.choice == "a", v.model_a, v.model_b)
    key = list(zip(first_model, np.where(v.model_a < v.model_b, v.model_b, v.model_a), strict=True))
    mu_row = np.array([mu[k] for k in key])
    m = np.where(picked == first_model, mu_row, 1 - mu_row)
    gold = v.gold.to_numpy()
    has_gold = pd.notna(gold)
    gold_model = np.where(gold == "a", v.model_a, v.model_b)
    m = np.where(has_gold, (gold_model == picked).astype(float), m)
    picked_first = (picked == np.where(v.shown_first == "a", v.model_a, v.model_b))
    x, w = special.roots_legendre(200)
    e, we = (x + 1) / 2, w / 2
    E, R = np.meshgrid(e, e, indexing="ij")
    W = np.outer(we * stats.beta.pdf(e, a, b), we * stats.beta.pdf(e, ar, br))
    total = 0.0
    for u in v.user_id.unique():   # a handful of users: a loop here is the independent check
        i = (v.user_id == u).to_numpy()
        c = np.where(picked_first[i][:, None, None], R[None], 1 - R[None])
        lik = np.prod(c + E[None] * (m[i][:, None, None] - c), axis=0)
        total += np.log((lik * W).sum())
    gm = np.where(has_gold, (gold_model == first_model), False)
    total += float(np.sum(np.log(np.where(gm, mu_row, 1 - mu_row))[has_gold]))
    t = sim.votes[(sim.votes.choice == "tie") & sim.votes.gold.notna()]
    if len(t):
        fm = np.where(t.model_a < t.model_b, t.model_a, t.model_b)
        gm2 = np.where(t.gold == "a", t.model_a, t.model_b) == fm
        mr = np.array([mu[k] for k in zip(fm, np.where(t.model_a < t.model_b, t.model_b, t.model_a), strict=True)])
        total += float(np.sum(np.log(np.where(gm2, mr, 1 - mr))))
    assert fast == pytest.approx(total, abs=1e-6)


def test_strengths_and_global_rho_recovered():
    strengths = default_strengths(5, spread=2.0)
    sim = simulate(4000, 12, pairs=pairs_from_strengths(strengths), vote_counts="geometric",
                   eta_mixture=[(0.65, 8, 2), (0.35, 1, 5)], position_share=1.0, position_rho=0.75, seed=12)
    priors = priors_from_dict({"behaviour": {"casual": "position"},
                               "generators": {"mu": "strengths", "reference": "gen-4"}})
    model = Attentiveness(priors=priors).fit(sim.votes)
    assert model.rho_["lo"] <= 0.75 <= model.rho_["hi"]
    assert abs(model.rho_["rho"] - 0.75) < 0.03
    for name, s in strengths.items():
        got = model.strengths_[name]
        assert abs(got["strength"] - s) < 0.25, (name, got, s)
    assert model.strengths_["gen-4"]["reference"] and model.strengths_["gen-4"]["strength"] == 0


def test_per_user_rho_fit_runs_and_separates_biased_casual_users():
    sim = simulate(1500, 15, mu=0.8, eta_mixture=[(0.6, 8, 2), (0.4, 1, 5)], position_share=0.5,
                   position_rho=0.9, seed=13)
    priors = priors_from_dict({"behaviour": {"casual": "position", "rho_per_user": "learn"},
                               "pairs": [{"model_a": "strong-model", "model_b": "weak-model", "mu": 0.8}]})
    model = Attentiveness(priors=priors).fit(sim.votes)
    rp = model.rho_
    assert rp["per_user"] and 0.5 < rp["mean"] < 0.8   # half the users at 0.5, half at 0.9
    u = model.users_.merge(sim.users, on="user_id")
    assert np.isfinite(u[["eta_hat", "eta_mean", "eta_lo", "eta_hi"]].to_numpy()).all()
    assert ((u.eta_lo <= u.eta_mean) & (u.eta_mean <= u.eta_hi)).all()
    inside = ((u.true_eta >= u.eta_lo) & (u.true_eta <= u.eta_hi)).mean()
    assert 0.84 <= inside <= 0.96


def test_em_with_position_bias_and_gold():
    sim = simulate(800, 15, mu=0.8, eta_prior=(3, 3), position_share=1.0, position_rho=0.7, gold_rate=0.1,
                   seed=14)
    priors = priors_from_dict({"population": {"eta": "Beta(3, 3)"}, "behaviour": {"casual": "position"}})
    em = Attentiveness(method="em", priors=priors).fit(sim.votes)
    marg = Attentiveness(priors=priors).fit(sim.votes)
    assert em.converged_ and abs(em.rho_["rho"] - 0.7) < 0.05 and abs(marg.rho_["rho"] - 0.7) < 0.05


@pytest.mark.parametrize("n_gold", [0, 400])
def test_gold_votes_pin_mu(n_gold):
    """Gold labels observe the truth of a vote: mu's interval narrows with them, free of the eta ridge."""
    sim = simulate(600, 10, mu=0.8, eta_prior=(2, 5), gold_rate=n_gold / 6000, seed=15)
    model = Attentiveness().fit(sim.votes)
    row = model.pairs_.iloc[0]
    width = row.mu_hi - row.mu_lo
    if n_gold:
        assert width < 0.12 and row.mu_lo <= 0.8 <= row.mu_hi
    else:
        assert width > 0.2


def test_position_config_needs_shown_first():
    sim = simulate(50, 5, seed=16)
    with pytest.raises(Exception, match="shown_first"):
        Attentiveness(priors=Priors(casual="position")).fit(sim.votes.drop(columns=["shown_first"]))


def test_strengths_reject_pair_entries():
    sim = simulate(50, 5, seed=17)
    with pytest.raises(Exception, match="strengths"):
        Attentiveness(priors=Priors(mu_model="strengths",
                                    pairs=(PairPrior("strong-model", "weak-model", mu=0.8),))).fit(sim.votes)
