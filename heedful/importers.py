"""Public preference formats -> heedful's vote table (user_id, model_a, model_b, choice, prompt, ...).

- Chatbot Arena battles (``clean_battle`` JSON array or JSON lines): ``judge`` is the user,
  ``winner`` in model_a / model_b / tie / tie (bothbad) -> a / b / tie, ``question_id`` the vote id.
  ``prompt``/``response_a``/``response_b`` are the first user turn and the first answers;
  ``messages_a``/``messages_b`` hold the whole conversations (JSON), so multi-turn battles
  (``turn`` > 1) export conversationally. ``tie (bothbad)`` is kept in ``winner_raw``.
- PandaLM test set (``testset-v1.json``): each annotator is a user; labels 0 tie, 1 response1,
  2 response2; ``cmp_key`` = "<model of response1>_<model of response2>"; prompt = instruction +
  input. Judge files (GPT-3.5, PandaLM-7B: ``<name>_result`` by ``idx``) can be added as more users;
judge outputs that are no label (GPT-3.5's 'garbage') are skipped and counted in ``attrs["skipped"]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from heedful.errors import InputError

ARENA_WINNERS = {"model_a": "a", "model_b": "b", "tie": "tie", "tie (bothbad)": "tie"}
PANDALM_LABELS = {"0": "tie", "1": "a", "2": "b", "tie": "tie"}
ARENA_PASS = ("turn", "language", "anony", "tstamp")


def _read_records(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return pd.DataFrame(json.loads(text))
        return pd.read_json(path, lines=True, dtype=False)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not JSON or JSON lines ({str(e).splitlines()[0]})") from e


def _need(df: pd.DataFrame, cols: tuple[str, ...], source: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(f"{source}: missing field(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}")


def _first(conv: object, role: str) -> str | None:
    if not isinstance(conv, (list, tuple, np.ndarray)):
        return None
    return next((str(m.get("content")) for m in conv if isinstance(m, dict) and m.get("role") == role), None)


def arena_votes(battles: pd.DataFrame, *, source: str = "battles") -> pd.DataFrame:
    """Chatbot Arena battle records -> vote table (rows in the input's order)."""
    _need(battles, ("question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b"), source)
    winner = battles.winner.astype("string").str.strip().str.lower()
    choice = winner.map(ARENA_WINNERS)
    bad = choice.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{source}: row {i + 1} has winner {battles.winner.iloc[i]!r}; expected one of "
            f"{', '.join(ARENA_WINNERS)} ({int(bad.sum())} such rows)"
        )
    conv_a, conv_b = battles.conversation_a.tolist(), battles.conversation_b.tolist()
    votes = pd.DataFrame(
        {
            "vote_id": battles.question_id.astype(str).to_numpy(dtype=object),
            "user_id": battles.judge.astype(str).to_numpy(dtype=object),
            "model_a": battles.model_a.astype(str).to_numpy(dtype=object),
            "model_b": battles.model_b.astype(str).to_numpy(dtype=object),
            "choice": choice.to_numpy(dtype=object),
            "prompt": [_first(c, "user") for c in conv_a],
            "response_a": [_first(c, "assistant") for c in conv_a],
            "response_b": [_first(c, "assistant") for c in conv_b],
            "messages_a": [json.dumps(list(c), ensure_ascii=False) for c in conv_a],
            "messages_b": [json.dumps(list(c), ensure_ascii=False) for c in conv_b],
            "winner_raw": battles.winner.to_numpy(dtype=object),
        }
    )
    for c in ARENA_PASS:
        if c in battles.columns:
            votes[c] = battles[c].to_numpy()
    return votes


def read_arena(path: str | Path) -> pd.DataFrame:
    """Read a Chatbot Arena battle file (JSON array or JSON lines) into a vote table."""
    return arena_votes(_read_records(path), source=str(path))


def _pandalm_choice(col: pd.Series, source: str, name: str, strict: bool = True) -> np.ndarray:
    raw = col.astype("string").str.strip().str.lower()
    choice = raw.map(PANDALM_LABELS)
    bad = choice.isna().to_numpy()
    if bad.any() and strict:
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{source}: {name} on row {i + 1} is {col.iloc[i]!r}; expected 0 (tie), 1 or 2")
    return choice.to_numpy(dtype=object)


def pandalm_votes(
    items: pd.DataFrame,
    *,
    annotators: tuple[str, ...] = ("annotator1", "annotator2", "annotator3"),
    judges: dict[str, pd.DataFrame] | None = None,
    source: str = "pandalm",
) -> pd.DataFrame:
    """PandaLM items -> one vote per (item, annotator); ``judges``: name -> frame with idx, <name>_result."""
    _need(items, ("idx", "cmp_key", "instruction", "input", "response1", "response2", *annotators), source)
    models = items.cmp_key.astype(str).str.split("_")
    bad = (models.str.len() != 2).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{source}: cmp_key {items.cmp_key.iloc[i]!r} on row {i + 1} is not '<model1>_<model2>'")
    inp = items.input.fillna("").astype(str)
    base = pd.DataFrame(
        {
            "idx": items.idx.astype(str).to_numpy(dtype=object),
            "model_a": models.str[0].to_numpy(dtype=object),
            "model_b": models.str[1].to_numpy(dtype=object),
            "prompt": (items.instruction.astype(str) + np.where(inp.str.strip() != "", "\n\n" + inp, "")).to_numpy(),
            "response_a": items.response1.astype(str).to_numpy(dtype=object),
            "response_b": items.response2.astype(str).to_numpy(dtype=object),
            "motivation_app": items.get("motivation_app", pd.Series(None, index=items.index)).to_numpy(dtype=object),
        }
    )
    labels = {a: _pandalm_choice(items[a], source, a) for a in annotators}
    human = pd.DataFrame(labels)
    counts = pd.concat([(human == v).sum(axis=1).rename(v) for v in ("a", "b", "tie")], axis=1)
    top = counts.max(axis=1)
    base["human_majority"] = np.where(
        (counts == top.to_numpy()[:, None]).sum(axis=1) == 1, counts.idxmax(axis=1), None
    ).astype(object)
    for name, frame in (judges or {}).items():
        col = f"{name}_result" if f"{name}_result" in frame.columns else None
        col = col or next((c for c in frame.columns if str(c).endswith("_result")), None)
        if col is None or "idx" not in frame.columns:
            raise InputError(f"{source}: judge {name!r} needs fields idx and <name>_result")
        res = frame.assign(idx=frame.idx.astype(str)).set_index("idx")[col]
        labels[name] = _pandalm_choice(base.idx.map(res), f"{source} judge {name}", col, strict=False)
    parts = [base.assign(user_id=who, choice=lab, vote_id=base.idx + "-" + who) for who, lab in labels.items()]
    cols = [
        "vote_id",
        "user_id",
        "model_a",
        "model_b",
        "choice",
        "prompt",
        "response_a",
        "response_b",
        "idx",
        "human_majority",
        "motivation_app",
    ]
    votes = pd.concat(parts, ignore_index=True)[cols]
    unusable = votes.choice.isna()
    votes = votes[~unusable].reset_index(drop=True)
    votes.attrs["skipped"] = int(unusable.sum())  # judge outputs that are no label (e.g. 'garbage')
    return votes


def read_pandalm(path: str | Path, judges: dict[str, str | Path] | None = None) -> pd.DataFrame:
    """Read PandaLM's ``testset-v1.json`` (and judge files, name -> path) into a vote table."""
    frames = {name: _read_records(p) for name, p in (judges or {}).items()}
    return pandalm_votes(_read_records(path), judges=frames, source=str(path))
