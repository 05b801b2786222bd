"""Kept votes -> TRL DPO records (``prompt``/``chosen``/``rejected``), standard or conversational.

Standard: plain strings. Conversational: message lists, ``prompt = [{"role": "user", ...}]`` and
``chosen``/``rejected = [{"role": "assistant", ...}, ...]``. A vote with ``messages_a``/``messages_b``
(JSON lists of messages, e.g. multi-turn Chatbot Arena battles) is split at the first assistant
message: what comes before is the prompt, the rest of each side is chosen/rejected.

Beside the TRL columns: ``user_id``, ``vote_id``, ``model_chosen``, ``model_rejected``, ``eta_hat``,
``eta_mean``, ``epsilon`` = (1 - eta_mean) / 2 (the probability that the label is flipped against the
truth), and ``weight`` when asked for. TRL ignores extra columns; :mod:`heedful.robust_dpo` uses epsilon.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from heedful.errors import InputError
from heedful.outputs import write_table

FORMATS = ("standard", "conversational")
EXTRA = ("user_id", "vote_id", "model_chosen", "model_rejected", "eta_hat", "eta_mean", "epsilon")


def _messages(text: object) -> list[dict] | None:
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    msgs = json.loads(text) if isinstance(text, str) else list(text)
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]


def _split(msgs: list[dict]) -> tuple[list[dict], list[dict]]:
    k = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    return msgs[:k], msgs[k:]


def _conversational(kept: pd.DataFrame, pick_a: np.ndarray) -> tuple[list, list, list]:
    """Message lists per record: from messages_a/messages_b where present, else from the text columns."""
    chosen_text = np.where(pick_a, kept.response_a, kept.response_b)
    rejected_text = np.where(pick_a, kept.response_b, kept.response_a)
    prompts = [[{"role": "user", "content": p}] for p in kept.prompt]
    chosen = [[{"role": "assistant", "content": t}] for t in chosen_text]
    rejected = [[{"role": "assistant", "content": t}] for t in rejected_text]
    if all(c in kept.columns for c in ("messages_a", "messages_b")):
        filled = [kept[c].astype("string").str.strip().fillna("") != "" for c in ("messages_a", "messages_b")]
        has = (filled[0] & filled[1]).to_numpy(dtype=bool)
        for i in np.flatnonzero(has):  # JSON parsing is per record by nature
            (pa, ca), (_, cb) = _split(_messages(kept.messages_a.iat[i])), _split(_messages(kept.messages_b.iat[i]))
            prompts[i], chosen[i], rejected[i] = pa, (ca if pick_a[i] else cb), (cb if pick_a[i] else ca)
    return prompts, chosen, rejected


def dpo_records(kept: pd.DataFrame, fmt: str = "standard", *, weights: bool = False) -> pd.DataFrame:
    """One TRL DPO record per kept vote (``kept`` as returned by :func:`heedful.filtering.filter_votes`)."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    pick_a = kept.choice.to_numpy() == "a"
    out = pd.DataFrame(index=kept.index)
    if fmt == "conversational" and len(kept):
        if "prompt" not in kept.columns and "messages_a" not in kept.columns:
            out["prompt"] = out["chosen"] = out["rejected"] = None
        else:
            for c in ("prompt", "response_a", "response_b"):
                if c not in kept.columns:
                    kept = kept.assign(**{c: None})
            out["prompt"], out["chosen"], out["rejected"] = _conversational(kept, pick_a)
    elif "prompt" in kept.columns:
        out["prompt"] = kept.prompt.to_numpy(dtype=object)
        out["chosen"] = np.where(pick_a, kept.response_a, kept.response_b).astype(object)
        out["rejected"] = np.where(pick_a, kept.response_b, kept.response_a).astype(object)
    else:  # labels only: no texts in the votes
        out["prompt"] = out["chosen"] = out["rejected"] = None
    out["user_id"] = kept.user_id.to_numpy()
    out["vote_id"] = kept.vote_id.astype(str).to_numpy(dtype=object)
    ma, mb = kept.model_a.astype(str).str.strip(), kept.model_b.astype(str).str.strip()
    out["model_chosen"] = np.where(pick_a, ma, mb).astype(object)
    out["model_rejected"] = np.where(pick_a, mb, ma).astype(object)
    for c in ("eta_hat", "eta_mean", "epsilon"):
        out[c] = kept[c].to_numpy(dtype=float)
    if weights:
        out["weight"] = kept["weight"].to_numpy(dtype=float)
    return out.reset_index(drop=True)


def write_dpo(path: str | Path, records: pd.DataFrame) -> None:
    """JSON lines (``.jsonl``) or Parquet (``.parquet``), written atomically."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".parquet", ".pq"):
        raise InputError(f"{path}: the DPO export is .jsonl or .parquet")
    write_table(path, records)
