"""Importers: Chatbot Arena battles and PandaLM, on small fixtures written here in those formats."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from heedful.cli import app
from heedful.dpo import dpo_records
from heedful.errors import InputError
from heedful.filtering import Fit, Rule, filter_votes
from heedful.importers import read_arena, read_pandalm
from heedful.votes import validate_votes

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _conv(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


BATTLES = [
    {
        "question_id": "q1",
        "model_a": "gpt-4",
        "model_b": "llama-13b",
        "winner": "model_a",
        "judge": "arena_user_1",
        "conversation_a": _conv("hi?", "Hello!"),
        "conversation_b": _conv("hi?", "hey"),
        "turn": 1,
        "anony": True,
        "language": "English",
        "tstamp": 1687000000.0,
    },
    {
        "question_id": "q2",
        "model_a": "vicuna-13b",
        "model_b": "gpt-4",
        "winner": "tie (bothbad)",
        "judge": "arena_user_2",
        "conversation_a": _conv("2+2?", "5"),
        "conversation_b": _conv("2+2?", "22"),
        "turn": 1,
        "anony": True,
        "language": "English",
        "tstamp": 1687000001.0,
    },
    {
        "question_id": "q3",
        "model_a": "claude-v1",
        "model_b": "alpaca-13b",
        "winner": "model_b",
        "judge": "arena_user_1",
        "conversation_a": _conv("poem", "A1", "shorter", "A2"),
        "conversation_b": _conv("poem", "B1", "shorter", "B2"),
        "turn": 2,
        "anony": False,
        "language": "English",
        "tstamp": 1687000002.0,
    },
    {
        "question_id": "q4",
        "model_a": "gpt-4",
        "model_b": "claude-v1",
        "winner": "tie",
        "judge": "arena_user_3",
        "conversation_a": _conv("x", "y"),
        "conversation_b": _conv("x", "z"),
        "turn": 1,
        "anony": True,
        "language": "German",
        "tstamp": 1687000003.0,
    },
]


@pytest.mark.parametrize("layout", ["array", "lines"])
def test_arena_battles_become_votes(tmp_path, layout):
    path = tmp_path / ("battles.json" if layout == "array" else "battles.jsonl")
    if layout == "array":
        path.write_text(json.dumps(BATTLES))
    else:
        path.write_text("\n".join(json.dumps(b) for b in BATTLES) + "\n")
    v = validate_votes(read_arena(path))
    assert list(v.user_id) == ["arena_user_1", "arena_user_2", "arena_user_1", "arena_user_3"]
    assert list(v.choice) == ["a", "tie", "b", "tie"]
    assert list(v.winner_raw) == ["model_a", "tie (bothbad)", "model_b", "tie"]
    assert list(v.vote_id) == ["q1", "q2", "q3", "q4"]
    assert v.prompt[0] == "hi?" and v.response_a[0] == "Hello!" and v.response_b[0] == "hey"
    assert json.loads(v.messages_b[2]) == BATTLES[2]["conversation_b"]
    assert list(v.turn) == [1, 1, 2, 1] and list(v.language)[-1] == "German"


def test_arena_multi_turn_exports_conversationally():
    v = read_arena_frame()
    users = pd.DataFrame({"user_id": ["arena_user_1", "arena_user_2", "arena_user_3"], "eta_hat": 0.9, "eta_mean": 0.9})
    fit = Fit(
        users=users,
        pairs=pd.DataFrame({"model_a": ["gpt-4"], "model_b": ["llama-13b"], "mu": [0.9]}),
        eta_prior=(1.0, 1.0),
    )
    std = filter_votes(v, fit, Rule(min_eta=0.5))
    assert list(std.audit.reason.fillna("-")) == ["-", "tie", "multi-turn", "tie"]
    conv = filter_votes(v, fit, Rule(min_eta=0.5), conversational=True)
    rec = dpo_records(conv.kept, "conversational")
    assert len(rec) == 2
    assert rec.prompt[1] == _conv("poem") and rec.model_chosen[1] == "alpaca-13b"
    assert rec.chosen[1] == _conv("poem", "B1", "shorter", "B2")[1:]
    assert rec.rejected[1] == _conv("poem", "A1", "shorter", "A2")[1:]


def read_arena_frame() -> pd.DataFrame:
    from heedful.importers import arena_votes

    return arena_votes(pd.DataFrame(BATTLES))


def test_arena_unknown_winner_is_an_input_error(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps([{**BATTLES[0], "winner": "model_c"}]))
    with pytest.raises(InputError, match="row 1 has winner 'model_c'"):
        read_arena(path)


ITEMS = [
    {
        "idx": "0",
        "motivation_app": "Grammarly",
        "cmp_key": "bloom-7b_llama-7b",
        "instruction": "Rewrite.",
        "input": "Some text.",
        "response1": "R1",
        "response2": "R2",
        "annotator1": 2,
        "annotator2": 2,
        "annotator3": 1,
    },
    {
        "idx": "1",
        "motivation_app": "Gmail",
        "cmp_key": "opt-7b_pythia-6.9b",
        "instruction": "Write a mail.",
        "input": "",
        "response1": "M1",
        "response2": "M2",
        "annotator1": 0,
        "annotator2": 1,
        "annotator3": 2,
    },
]


def test_pandalm_each_annotator_is_a_user(tmp_path):
    (tmp_path / "testset.json").write_text(json.dumps(ITEMS))
    (tmp_path / "gpt.json").write_text(
        json.dumps([{"idx": "0", "gpt_result": "Tie"}, {"idx": "1", "gpt_result": "garbage"}])
    )
    v = validate_votes(read_pandalm(tmp_path / "testset.json", {"gpt": tmp_path / "gpt.json"}))
    assert len(v) == 2 * 3 + 1 and v.attrs["skipped"] == 1
    one = v[v.user_id == "annotator1"]
    assert list(one.choice) == ["b", "tie"] and list(one.model_a) == ["bloom-7b", "opt-7b"]
    assert list(one.model_b) == ["llama-7b", "pythia-6.9b"]
    assert list(one.prompt) == ["Rewrite.\n\nSome text.", "Write a mail."]
    assert one.human_majority.iloc[0] == "b" and pd.isna(one.human_majority.iloc[1])  # a 3-way split: none
    assert list(v[v.user_id == "annotator3"].choice) == ["a", "b"]
    assert list(v[v.user_id == "gpt"].choice) == ["tie"]
    assert v.vote_id.is_unique


def test_pandalm_bad_label_is_an_input_error(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([{**ITEMS[0], "annotator2": 7}]))
    with pytest.raises(InputError, match="annotator2 on row 1"):
        read_pandalm(tmp_path / "t.json")


def test_import_commands(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(BATTLES))
    (tmp_path / "t.json").write_text(json.dumps(ITEMS))
    r = CliRunner().invoke(app, ["import-arena", str(tmp_path / "b.json"), "-o", str(tmp_path / "a.parquet")])
    assert r.exit_code == 0, r.output
    assert len(pd.read_parquet(tmp_path / "a.parquet")) == 4
    r = CliRunner().invoke(app, ["import-pandalm", str(tmp_path / "t.json"), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 6


@pytest.mark.skipif(not (DATA / "pandalm" / "testset-v1.json").exists(), reason="../shared/data is absent")
def test_pandalm_real_file_has_the_documented_shape():
    v = read_pandalm(DATA / "pandalm" / "testset-v1.json")
    assert len(v) == 3 * 999 and v.user_id.nunique() == 3
    assert set(v.model_a) | set(v.model_b) == {"bloom-7b", "cerebras-gpt-6.7B", "llama-7b", "opt-7b", "pythia-6.9b"}
    tie_rate = (v.choice == "tie").mean()
    assert 0.10 < tie_rate < 0.12  # README: ties are 10.9% of labels
