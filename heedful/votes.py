"""Reading and validating vote tables (the data contract of DESIGN.md).

Required columns: ``user_id``, ``model_a``, ``model_b``, ``choice`` (``a`` | ``b`` | ``tie``).
Optional: ``shown_first`` (``a`` | ``b``), ``gold`` (``a`` | ``b``), ``prompt``, ``response_a``,
``response_b``, ``vote_id`` (unique when present); any other column is kept and passed through.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from heedful.errors import InputError

REQUIRED = ("user_id", "model_a", "model_b", "choice")
CHOICES = ("a", "b", "tie")
SIDES = ("a", "b")
_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
}


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zst", ".xz"):
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the name; use .csv, .tsv, .parquet or .jsonl")
    return fmt


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV/TSV, Parquet or JSON-lines file into a frame, turning parser failures into InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a vote file")
    fmt = _format_of(path)
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str,
                               keep_default_na=False, na_values=[""], encoding="utf-8")
        if fmt == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 text (byte {e.start}: {e.reason})") from e
    except pd.errors.EmptyDataError as e:
        raise InputError(f"{path}: the file is empty") from e
    except pd.errors.ParserError as e:
        msg = str(e).strip().splitlines()[-1]
        raise InputError(f"{path}: broken {fmt.upper()} row: {msg}") from e
    except ValueError as e:  # pandas' JSON reader and pyarrow's errors
        raise InputError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from e


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _blank(col: pd.Series) -> np.ndarray:
    """Missing values and empty or whitespace-only strings."""
    s = col.astype("string")
    return (s.isna() | (s.str.strip() == "")).to_numpy(dtype=bool)


def validate_votes(votes: pd.DataFrame, *, source: str = "votes") -> pd.DataFrame:
    """Check the contract and return a copy with ``choice``/``shown_first``/``gold`` normalised to lower case.

    Raises InputError naming the column and the first bad row (rows counted from 1, as a person would).
    """
    if not isinstance(votes, pd.DataFrame):
        raise InputError(f"{source}: expected a pandas DataFrame, got {type(votes).__name__}")
    if len(votes) == 0:
        raise InputError(f"{source}: no rows")
    missing = [c for c in REQUIRED if c not in votes.columns]
    if missing:
        lower = {str(c).strip().lower(): c for c in votes.columns}
        hints = [f"'{lower[m]}' looks like '{m}'" for m in missing if m in lower]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise InputError(f"{source}: missing column(s) {', '.join(missing)}{hint}; "
                         f"found {', '.join(map(str, votes.columns))}")
    out = votes.reset_index(drop=True).copy()
    for col in ("user_id", "model_a", "model_b", "choice"):
        bad = _blank(out[col])
        if bad.any():
            i = _first_bad(bad)
            raise InputError(f"{source}: column '{col}': row {i + 1} is empty ({int(bad.sum())} such rows)")
    choice = out["choice"].astype(str).str.strip().str.lower()
    bad = ~choice.isin(CHOICES).to_numpy()
    if bad.any():
        i = _first_bad(bad)
        raise InputError(f"{source}: column 'choice': row {i + 1} has {out['choice'].iloc[i]!r}; "
                         f"expected one of a, b, tie ({int(bad.sum())} such rows)")
    out["choice"] = choice.astype(object)
    ma = out["model_a"].astype(str).str.strip()
    mb = out["model_b"].astype(str).str.strip()
    same = (ma == mb).to_numpy()
    if same.any():
        i = _first_bad(same)
        raise InputError(f"{source}: columns 'model_a'/'model_b': row {i + 1} compares {ma.iloc[i]!r} "
                         f"with itself ({int(same.sum())} such rows)")
    out["model_a"], out["model_b"] = ma.astype(object), mb.astype(object)
    for col in ("shown_first", "gold"):
        if col not in out.columns:
            continue
        blank = _blank(out[col])
        vals = out[col].astype("string").str.strip().str.lower()
        bad = ~blank & ~vals.isin(SIDES).fillna(False).to_numpy(dtype=bool)
        if bad.any():
            i = _first_bad(bad)
            raise InputError(f"{source}: column '{col}': row {i + 1} has {out[col].iloc[i]!r}; "
                             f"expected a, b or empty")
        out[col] = vals.where(~blank, None).astype(object)
    if "vote_id" in out.columns:
        blank = _blank(out["vote_id"])
        if blank.any():
            i = _first_bad(blank)
            raise InputError(f"{source}: column 'vote_id': row {i + 1} is empty; vote ids must be unique")
        dup = out["vote_id"].duplicated().to_numpy()
        if dup.any():
            i = _first_bad(dup)
            first = _first_bad((out["vote_id"] == out["vote_id"].iloc[i]).to_numpy())
            raise InputError(f"{source}: column 'vote_id': row {i + 1} repeats vote id "
                             f"{out['vote_id'].iloc[i]!r} of row {first + 1} ({int(dup.sum())} repeats)")
    return out


def read_votes(path: str | Path) -> pd.DataFrame:
    """Read and validate a vote table from CSV, TSV, Parquet or JSON lines."""
    return validate_votes(read_table(path), source=str(path))
