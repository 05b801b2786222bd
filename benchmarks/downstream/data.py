"""Real comparison items with gold labels, read from ``shared/data`` at run time (never copied).

Every source becomes one *item table*: one row per prompt pair with columns
``item_id, prompt, response_a, response_b, model_a, model_b, gold`` (``gold`` is ``a`` or ``b``: the
truly better answer). Users are simulated on top of it (``users.py``).

- PandaLM: 999 prompts, two answers of two different 7B models each; gold = the majority of the three
  human annotators; items whose majority is a tie (or that have no majority) are left out (894 stay).
  The generator pairs have real, unequal strengths (mu per pair between 0.23 and 0.75).
- HH-RLHF harmless-base test: 2,312 chosen/rejected transcripts (both answers from one model). The
  comparison-mode asymmetry is made: the gold-better answer is given to the ``strong`` generator
  with probability ``mu`` and to ``weak`` otherwise, so P(strong's answer is better) = mu exactly.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

ITEM_COLUMNS = ["item_id", "prompt", "response_a", "response_b", "model_a", "model_b", "gold"]
SOURCES = ("pandalm", "hh")


def default_data_dir() -> Path:
    """``$HEEDFUL_DATA``, else the first ``shared/data`` found above this file (``../shared/data`` in CI)."""
    env = os.environ.get("HEEDFUL_DATA")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        cand = parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path("../shared/data")


def _majority(labels: list[int]) -> int | None:
    """The label at least two of three annotators gave; None when there is none."""
    lab, n = Counter(labels).most_common(1)[0]
    return lab if n >= 2 else None


def load_pandalm(data_dir: Path) -> pd.DataFrame:
    """PandaLM test set as an item table; gold = human majority, ties and no-majority items left out."""
    rows = json.loads((data_dir / "pandalm" / "testset-v1.json").read_text(encoding="utf-8"))
    out = []
    for r in rows:
        maj = _majority([int(r[f"annotator{i}"]) for i in (1, 2, 3)])
        if maj not in (1, 2):
            continue
        m1, m2 = r["cmp_key"].split("_", 1)
        prompt = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        out.append({"item_id": f"pandalm-{r['idx']}", "prompt": prompt, "response_a": str(r["response1"]),
                    "response_b": str(r["response2"]), "model_a": m1, "model_b": m2, "gold": "a" if maj == 1 else "b"})
    return pd.DataFrame(out, columns=ITEM_COLUMNS)


def _split_transcript(text: str) -> tuple[str, str]:
    """HH transcript -> (conversation up to the last assistant turn, that turn's answer)."""
    head, _, answer = text.rpartition("\n\nAssistant:")
    return head.strip(), answer.strip()


def load_hh(data_dir: Path, mu: float = 0.8, seed: int = 0) -> pd.DataFrame:
    """HH-RLHF harmless test as an item table with a made asymmetry.

    The gold-better (``chosen``) answer is given to generator ``strong`` with probability ``mu``:
    P(strong better) = mu. Transcripts whose two prompts differ, or whose answers are equal, are dropped.
    """
    path = data_dir / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(rows):
        pc, chosen = _split_transcript(r["chosen"])
        pr, rejected = _split_transcript(r["rejected"])
        if pc != pr or chosen == rejected:
            continue
        strong_better = rng.random() < mu
        strong, weak = (chosen, rejected) if strong_better else (rejected, chosen)
        # storage order carries no meaning: list strong first on half the items
        if rng.random() < 0.5:
            ra, rb, ma, mb, gold = strong, weak, "strong", "weak", "a" if strong_better else "b"
        else:
            ra, rb, ma, mb, gold = weak, strong, "weak", "strong", "b" if strong_better else "a"
        out.append({"item_id": f"hh-{i}", "prompt": pc, "response_a": ra, "response_b": rb,
                    "model_a": ma, "model_b": mb, "gold": gold})
    return pd.DataFrame(out, columns=ITEM_COLUMNS)


def load_items(source: str, data_dir: Path | None = None, *, hh_mu: float = 0.8, seed: int = 0) -> pd.DataFrame:
    """Item table of ``source`` (``pandalm`` or ``hh``)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if source == "pandalm":
        return load_pandalm(data_dir)
    if source == "hh":
        return load_hh(data_dir, mu=hh_mu, seed=seed)
    raise ValueError(f"source must be one of {SOURCES}, not {source!r}")


def ordered_pair(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each (a, b) in alphabetical order: the pair's name whatever its storage order."""
    a, b = a.to_numpy(dtype=str), b.to_numpy(dtype=str)
    return np.where(a < b, a, b), np.where(a < b, b, a)


def gold_mu(items: pd.DataFrame) -> pd.DataFrame:
    """Per generator pair (alphabetical order), the share of items whose gold favours model_a."""
    a_better = np.where(items.gold == "a", items.model_a, items.model_b)
    lo, hi = ordered_pair(items.model_a, items.model_b)
    df = pd.DataFrame({"model_a": lo, "model_b": hi, "lo_wins": a_better == lo})
    return (df.groupby(["model_a", "model_b"], as_index=False)
              .agg(mu=("lo_wins", "mean"), n=("lo_wins", "size")))
