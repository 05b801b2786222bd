"""heedful filter: the audit (every row once, one reason), the rules, weights, epsilon, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from heedful.cli import app
from heedful.errors import InputError
from heedful.filtering import REASONS, Fit, Rule, filter_votes, load_fit


def _fit(rho=None) -> Fit:
    users = pd.DataFrame(
        {"user_id": ["good", "meh", "bad"], "eta_hat": [0.95, 0.55, 0.05], "eta_mean": [0.9, 0.5, 0.1]}
    )
    pairs = pd.DataFrame({"model_a": ["big"], "model_b": ["small"], "mu": [0.8]})
    return Fit(users=users, pairs=pairs, eta_prior=(2.0, 2.0), rho=rho)


def _messy() -> pd.DataFrame:
    """One row per reason, in a known order, plus kept rows."""
    rows = [
        # vote_id, user, model_a, model_b, choice, prompt, response_a, response_b  -> expected
        ("v0", "good", "big", "small", "a", "p", "A", "B"),  # kept
        ("v1", "good", "small", "big", "a", "p", "A", "B"),  # kept (pair listed the other way)
        ("v2", "good", "big", "big", "a", "p", "A", "B"),  # invalid: model_a == model_b
        ("v3", "good", "big", "small", "sideways", "p", "A", "B"),  # invalid: choice
        ("v4", None, "big", "small", "a", "p", "A", "B"),  # invalid: empty user
        ("v0", "good", "big", "small", "b", "p", "A", "B"),  # duplicate vote id
        ("v6", "good", "big", "small", "TIE", "p", "A", "B"),  # tie (normalised)
        ("v7", "good", "big", "small", "b", "p", "  ", "B"),  # missing text
        ("v8", "stranger", "big", "small", "a", "p", "A", "B"),  # user not in fit
        ("v9", "bad", "big", "small", "b", "p", "A", "B"),  # below threshold
        ("v10", "meh", "big", "small", "b", "p", "A", "B"),  # kept at min_eta 0.5
    ]
    return pd.DataFrame(
        rows, columns=["vote_id", "user_id", "model_a", "model_b", "choice", "prompt", "response_a", "response_b"]
    )


EXPECTED = [
    "kept",
    "kept",
    "invalid row",
    "invalid row",
    "invalid row",
    "duplicate vote id",
    "tie",
    "missing text",
    "user not in fit",
    "user below threshold",
    "kept",
]


def test_audit_lists_every_row_once_with_its_reason():
    votes = _messy()
    res = filter_votes(votes, _fit(), Rule(min_eta=0.5))
    a = res.audit
    assert len(a) == len(votes) and list(a.row) == list(range(len(votes)))
    got = np.where(a.status == "kept", "kept", a.reason)
    assert list(got) == EXPECTED
    assert list(a.detail[2:5]) == ["model_a equals model_b", "choice not a/b/tie", "empty user_id"]
    assert res.counts["kept"] + sum(res.counts[r] for r in REASONS) == res.counts["rows"] == len(votes)
    assert list(res.kept.vote_id) == ["v0", "v1", "v10"]
    assert np.allclose(res.kept.epsilon, [0.05, 0.05, 0.25])


def test_multi_turn_rows_need_the_conversational_format():
    votes = _messy().assign(turn=[1, 2] + [1] * 9)
    std = filter_votes(votes, _fit(), Rule(min_eta=0.5))
    assert std.audit.reason[1] == "multi-turn" and std.counts["multi-turn"] == 1
    conv = filter_votes(votes, _fit(), Rule(min_eta=0.5), conversational=True)
    assert conv.audit.status[1] == "kept"


def test_keep_fraction_keeps_the_most_attentive_users_first():
    rng = np.random.default_rng(0)
    n_users = 40
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(n_users)], "eta_mean": rng.random(n_users)})
    users["eta_hat"] = users.eta_mean
    counts = rng.integers(1, 20, n_users)
    uid = np.repeat(users.user_id.to_numpy(), counts)
    votes = pd.DataFrame({"user_id": uid, "model_a": "big", "model_b": "small", "choice": "a"})
    fit = Fit(
        users=users, pairs=pd.DataFrame({"model_a": ["big"], "model_b": ["small"], "mu": [0.8]}), eta_prior=(1.0, 1.0)
    )
    for f in (0.1, 0.5, 0.9, 1.0):
        res = filter_votes(votes, fit, Rule(keep_fraction=f))
        kept_users = set(res.kept.user_id)
        eta = users.set_index("user_id").eta_mean
        dropped = set(users.user_id) - kept_users
        if dropped:
            assert eta[list(kept_users)].min() > eta[list(dropped)].max()
        n_kept = len(res.kept)
        assert n_kept >= f * len(votes)  # reaches the fraction...
        weakest = eta[list(kept_users)].idxmin()
        assert n_kept - counts[users.user_id == weakest][0] < f * len(votes)  # ...with no user to spare


def test_posterior_from_files_matches_the_estimator(tmp_path):
    from heedful.inference import Attentiveness
    from heedful.outputs import write_fit
    from heedful.simulate import simulate

    sim = simulate(300, 12, eta_prior=(2.0, 2.0), vote_counts="geometric", tie_rate=0.05, seed=4)
    model = Attentiveness().fit(sim.votes)
    write_fit(tmp_path / "fit", model.users_, model.params())
    fit = load_fit(tmp_path / "fit")
    for tau in (0.3, 0.7):
        res = filter_votes(sim.votes, fit, Rule(min_prob=0.5, tau=tau))
        p = res.audit.groupby("user_id").prob_above.first().reindex(model.users_.user_id).to_numpy()
        assert np.allclose(p, model.prob_above(tau), atol=2e-3)
        assert not any("differ from the fit" in w for w in res.warnings)
        voted = model.users_.n_votes.to_numpy() > 0  # users with only ties have nothing to keep
        keep = set(model.users_.user_id[(model.prob_above(tau) >= 0.5 + 2e-3) & voted])
        assert keep <= set(res.kept.user_id)


@pytest.mark.parametrize("rho, rho_prior", [(None, None), (0.8, None), (0.6, (3.0, 2.0))])
def test_prob_above_matches_direct_integration(rho, rho_prior):
    """P(eta > tau) in the audit: the core's exact posterior given the fit, with position bias and gold labels."""
    from scipy import integrate

    votes = pd.DataFrame({
        "user_id": ["good"] * 4 + ["meh"] * 3,
        "model_a": ["big", "small", "big", "big", "big", "small", "big"],
        "model_b": ["small", "big", "small", "small", "small", "big", "small"],
        "choice": ["a", "b", "a", "b", "a", "a", "b"],
        "shown_first": ["a", "b", "b", "a", "a", "a", "b"],
        "gold": [None, None, "a", None, None, "b", None],
    })
    fit = _fit(rho=rho) if rho_prior is None else Fit(users=_fit().users, pairs=_fit().pairs, eta_prior=(2.0, 2.0),
                                                      rho=rho, rho_prior=rho_prior)
    res = filter_votes(votes, fit, Rule(min_prob=0.5, tau=0.6))
    got = res.audit.groupby("user_id").prob_above.first()
    picked_big = np.where(votes.choice == "a", votes.model_a, votes.model_b) == "big"
    gold_big = np.where(votes.gold == "a", votes.model_a, np.where(votes.gold == "b", votes.model_b, None))
    m = np.where(pd.notna(gold_big), (gold_big == np.where(picked_big, "big", "small")).astype(float),
                 np.where(picked_big, 0.8, 0.2))
    picked_first = (votes.choice == votes.shown_first).to_numpy()

    def lik(e, r, idx):
        c = np.full(idx.sum(), 0.5) if rho is None else np.where(picked_first[idx], r, 1 - r)
        return e * (1 - e) * np.prod(e * m[idx] + (1 - e) * c)   # Beta(2, 2) up to its constant

    for u in ("good", "meh"):
        idx = (votes.user_id == u).to_numpy()
        if rho_prior is None:
            z = integrate.quad(lambda e, idx=idx: lik(e, rho, idx), 0, 1)[0]
            tail = integrate.quad(lambda e, idx=idx: lik(e, rho, idx), 0.6, 1)[0] / z
        else:   # rho_u ~ Beta(3, 2) integrated too
            z = integrate.dblquad(lambda r, e, idx=idx: lik(e, r, idx) * r ** 2 * (1 - r), 0, 1, 0, 1)[0]
            tail = integrate.dblquad(lambda r, e, idx=idx: lik(e, r, idx) * r ** 2 * (1 - r), 0.6, 1, 0, 1)[0] / z
        assert got[u] == pytest.approx(tail, abs=1e-4)


def test_weights_and_position_bias_epsilon():
    votes = pd.DataFrame(
        {
            "user_id": ["meh"] * 4,
            "model_a": ["big", "big", "small", "small"],
            "model_b": ["small", "small", "big", "big"],
            "choice": ["a", "b", "b", "a"],
            "shown_first": ["a", "a", "b", "a"],
        }
    )
    plain = filter_votes(votes, _fit(), Rule(min_eta=0.0))
    assert "weight" not in plain.kept.columns
    assert np.allclose(plain.kept.epsilon, 0.25)
    res = filter_votes(votes, _fit(), Rule(min_eta=0.0), weights=True)
    # eta = 0.5, mu = 0.8: picked big -> 0.4 / (0.4 + 0.25); picked small -> 0.1 / (0.1 + 0.25)
    assert np.allclose(res.kept.weight, [0.4 / 0.65, 0.1 / 0.35, 0.4 / 0.65, 0.1 / 0.35])
    pos = filter_votes(votes, _fit(rho=0.9), Rule(min_eta=0.0), weights=True)
    # c = rho when the pick was shown first (rows 0, 2, 3), 1 - rho when shown second (row 1)
    c = np.array([0.9, 0.1, 0.9, 0.9])
    m = np.array([0.8, 0.2, 0.8, 0.2])
    assert np.allclose(pos.kept.weight, 0.5 * m / (0.5 * m + 0.5 * c))
    q = np.array([0.8, 0.8, 0.8, 0.2])  # P(first-shown is truly better)
    assert np.allclose(pos.kept.epsilon, 0.5 * (0.9 * (1 - q) + 0.1 * q))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"min_eta": 0.5, "keep_fraction": 0.5},
        {"min_prob": 0.9},
        {"min_eta": 1.5},
        {"keep_fraction": 0.0},
        {"min_prob": 0.9, "tau": 1.0},
    ],
)
def test_bad_rules_are_input_errors(kw):
    with pytest.raises(InputError):
        Rule(**kw)


def test_cli_prints_counts_summing_to_rows_and_writes_files(tmp_path):
    votes = _messy()
    votes.to_csv(tmp_path / "votes.csv", index=False)
    fit = _fit()
    (tmp_path / "fit").mkdir()
    fit.users.to_parquet(tmp_path / "fit" / "users.parquet")
    (tmp_path / "fit" / "params.json").write_text(
        json.dumps({"mu": fit.pairs.to_dict(orient="records"), "eta_prior": {"a": 2.0, "b": 2.0}})
    )
    out = CliRunner().invoke(
        app,
        [
            "filter",
            str(tmp_path / "votes.csv"),
            "--fit",
            str(tmp_path / "fit"),
            "--min-eta",
            "0.5",
            "-o",
            str(tmp_path / "dpo.jsonl"),
            "--audit",
            str(tmp_path / "audit.csv"),
        ],
        terminal_width=200,
    )
    assert out.exit_code == 0, out.output
    lines = {ln.split("  ")[0].strip(): ln.split()[-1] for ln in out.output.splitlines() if "  " in ln}
    nums = {k: int(v.replace(",", "")) for k, v in lines.items() if v.replace(",", "").isdigit()}
    parts = [nums["kept"]] + [nums[f"dropped: {r}"] for r in REASONS]
    assert sum(parts) == nums["input rows"] == len(votes)
    dpo = pd.read_json(tmp_path / "dpo.jsonl", lines=True)
    assert list(dpo.vote_id) == ["v0", "v1", "v10"] and list(dpo.chosen) == ["A", "A", "B"]
    assert list(dpo.model_chosen) == ["big", "small", "small"]
    audit = pd.read_csv(tmp_path / "audit.csv")
    assert len(audit) == len(votes) and (audit.status == "kept").sum() == 3


def test_cli_refuses_two_rules_with_exit_code_2(tmp_path):
    votes = _messy()
    votes.to_csv(tmp_path / "v.csv", index=False)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from heedful.cli import main; main()",
            "filter",
            str(tmp_path / "v.csv"),
            "--fit",
            str(tmp_path),
            "--min-eta",
            "0.5",
            "--keep-fraction",
            "0.5",
            "-o",
            str(tmp_path / "d.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "exactly one" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("position_bias", "rho", "noted"),
    [
        (None, None, False),
        ({"rho": 0.7, "lo": 0.6, "hi": 0.8, "learned": True}, 0.7, False),
        ({"per_user": True, "a": 6.0, "b": 2.0, "mean": 0.75, "learned": True}, 0.75, True),
    ],
)
def test_load_fit_reads_the_position_bias(tmp_path, position_bias, rho, noted):
    fit = _fit()
    fit.users.to_parquet(tmp_path / "users.parquet")
    (tmp_path / "params.json").write_text(
        json.dumps(
            {
                "mu": fit.pairs.to_dict(orient="records"),
                "eta_prior": {"a": 2.0, "b": 2.0},
                "position_bias": position_bias,
            }
        )
    )
    got = load_fit(tmp_path)
    assert got.rho == rho and got.eta_prior == (2.0, 2.0)
    assert bool(got.warnings) == noted
    res = filter_votes(_messy(), got, Rule(min_eta=0.5))
    assert any("per-user position bias" in w for w in res.warnings) == noted
