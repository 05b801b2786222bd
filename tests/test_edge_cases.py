"""Numerical edge cases: one-vote users, users who always pick the same side, eta near 0 or 1, mu near
1/2, float32 against float64, vote counts in the billions. Whatever the fit says, no NaN reaches an
output file: users.parquet is finite and inside [0, 1], params.json has no NaN/Infinity (undefined
intervals are written as null, beside a warning that says why).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from heedful.config import priors_from_dict
from heedful.inference import Attentiveness
from heedful.outputs import write_fit
from heedful.simulate import simulate
from heedful.suffstats import vote_stats

KNOWN = priors_from_dict({"pairs": [{"model_a": "strong-model", "model_b": "weak-model", "mu": 0.8}]})
ETA = ["eta_hat", "eta_mean", "eta_lo", "eta_hi"]


def _refuse(token: str):
    raise AssertionError(f"params.json holds {token}")


def check_outputs(model: Attentiveness, folder: Path) -> pd.DataFrame:
    """Write the fit as the CLI does and check the files: finite, in range, ordered, JSON without NaN."""
    write_fit(folder, model.users_, model.params())
    users = pd.read_parquet(folder / "users.parquet")
    num = users.select_dtypes("number").to_numpy(dtype=float)
    assert np.isfinite(num).all(), users[~np.isfinite(num).all(axis=1)]
    eta = users[ETA].to_numpy()
    assert ((eta >= 0) & (eta <= 1)).all()
    assert (users.eta_lo <= users.eta_mean + 1e-12).all() and (users.eta_mean <= users.eta_hi + 1e-12).all()
    params = json.loads((folder / "params.json").read_text(), parse_constant=_refuse)
    for pair in params["mu"]:
        assert 0 <= pair["mu"] <= 1
        if pair["mu_lo"] is None:       # an undefined interval is said so in a warning
            assert any("interval" in w or "identified" in w for w in params["warnings"]), params["warnings"]
    return users


@pytest.mark.parametrize("method", ["marginal", "em"])
def test_users_with_one_vote(method, tmp_path):
    n = 200
    votes = pd.DataFrame({"user_id": [f"u{i}" for i in range(n)], "model_a": "strong-model",
                          "model_b": "weak-model", "choice": np.where(np.arange(n) % 3, "a", "b")})
    users = check_outputs(Attentiveness(method=method, device="cpu").fit(votes), tmp_path)
    assert (users.n_votes == 1).all()
    if method == "marginal":     # one vote says little: the intervals stay wide
        assert ((users.eta_hi - users.eta_lo) > 0.3).all()


@pytest.mark.parametrize("method", ["marginal", "em"])
def test_users_who_always_pick_the_same_side(method, tmp_path):
    """Half the users always pick the stronger model, half always the weaker; mu known."""
    votes = pd.DataFrame({"user_id": np.repeat([f"u{i}" for i in range(40)], 10), "model_a": "strong-model",
                          "model_b": "weak-model", "choice": np.repeat(np.where(np.arange(40) % 2, "a", "b"), 10)})
    users = check_outputs(Attentiveness(method=method, priors=KNOWN, device="cpu").fit(votes), tmp_path)
    strong = users.user_id.isin([f"u{i}" for i in range(1, 40, 2)])
    assert users.eta_mean[strong].min() > users.eta_mean[~strong].max()


@pytest.mark.parametrize("prior", [(0.05, 50.0), (50.0, 0.05)], ids=["eta-near-0", "eta-near-1"])
@pytest.mark.parametrize("method", ["marginal", "em"])
def test_eta_near_the_edges(prior, method, tmp_path):
    votes = simulate(300, 10, eta_prior=prior, seed=1).votes
    users = check_outputs(Attentiveness(method=method, priors=KNOWN, device="cpu").fit(votes), tmp_path)
    if method == "marginal":
        assert (users.eta_mean.mean() < 0.3) if prior[0] < 1 else (users.eta_mean.mean() > 0.7)


def test_mu_near_one_half_learned_warns(tmp_path):
    votes = simulate(500, 10, mu=0.5, seed=2).votes
    model = Attentiveness(device="cpu").fit(votes)
    check_outputs(model, tmp_path)
    assert any("close to 1/2" in w for w in model.warnings_), model.warnings_


def test_mu_known_one_half_warns():
    votes = simulate(200, 10, mu=0.5, seed=2).votes
    half = priors_from_dict({"pairs": [{"model_a": "strong-model", "model_b": "weak-model", "mu": 0.5}]})
    model = Attentiveness(priors=half, device="cpu").fit(votes)
    assert any("1/2" in w for w in model.warnings_), model.warnings_


@pytest.mark.parametrize("method,tol", [("marginal", 1e-2), ("em", 2e-2)])
def test_float32_agrees_with_float64(method, tol, tmp_path):
    """With mu known the problem is well posed and the two precisions agree; float32 writes no NaN."""
    votes = simulate(300, 10, seed=5).votes
    fits = {dt: Attentiveness(method=method, priors=KNOWN, dtype=dt, device="cpu").fit(votes)
            for dt in ("float64", "float32")}
    u32 = check_outputs(fits["float32"], tmp_path)
    u64 = fits["float64"].users_
    assert fits["float32"].params()["dtype"] == "float32"
    assert np.abs(u32[ETA].to_numpy() - u64[ETA].to_numpy()).max() < tol


def _scaled(factor: int):
    stats = vote_stats(simulate(50, 20, seed=4).votes)
    return dataclasses.replace(stats, cell_count=stats.cell_count * factor, user_ties=stats.user_ties * factor,
                               pair_ties=stats.pair_ties * factor, n_rows=stats.n_rows * factor)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ["marginal", "em"])
def test_vote_counts_in_the_billions(method, dtype, tmp_path):
    """2e9 votes per user, 1e11 in all: counts stay exact int64, nothing overflows or turns NaN."""
    stats = _scaled(10**8)
    model = Attentiveness(method=method, dtype=dtype, device="cpu").fit(stats)
    users = check_outputs(model, tmp_path)
    assert users.n_votes.dtype == np.int64 and (users.n_votes == 2 * 10**9).all()
    params = model.params()
    assert params["n_votes"] == 10**11 and params["n_rows"] == stats.n_rows
    assert np.isfinite(params["log_likelihood"])


@pytest.mark.xfail(strict=True, reason="inference/posterior.py: eta_sd collapses to 0.0 once a user has ~1e6+ "
                   "votes, while eta_lo < eta_hi still gives an interval of width ~3e-3 (cancellation in the "
                   "variance, or the quadrature cannot resolve so narrow a posterior)")
def test_eta_sd_matches_the_interval_with_billions_of_votes():
    users = Attentiveness(device="cpu").fit(_scaled(10**8)).users_
    width = (users.eta_hi - users.eta_lo) / 3.29          # a central 90% interval is about 3.29 sd wide
    wide = width > 1e-6
    assert (users.eta_sd[wide] > 0.3 * width[wide]).all()
