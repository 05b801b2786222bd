"""Reading and validating vote tables (the data contract of DESIGN.md).

Required columns: ``user_id``, ``model_a``, ``model_b``, ``choice`` (``a`` | ``b`` | ``tie``).
Optional: ``shown_first`` (``a`` | ``b``), ``gold`` (``a`` | ``b``), ``prompt``, ``response_a``,
``response_b``, ``vote_id`` (unique when present); any other column is kept and passed through.

Rows in messages are data rows counted from 1 (the header is not a row), so in a CSV without
multi-line values row N sits on line N + 1. CSV and TSV files are streamed with pyarrow in blocks, so
a broken row stops the read where it is found; checks are vectorised over the distinct values of a
column, which keeps a 10M-row table to a few seconds.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from heedful.errors import InputError

REQUIRED = ("user_id", "model_a", "model_b", "choice")
CHOICES = ("a", "b", "tie")
SIDES = ("a", "b")
OPTIONAL = ("shown_first", "gold", "prompt", "response_a", "response_b", "vote_id")
_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
}
_COMPRESSED = (".gz", ".bz2", ".zst", ".xz")
BLOCK_SIZE = 1 << 24   # bytes per streamed CSV block


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the name; use .csv, .tsv, .parquet or .jsonl")
    return fmt


def _first_bad_utf8(path: Path) -> tuple[int, int] | None:
    """(line, byte offset) of the first byte that is not UTF-8, streaming the file; None if all is well."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with pa.input_stream(str(path), compression="detect") as f:
        while chunk := f.read(1 << 20):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                return line + chunk.count(b"\n", 0, max(e.start, 0)), offset + max(e.start, 0)
            line += chunk.count(b"\n")
            offset += len(chunk)
    return None


def _csv_batches(path: Path, sep: str, block_size: int | None = None) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """The header and a stream of blocks of a delimited file, every column as text.

    The stream stops at the first malformed row with an InputError naming it (rows counted from 1
    across blocks: pyarrow numbers rows when it parses on one thread).
    """
    bad: dict[str, int] = {}

    def on_bad_row(row) -> str:
        bad.update(number=row.number or 0, expected=row.expected_columns, actual=row.actual_columns)
        return "error"

    with pa.input_stream(str(path), compression="detect") as f:      # header first: every column is text
        names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16),
                               parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True,
                                                                invalid_row_handler=lambda row: "skip"),
                               ).schema.names
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), null_values=[""],
                                   strings_can_be_null=True, quoted_strings_can_be_null=False)
    parse = pacsv.ParseOptions(delimiter=sep, newlines_in_values=True, invalid_row_handler=on_bad_row)
    read = pacsv.ReadOptions(use_threads=False, block_size=block_size or BLOCK_SIZE)

    def stream() -> Iterator[pa.RecordBatch]:
        with pa.input_stream(str(path), compression="detect") as f:
            try:
                yield from pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
            except pa.ArrowInvalid:
                if not bad:
                    raise
                row, n, want = bad["number"] - 1, bad["actual"], bad["expected"]
                hint = "an unclosed quote?" if n < want else "a stray delimiter or an unquoted value?"
                raise InputError(f"{path}: row {row} has {n} field(s), the header has {want} ({hint})") from None

    return names, stream()


def _read_csv(path: Path, sep: str, block_size: int | None = None) -> pd.DataFrame:
    """A whole delimited file as text columns (streamed in blocks; stops at the first malformed row)."""
    names, stream = _csv_batches(path, sep, block_size)
    schema = pa.schema([(n, pa.string()) for n in names])
    return pa.Table.from_batches(list(stream), schema=schema).to_pandas()


def _first_bad_json_line(path: Path) -> str:
    """Find the first line that is not a JSON object (only called once a read has failed)."""
    with pa.input_stream(str(path), compression="detect") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                return f"line {i} is not valid JSON ({e.msg}, column {e.colno})"
            if not isinstance(obj, dict):
                return f"line {i} is a JSON {type(obj).__name__}, not an object"
    return ""


def _checked(path: str | Path) -> tuple[Path, str]:
    """The path and its format, after the checks every reader makes (exists, a file, known suffix, not empty)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a vote file")
    fmt = _format_of(path)
    if fmt != "parquet" and path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty")
    return path, fmt


@contextlib.contextmanager
def _reading(path: Path, fmt: str) -> Iterator[None]:
    """Turn the parsers' failures into one-line InputErrors that say where the file is broken."""
    try:
        yield
    except InputError:
        raise
    except UnicodeDecodeError as e:
        where = _first_bad_utf8(path)
        at = f" at line {where[0]} (byte {where[1]})" if where else f" (byte {e.start})"
        raise InputError(f"{path}: not UTF-8 text{at}; re-encode it as UTF-8") from e
    except pa.ArrowInvalid as e:
        msg = str(e)
        if "invalid UTF8" in msg:
            where = _first_bad_utf8(path)
            at = f" at line {where[0]} (byte {where[1]})" if where else ""
            raise InputError(f"{path}: not UTF-8 text{at}; re-encode it as UTF-8") from e
        if "Empty CSV" in msg:
            raise InputError(f"{path}: the file is empty") from e
        raise InputError(f"{path}: cannot read as {fmt}: {msg.splitlines()[0]}") from e
    except (ValueError, TypeError) as e:  # pandas' JSON reader
        if isinstance(e, TypeError) and fmt != "jsonl":
            raise
        detail = _first_bad_json_line(path) if fmt == "jsonl" else ""
        raise InputError(f"{path}: cannot read as {fmt}: {detail or str(e).splitlines()[0]}") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from e


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV/TSV, Parquet or JSON-lines file into a frame, turning parser failures into InputError."""
    path, fmt = _checked(path)
    with _reading(path, fmt):
        if fmt in ("csv", "tsv"):
            return _read_csv(path, "," if fmt == "csv" else "\t")
        if fmt == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False, encoding="utf-8")


# -- validation ---------------------------------------------------------------------------------------
def _per_row(per_unique: np.ndarray, codes: np.ndarray, missing: bool) -> np.ndarray:
    """Spread a per-distinct-value flag to the rows; missing cells (code -1) get ``missing``."""
    return np.append(np.asarray(per_unique, dtype=bool), missing)[codes]


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _blank(col: pd.Series) -> np.ndarray:
    """Missing cells and empty or whitespace-only text, without hashing the column (ids are many)."""
    missing = col.isna().to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
        return missing
    text = col if isinstance(col.dtype, pd.StringDtype) else col.astype("str")
    return missing | (text.str.strip() == "").fillna(False).to_numpy(dtype=bool)


def _require(col: pd.Series, name: str, source: str, base: int) -> None:
    """No missing or blank cell in a required id column."""
    bad = _blank(col)
    if bad.any():
        i = _first(bad)
        kind = "empty (null)" if pd.isna(col.iloc[i]) else "blank"
        raise InputError(f"{source}: column '{name}': row {base + i} is {kind}{_such(bad)}")


def _such(mask: np.ndarray) -> str:
    n = int(mask.sum())
    return f" ({n:,} such rows)" if n > 1 else ""


def _value(col: pd.Series, i: int) -> object:
    v = col.iloc[i]
    return v.item() if hasattr(v, "item") else v


def _check_filled(col: pd.Series, name: str, source: str, base: int) -> tuple[pd.Series, np.ndarray, pd.Index]:
    """A required model column stripped of surrounding spaces, with its codes and distinct values."""
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    raw = pd.Index(uniques).astype(str)
    text = raw.str.strip()
    bad = _per_row(text == "", codes, True)
    if bad.any():
        i = _first(bad)
        kind = "empty (null)" if codes[i] < 0 else "blank"
        raise InputError(f"{source}: column '{name}': row {base + i} is {kind}{_such(bad)}")
    return _rebuild(col, codes, raw, text), codes, text


def _check_values(col: pd.Series, name: str, allowed: tuple[str, ...], source: str, required: bool,
                  base: int) -> pd.Series:
    """Lower-cased, stripped values checked against ``allowed``; blank cells become missing (NaN)."""
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    raw = pd.Index(uniques).astype(str)
    norm = raw.str.strip().str.lower()
    blank = _per_row(norm == "", codes, True)
    if required and blank.any():
        i = _first(blank)
        kind = "empty (null)" if codes[i] < 0 else "blank"
        raise InputError(f"{source}: column '{name}': row {base + i} is {kind}{_such(blank)}")
    bad = ~_per_row(norm.isin(allowed), codes, False) & ~blank
    if bad.any():
        i = _first(bad)
        expected = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
        raise InputError(f"{source}: column '{name}': row {base + i} has {_value(col, i)!r}; expected {expected}"
                         f"{_such(bad)}")
    return _rebuild(col, codes, raw, norm).where(~blank) if blank.any() else _rebuild(col, codes, raw, norm)


def _rebuild(col: pd.Series, codes: np.ndarray, raw: pd.Index, norm: pd.Index) -> pd.Series:
    """The column with its distinct values replaced by ``norm``; no copy when nothing changes."""
    if isinstance(col.dtype, pd.StringDtype) and raw.equals(norm):
        return col
    return pd.Series(norm.take(np.maximum(codes, 0)) if len(norm) else [""] * len(col), index=col.index,
                     dtype="str")


def _missing_columns(votes: pd.DataFrame, source: str) -> None:
    missing = [c for c in REQUIRED if c not in votes.columns]
    if not missing:
        return
    found = [str(c) for c in votes.columns]
    spare = [c for c in found if c not in REQUIRED + OPTIONAL]
    hints = []
    for m in missing:
        close = difflib.get_close_matches(m, spare, n=1, cutoff=0.6) or [
            c for c in spare if c.strip().lower().replace(" ", "_").replace("-", "_") == m]
        if close:
            hints.append(f"'{close[0]}' looks like '{m}'")
    hint = f" ({'; '.join(hints)})" if hints else ""
    if len(found) == 1 and any(s in found[0] for s in (",", "\t", ";")):
        hint = " (one column with separators in its name: is the file delimited as its suffix says?)"
    raise InputError(f"{source}: missing column(s) {', '.join(missing)}{hint}; found {', '.join(found) or 'none'}")


def validate_votes(votes: pd.DataFrame, *, source: str = "votes", row_offset: int = 0,
                   unique: bool = True) -> pd.DataFrame:
    """Check the contract and return a copy with ``choice``/``shown_first``/``gold`` normalised to lower case.

    ``model_a``/``model_b`` are stripped of surrounding spaces; text columns come back with pandas' string
    dtype. Raises InputError naming the column and the first bad row (rows counted from 1, plus
    ``row_offset`` when ``votes`` is a block of a larger table; ``unique=False`` leaves the check that
    vote ids are unique to the caller, who sees all blocks).
    """
    if not isinstance(votes, pd.DataFrame):
        raise InputError(f"{source}: expected a pandas DataFrame, got {type(votes).__name__}")
    dup = pd.Index(votes.columns.astype(str)).duplicated()
    if dup.any():
        raise InputError(f"{source}: column {votes.columns[_first(dup)]!r} appears twice in the header")
    _missing_columns(votes, source)
    if len(votes) == 0:
        raise InputError(f"{source}: no rows (only a header)")
    base = row_offset + 1
    out = votes.reset_index(drop=True).copy()
    _require(out["user_id"], "user_id", source, base)
    model_a, ca, ta = _check_filled(out["model_a"], "model_a", source, base)
    model_b, cb, tb = _check_filled(out["model_b"], "model_b", source, base)
    out["choice"] = _check_values(out["choice"], "choice", CHOICES, source, True, base)
    ia, ua = pd.factorize(ta)
    ib = pd.Index(ua).get_indexer(tb)
    same = ib[cb] == ia[ca]
    if same.any():
        i = _first(same)
        raise InputError(f"{source}: columns 'model_a'/'model_b': row {base + i} compares {ta[ca[i]]!r} "
                         f"with itself{_such(same)}")
    out["model_a"], out["model_b"] = model_a, model_b
    for col in ("shown_first", "gold"):
        if col in out.columns:
            out[col] = _check_values(out[col], col, SIDES, source, False, base)
    if "vote_id" in out.columns:
        blank = _blank(out["vote_id"])
        if blank.any():
            raise InputError(f"{source}: column 'vote_id': row {base + _first(blank)} is empty; "
                             "vote ids must be unique")
        if unique:
            _check_unique(out["vote_id"], source, base)
    return out


def _check_unique(ids: pd.Series, source: str, base: int = 1) -> None:
    if ids.is_unique:
        return
    codes, _ = pd.factorize(ids)
    rep = pd.Series(codes).duplicated().to_numpy()
    i = _first(rep)
    first = _first(codes == codes[i])
    raise InputError(f"{source}: column 'vote_id': row {base + i} repeats vote id "
                     f"{_value(ids, i)!r} of row {base + first}{_such(rep)}")


def read_votes(path: str | Path, *, block_size: int | None = None) -> pd.DataFrame:
    """Read and validate a vote table from CSV, TSV, Parquet or JSON lines.

    CSV/TSV are validated block by block as they stream in, so a bad row stops the read where it is
    (its row number counted from the start of the file; "(N such rows)" then counts that block);
    vote-id uniqueness is checked once over the whole table.
    """
    path, fmt = _checked(path)
    if fmt not in ("csv", "tsv"):
        return validate_votes(read_table(path), source=str(path))
    source, blocks, offset = str(path), [], 0
    with _reading(path, fmt):
        names, stream = _csv_batches(path, "," if fmt == "csv" else "\t", block_size)
        for batch in stream:
            blocks.append(validate_votes(batch.to_pandas(), source=source, row_offset=offset, unique=False))
            offset += batch.num_rows
    if not blocks:
        return validate_votes(pd.DataFrame(columns=names), source=source)
    out = pd.concat(blocks, ignore_index=True) if len(blocks) > 1 else blocks[0]
    if "vote_id" in out.columns:
        _check_unique(out["vote_id"], source)
    return out


__all__ = ["CHOICES", "REQUIRED", "SIDES", "read_table", "read_votes", "validate_votes"]
