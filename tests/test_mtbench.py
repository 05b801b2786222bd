"""The MT-bench demo log: real text when ../shared/data is there, the truth kept, the demo end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from heedful.cli import app
from heedful.mtbench import agreement, default_data_dir, pair_mu, simulate_mtbench

REAL = default_data_dir()


def test_synthetic_log_follows_the_behaviour_model():
    sim, corpus = simulate_mtbench(3000, 10, data_dir=None, rho=0.9, tie_rate=0.0, seed=1)
    v, u = sim.votes, sim.users
    assert not corpus.real and v.prompt.str.startswith("Synthetic question").all()
    assert (v.choice[v.true_attentive] == v.true_better[v.true_attentive]).all()  # attentive: y = t
    casual = v[~v.true_attentive]
    assert abs((casual.choice == casual.shown_first).mean() - 0.9) < 0.02  # position bias
    for a, b, mu in pair_mu():  # truth rate per pair
        on = ((v.model_a == a) & (v.model_b == b)) | ((v.model_a == b) & (v.model_b == a))
        strong_won = np.where(v.model_a[on] == a, v.true_better[on] == "a", v.true_better[on] == "b")
        assert abs(strong_won.mean() - mu) < 0.03
    assert u.n_rows.sum() == len(v) and u.n_rows.max() > 8 * u.n_rows.mean()  # heavy tail
    assert set(u.true_type) == {"attentive", "casual"}
    assert u.true_eta[u.true_type == "attentive"].mean() > 0.7 > 0.3 > u.true_eta[u.true_type == "casual"].mean()
    assert (v.response_a == "Synthetic answer of " + v.model_a + " to question " + v.question_id.astype(str)).all()


@pytest.mark.skipif(REAL is None, reason="../shared/data/mt-bench is absent")
def test_real_text_is_mtbench_answers():
    sim, corpus = simulate_mtbench(50, 5, data_dir=REAL, seed=2)
    assert corpus.real
    v = sim.votes.iloc[0]
    rows = [json.loads(x) for x in (REAL / "model_answer" / f"{v.model_b}.jsonl").read_text().splitlines()]
    ans = next(r for r in rows if r["question_id"] == v.question_id)["choices"][0]["turns"][0]
    q = next(
        json.loads(x)
        for x in (REAL / "question.jsonl").read_text().splitlines()
        if json.loads(x)["question_id"] == v.question_id
    )
    assert v.response_b == ans and v.prompt == q["turns"][0]


def test_demo_end_to_end_filters_toward_the_truth(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(
        app, ["demo", "-o", str(out), "--users", "400", "--votes-per-user", "12", "--seed", "3"], terminal_width=200
    )
    assert r.exit_code == 0, r.output
    votes = pd.read_parquet(out / "votes.parquet")
    audit = pd.read_parquet(out / "audit.parquet")
    dpo = pd.read_json(out / "dpo.jsonl", lines=True, dtype=False)
    assert len(audit) == len(votes) and (audit.status == "kept").sum() == len(dpo) > 0
    assert {"prompt", "chosen", "rejected", "user_id", "vote_id", "eta_hat", "epsilon"} <= set(dpo.columns)
    kept = votes.set_index("vote_id").loc[dpo.vote_id.astype(str)]
    pick_a = kept.choice.to_numpy() == "a"
    assert (dpo.chosen.to_numpy() == np.where(pick_a, kept.response_a, kept.response_b)).all()
    assert (dpo.rejected.to_numpy() == np.where(pick_a, kept.response_b, kept.response_a)).all()
    n_all, agree_all = agreement(votes)
    n_kept, agree_kept = agreement(votes, audit.row[audit.status == "kept"].to_numpy())
    assert n_kept < n_all and agree_kept > agree_all + 0.05
    assert "all non-tie votes" in r.output and "a DPO record" in r.output
