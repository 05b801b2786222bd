"""Streaming ingestion: vote files -> :class:`heedful.suffstats.VoteStats`, chunk by chunk, with pyarrow.

A Parquet, CSV or TSV file (or many files, a folder or a glob) is read in parts (Parquet row groups,
else record batches of ``chunk_rows`` rows), only the columns the model needs. Worker threads read
and encode the parts: the few distinct model and choice values are dictionary-encoded with Arrow,
checked and mapped in Python, and user and vote ids are hashed (64 bits), the user hashes grouped for
:mod:`heedful.hashparts`. The main thread counts the parts in input order: it numbers the users with the
:class:`UserIndex` (64 cache-sized hash tables of the user hashes; the codes confirmed on the ids and put in row
order by the workers), and every row becomes one integer key

    key = user << 32 | kind,    kind = ((pair * 2 + pick_a) * 3 + first) * 3 + gold

(``user`` numbered in order of first appearance, ``pair`` in order of appearance, a batch's new pairs
sorted, and renumbered in sorted order at the end). Keys are buffered and folded into unique (key, count)
cells whenever the buffer passes max(``buffer_rows``, cells) (each batch's keys sorted by a worker,
then a linear merge, cut into cache-sized ranges merged in two threads; from 4 threads on, one sort split
across them); ties, gold labels and rows are counted with ``np.bincount``. Memory is therefore
bounded by about twice the cells (at most users x kinds) plus a few parts, never by the votes.

The result is identical to ``vote_stats(read_votes(path))``: same users (in order of first
appearance, same dtype), pairs, cells, counts and ties, whatever the threads and chunk sizes.
Validation gives the same one-line messages as :func:`heedful.votes.validate_votes`, for the first
bad row in input order: a batch that fails the fast Arrow checks is handed to ``validate_votes`` and
its message re-raised with the row numbers counted from the start of the file ("(N such rows)" then
counts the rows of that batch). ``vote_id`` uniqueness is checked across the whole input with the
hashes; a hash collision is confirmed on the ids themselves before anything is reported. JSON lines
are read whole (pyarrow has no streaming JSON reader) and then counted in batches.
"""
from __future__ import annotations

import glob
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from heedful.errors import InputError
from heedful.hashparts import GroupedCodes, HashParts, PartTables, hash_parts
from heedful.suffstats import KINDS_PER_PAIR, N_FIRST, N_GOLD, VoteStats
from heedful.votes import REQUIRED, read_table, validate_votes

CHUNK_ROWS = 1 << 21          # rows per record batch
BUFFER_ROWS = 1 << 24         # keys buffered before they are folded into cells (128 MiB of int64)
PARALLEL_SORT_THREADS = 4     # from this many threads big sorts are split across them; below it the counting
                              # thread has slack while the workers read, and sorts each batch's keys on arrival
NEEDED = (*REQUIRED, "shown_first", "gold", "vote_id")
FEW_VALUES = ("model_a", "model_b", "choice", "shown_first", "gold")   # Parquet columns read as dictionaries
_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".jsonl", ".ndjson", ".json")
_CHOICE = {"a": 0, "b": 1, "tie": 2}
_SIDE = {"a": 1, "b": 2}        # 0: unknown / blank
_HASH_P = np.uint64(0x100000001B3)
_HASH_0 = np.uint64(0xCBF29CE484222325)
RANGE_VALUES = 1 << 15        # values per range when repeats are sought across sorted runs (in cache)
HASH_BLOCK = 1 << 16          # ids hashed per numpy pass (a few MB of temporaries, in cache)


# -- sources ------------------------------------------------------------------------------------------
def expand_sources(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by a path, a folder (its vote files, sorted), a glob pattern, or a list of these."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and _is_vote_file(f))
            if not found:
                raise InputError(f"{p}: the folder holds no .parquet, .csv, .tsv or .jsonl files")
            out += found
        elif not p.exists() and any(ch in str(item) for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(item), recursive=True) if Path(f).is_file())
            if not found:
                raise InputError(f"{item}: no file matches this pattern")
            out += found
        else:
            out.append(p)
    return out


def _is_vote_file(p: Path) -> bool:
    s = [x.lower() for x in p.suffixes]
    if s and s[-1] in (".gz", ".bz2", ".zst", ".xz"):
        s = s[:-1]
    return bool(s) and s[-1] in _SUFFIXES and not p.name.startswith(".")


def _format(p: Path) -> str:
    s = [x.lower() for x in p.suffixes]
    if s and s[-1] in (".gz", ".bz2", ".zst", ".xz"):
        s = s[:-1]
    last = s[-1] if s else ""
    return {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}.get(last, "other")


def _check_header(names: list[str], source: str) -> None:
    """Column-level checks (duplicates, missing required columns) with validate_votes' own messages."""
    try:
        validate_votes(pd.DataFrame(columns=names), source=source)
    except InputError as e:
        if not str(e).endswith("no rows (only a header)"):
            raise


def _batches(path: Path, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of the needed columns of one file (parser failures become read_table's InputError)."""
    fmt = _format(path)
    if not path.exists() or path.is_dir() or fmt == "other" or (fmt != "parquet" and path.stat().st_size == 0):
        yield from _whole(path, chunk_rows)
        return
    try:
        if fmt == "parquet":                  # its row groups, as the threaded reader reads them
            for part in _parts(path, chunk_rows):
                yield from part.batches(chunk_rows)
            return
        yield from _csv_batches(path, "," if fmt == "csv" else "\t", chunk_rows)
    except InputError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError):
        read_table(path)          # raises the reader's one-line InputError
        raise


@dataclass
class _Part:
    """A piece of one file to read and encode in a worker: ``rows`` rows starting after row ``row0``."""

    path: Path
    row0: int
    rows: int
    batch: pa.RecordBatch | None = None      # already read (CSV, JSON lines)
    group: int = -1                          # else: the Parquet row group to read
    columns: list[str] = field(default_factory=list)

    def batches(self, chunk_rows: int) -> list[pa.RecordBatch]:
        if self.batch is not None:
            return [self.batch]
        try:
            few = [c for c in FEW_VALUES if c in self.columns]      # read as dictionaries: no strings to encode
            table = pq.ParquetFile(self.path, read_dictionary=few).read_row_group(self.group, columns=self.columns)
        except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError):
            read_table(self.path)      # raises the reader's one-line InputError
            raise
        return table.combine_chunks().to_batches(max_chunksize=chunk_rows)


def _parts(path: Path, chunk_rows: int) -> Iterator[_Part]:
    """The parts of one file in order: Parquet row groups (read by the workers), else batches read here."""
    if _format(path) == "parquet" and path.is_file():
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError):
            read_table(path)
            raise
        names = pf.schema_arrow.names
        _check_header(names, str(path))
        cols = [c for c in NEEDED if c in names]
        row0 = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if n:
                yield _Part(path, row0, n, group=g, columns=cols)
            row0 += n
        return
    row0 = 0
    for batch in _batches(path, chunk_rows):
        if batch.num_rows:
            yield _Part(path, row0, batch.num_rows, batch=batch)
        row0 += batch.num_rows


def _csv_batches(path: Path, sep: str, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream a delimited file as text columns, as heedful.votes reads it, with the same bad-row message."""
    bad: dict[str, int] = {}

    def on_bad_row(row) -> str:
        bad.update(number=row.number or 0, expected=row.expected_columns, actual=row.actual_columns)
        return "error"

    with pa.input_stream(str(path), compression="detect") as f:
        names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16),
                               parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True,
                                                                invalid_row_handler=lambda row: "skip"),
                               ).schema.names
    _check_header(names, str(path))
    cols = [c for c in NEEDED if c in names]
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), null_values=[""],
                                   strings_can_be_null=True, quoted_strings_can_be_null=False, include_columns=cols)
    parse = pacsv.ParseOptions(delimiter=sep, newlines_in_values=True, invalid_row_handler=on_bad_row)
    block = max(1 << 20, min(1 << 26, chunk_rows * 32))
    with pa.input_stream(str(path), compression="detect") as f:
        reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(use_threads=True, block_size=block),
                                parse_options=parse, convert_options=convert)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid:
                if not bad:
                    raise
                if not bad["number"]:          # threaded parsing leaves the row number out: find it serially
                    _serial_bad_row(path, parse, convert, bad)
                row, n, want = bad["number"] - 1, bad["actual"], bad["expected"]
                hint = "an unclosed quote?" if n < want else "a stray delimiter or an unquoted value?"
                raise InputError(f"{path}: row {row} has {n} field(s), the header has {want} ({hint})") from None
            yield batch


def _serial_bad_row(path: Path, parse: pacsv.ParseOptions, convert: pacsv.ConvertOptions, bad: dict) -> None:
    """Re-read a CSV with one parser thread (which numbers rows), keeping nothing, until the broken row."""
    with pa.input_stream(str(path), compression="detect") as f:
        reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 24),
                                parse_options=parse, convert_options=convert)
        try:
            for _ in reader:
                pass
        except pa.ArrowInvalid:
            pass


def _whole(path: Path, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Formats without a streaming reader (JSON lines): read_table, then batches of the needed columns."""
    frame = read_table(path)
    _check_header([str(c) for c in frame.columns], str(path))
    cols = [c for c in NEEDED if c in frame.columns]
    yield from pa.Table.from_pandas(frame[cols], preserve_index=False).to_batches(max_chunksize=chunk_rows)


# -- per-batch encoding -----------------------------------------------------------------------------
class _Fallback(Exception):
    """The fast Arrow checks flagged this batch: validate it with pandas (which raises or cleans it)."""


@dataclass
class _Batch:
    """One batch as arrays: local user codes and their values, local pairs, and the kind fields."""

    user: np.ndarray | None          # int64 [n] codes into ``user_values``; None: ``user_values`` is per row
    user_values: pa.Array
    pair: np.ndarray                 # int64 [n] codes into ``pairs``
    pairs: list[tuple[str, str]]
    pick_a: np.ndarray               # bool [n]: picked the canonical model_a
    tie: np.ndarray                  # bool [n]
    first: np.ndarray                # int64 [n]: 0 unknown, 1 picked first-shown, 2 second-shown
    gold_known: np.ndarray           # bool [n]
    gold_canon_a: np.ndarray         # bool [n]
    user_parts: HashParts | None = None    # hash_parts(hash_ids(user_values)), computed off the main thread
    user_short: ShortIds | None = None     # short_ids(user_values), likewise
    id_hash: np.ndarray | None = None      # hash_ids of the batch's vote ids, sorted


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _dict(col: pa.Array) -> tuple[np.ndarray, list]:
    """Dictionary codes (-1 for null) and the distinct values as Python objects."""
    enc = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    if enc.null_count:
        codes = np.where(enc.is_null().to_numpy(zero_copy_only=False), -1, codes)
    return codes.astype(np.int64, copy=False), enc.dictionary.to_pylist()


def _any_blank(col: pa.Array) -> bool:
    """Whether a string is empty or only whitespace (no trimmed copy of the strings is made)."""
    return bool(pc.any(pc.or_(pc.equal(pc.binary_length(col), 0), pc.utf8_is_space(col))).as_py())


def _text(v: object) -> str:
    return "" if v is None else str(v).strip()


def _small(col: pa.Array, required: bool, allowed: dict[str, int] | None) -> np.ndarray:
    """Codes of a column with few distinct values: allowed[value.strip().lower()], 0 for blank (optional)."""
    codes, values = _dict(col)
    if any(isinstance(v, float) for v in values):          # NaN: pandas calls it missing, Arrow does not
        raise _Fallback
    norm = [_text(v).lower() for v in values]
    if required and ((codes < 0).any() or "" in norm):
        raise _Fallback
    if any(v not in allowed and v != "" for v in norm):
        raise _Fallback
    table = np.array([allowed.get(v, 0) for v in norm] + [0], dtype=np.int64)
    return table[codes]


def _encode_fast(batch: pa.RecordBatch) -> _Batch:
    """Arrow-only encoding; raises _Fallback on anything validate_votes would reject (or treat specially)."""
    user_col = batch.column("user_id")
    if not (_is_text(user_col.type) or pa.types.is_integer(user_col.type)) or user_col.null_count:
        raise _Fallback
    if _is_text(user_col.type) and _any_blank(user_col):
        raise _Fallback
    ca, va = _dict(batch.column("model_a"))
    cb, vb = _dict(batch.column("model_b"))
    if (ca < 0).any() or (cb < 0).any() or any(isinstance(v, float) for v in va + vb):
        raise _Fallback
    sa, sb = [_text(v) for v in va], [_text(v) for v in vb]
    if "" in sa or "" in sb:
        raise _Fallback
    nb = len(sb)
    code = ca * nb + cb
    if len(sa) * nb <= 4 * len(code) + 1024:     # few models (the usual case): a dense table, no sort
        seen = np.bincount(code, minlength=len(sa) * nb) > 0
        combo, inv = np.flatnonzero(seen), (np.cumsum(seen) - 1)[code]
    else:
        combo, inv = np.unique(code, return_inverse=True)
    pairs: list[tuple[str, str]] = []
    pair_of: dict[tuple[str, str], int] = {}
    c_pair = np.empty(len(combo), dtype=np.int64)
    c_flip = np.empty(len(combo), dtype=bool)
    for j, k in enumerate(combo.tolist()):
        a, b = sa[k // nb], sb[k % nb]
        if a == b:
            raise _Fallback
        key = (b, a) if a > b else (a, b)
        c_pair[j] = pair_of.setdefault(key, len(pair_of))
        c_flip[j] = a > b
        if c_pair[j] == len(pairs):
            pairs.append(key)
    pair, flipped = c_pair[inv.reshape(-1)], c_flip[inv.reshape(-1)]
    choice = _small(batch.column("choice"), True, _CHOICE)
    names = batch.schema.names
    sf = _small(batch.column("shown_first"), False, _SIDE) if "shown_first" in names else None
    gd = _small(batch.column("gold"), False, _SIDE) if "gold" in names else None
    return _kinds(None, user_col, pair, pairs, flipped, choice, sf, gd)


def _kinds(user: np.ndarray | None, user_values: pa.Array, pair: np.ndarray, pairs: list[tuple[str, str]],
           flipped: np.ndarray, choice: np.ndarray, sf: np.ndarray | None, gd: np.ndarray | None) -> _Batch:
    """The kind fields of :func:`heedful.suffstats.vote_stats` from codes (choice 0 a, 1 b, 2 tie; sides 1 a, 2 b)."""
    pick_a = (choice == 0) ^ flipped
    n = len(pair)
    if sf is None:
        first = np.zeros(n, dtype=np.int64)
    else:
        a_first = (sf == 1) ^ flipped
        first = np.where(sf > 0, np.where(pick_a == a_first, 1, 2), 0)
    if gd is None:
        gold_known = gold_canon_a = np.zeros(n, dtype=bool)
    else:
        gold_known = gd > 0
        gold_canon_a = (gd == 1) ^ flipped
    return _Batch(user, user_values, pair, pairs, pick_a, choice == 2, first, gold_known, gold_canon_a)


def _encode_pandas(batch: pa.RecordBatch, source: str, row0: int) -> _Batch:
    """validate_votes on the batch (its messages, rows shifted by ``row0``), then encode the cleaned frame."""
    frame = batch.to_pandas()
    try:
        v = validate_votes(frame, source=source)
    except InputError as e:
        raise InputError(shift_rows(str(e), row0)) from None
    user, uniques = pd.factorize(v["user_id"], sort=False)
    a = v["model_a"].astype(str).to_numpy(dtype=object)
    b = v["model_b"].astype(str).to_numpy(dtype=object)
    flipped = a > b
    keys = pd.MultiIndex.from_arrays([np.where(flipped, b, a), np.where(flipped, a, b)])
    pair, puniq = pd.factorize(keys, sort=False)
    choice = v["choice"].map(_CHOICE).to_numpy(dtype=np.int64)

    def side(col: str) -> np.ndarray | None:
        return None if col not in v.columns else v[col].map(_SIDE).fillna(0).to_numpy(dtype=np.int64)

    return _kinds(user.astype(np.int64), pa.array(np.asarray(uniques, dtype=object)), pair.astype(np.int64),
                  [tuple(map(str, t)) for t in puniq], flipped, choice, side("shown_first"), side("gold"))


_ROW = re.compile(r"(: row |of row )(\d+)")


def shift_rows(message: str, row0: int) -> str:
    """Add ``row0`` to the row numbers of a validate_votes message ("...: row N ...", "... of row M ...")."""
    if not row0:
        return message
    head, sep, tail = message.partition("': row ")      # the column prefix ends "'<name>': row N"
    if sep:
        n, _, rest = tail.partition(" ")
        tail = f"{int(n) + row0} {rest}" if n.isdigit() else tail
        rest_fixed = re.sub(r"of row (\d+)", lambda m: f"of row {int(m.group(1)) + row0}", tail)
        return head + sep + rest_fixed
    return _ROW.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + row0}", message, count=1)


# -- vote ids -----------------------------------------------------------------------------------------
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)


def hash_ids(col: pa.Array) -> np.ndarray:
    """64-bit hash per id (integers hash to themselves).

    Strings: the UTF-8 bytes read eight at a time as little-endian words (unaligned loads from the
    Arrow buffer, bytes past the end masked off), m = (h ^ w) P, h = m ^ (m >> 29) per word, seeded
    with the length, then a final avalanche; an id hashes the same in every batch. Callers confirm
    any collision on the ids. Hashed HASH_BLOCK ids at a time, so the temporaries stay in cache.
    """
    if pa.types.is_integer(col.type):
        return col.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.large_string())
    if len(col) <= HASH_BLOCK:
        return _hash_strings(col)
    out = np.empty(len(col), dtype=np.uint64)
    for i in range(0, len(col), HASH_BLOCK):
        out[i:i + HASH_BLOCK] = _hash_strings(col.slice(i, HASH_BLOCK))
    return out


def _text_buffers(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string or large-string array's offsets [n + 1] (its own int32 or int64, slice applied) and the bytes
    they span (uint8, from offs[0] on: id i is raw[offs[i] - offs[0]:offs[i + 1] - offs[0]]), both views."""
    bufs = col.buffers()
    odt = np.int64 if pa.types.is_large_string(col.type) else np.int32
    offs = np.frombuffer(bufs[1], dtype=odt)[col.offset:col.offset + len(col) + 1]
    lo, hi = (int(offs[0]), int(offs[-1])) if len(col) else (0, 0)
    raw = np.frombuffer(bufs[2], dtype=np.uint8)[lo:hi] if bufs[2] is not None and hi > lo else np.zeros(0, np.uint8)
    return offs, raw


def _hash_strings(col: pa.Array) -> np.ndarray:
    """:func:`hash_ids` of a string or large-string array, in one pass of numpy over it."""
    n = len(col)
    if not n:
        return np.zeros(0, np.uint64)
    offs, raw = _text_buffers(col)
    offs, lo = offs.astype(np.int64), int(offs[0])
    data = np.concatenate([raw, np.zeros(8, np.uint8)])
    words = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))   # a word at every byte
    start, length = offs[:-1] - lo, np.diff(offs)
    h = np.full(n, _HASH_0, dtype=np.uint64) ^ length.astype(np.uint64)
    with np.errstate(over="ignore"):
        for j in range(0, int(length.max()), 8):
            keep = np.clip(length - j, 0, 8)
            w = words[np.minimum(start + j, len(words) - 1)] & _MASKS[keep]
            m = (h ^ w) * _HASH_P
            h = np.where(keep > 0, m ^ (m >> np.uint64(29)), h)     # ids shorter than j bytes: unchanged
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return h


@dataclass(frozen=True)
class ShortIds:
    """String ids of at most 8 bytes, exactly: each id's bytes as one little-endian word (zero past its end) and
    its length. Two such ids are equal exactly when both match, so codes are confirmed on two integer gathers
    instead of every row's id copied out of the known ids and compared (at 10M votes 0.35-0.40 s of CPU)."""

    word: np.ndarray        # uint64
    length: np.ndarray      # uint8

    def take(self, rows: np.ndarray) -> ShortIds:
        return ShortIds(self.word[rows], self.length[rows])

    def then(self, more: ShortIds) -> ShortIds:
        """These ids followed by ``more`` (new arrays: views taken of these stay as they are)."""
        return ShortIds(np.concatenate([self.word, more.word]), np.concatenate([self.length, more.length]))

    def matches(self, known: ShortIds, codes: np.ndarray) -> bool:
        """Whether ``known[codes]`` equals these ids row by row."""
        return not len(codes) or (np.array_equal(known.word[codes], self.word)
                                  and np.array_equal(known.length[codes], self.length))


def short_ids(col: pa.Array) -> ShortIds | None:
    """The :class:`ShortIds` of a string column without nulls whose ids all have at most 8 bytes, else None."""
    if not _is_text(col.type) or col.null_count:
        return None
    n = len(col)
    if not n:
        return ShortIds(np.zeros(0, np.uint64), np.zeros(0, np.uint8))
    offs, raw = _text_buffers(col)
    length = np.diff(offs)
    if int(length.max()) > 8:
        return None
    start = offs[:-1] - offs[0]
    k = int(np.searchsorted(start, len(raw) - 7, side="left")) if len(raw) >= 8 else 0   # ids read in place
    word = np.empty(n, dtype=np.uint64)
    if k:
        word[:k] = np.ndarray((len(raw) - 7,), dtype="<u8", buffer=raw, strides=(1,))[start[:k]]
    if k < n:                      # the last few ids: 8 bytes from their start would pass the end of the data
        s0 = int(start[k])
        tail = np.concatenate([raw[s0:], np.zeros(8, np.uint8)])
        word[k:] = np.ndarray((len(tail) - 7,), dtype="<u8", buffer=tail, strides=(1,))[start[k:] - s0]
    word &= _MASKS[length]
    return ShortIds(word, length.astype(np.uint8))


def _vote_id_error(sources: list[Path], rows: list[int], label: str) -> InputError | None:
    """validate_votes' own duplicate-id message, from the ids themselves; None if no id repeats.

    Only called once two ids share a hash. For many files, names the file and row of the repeat.
    """
    frames = []
    for p in sources:
        if _format(p) == "parquet":
            frames.append(pq.read_table(p, columns=["vote_id"]).column(0).to_pandas())
        else:
            frames.append(read_table(p)["vote_id"])
    return duplicate_id_error(pd.concat(frames, ignore_index=True), rows, sources, label)


def duplicate_id_error(ids: pd.Series, rows: list[int], sources: list, label: str) -> InputError | None:
    """Run validate_votes on the ids alone (valid filler in the other columns) to get its exact message."""
    n = len(ids)
    filler = pd.DataFrame({"user_id": np.repeat("u", n), "model_a": np.repeat("x", n), "model_b": np.repeat("y", n),
                           "choice": np.repeat("a", n), "vote_id": ids.to_numpy()})
    try:
        validate_votes(filler, source=label)
    except InputError as e:
        msg = str(e)
    else:
        return None
    if len(sources) <= 1:
        return InputError(msg)
    bounds = np.cumsum([0, *rows])
    m = re.search(r"row (\d+) repeats vote id .* of row (\d+)", msg)
    if m is None:
        return InputError(msg)
    i, first = int(m.group(1)) - 1, int(m.group(2)) - 1
    fi, ff = (int(np.searchsorted(bounds, x, "right") - 1) for x in (i, first))
    msg = msg.replace(f"of row {first + 1}", f"of row {first - bounds[ff] + 1}" if ff == fi
                      else f"of {sources[ff]} row {first - bounds[ff] + 1}", 1)
    msg = msg.replace(f"{label}: column 'vote_id': row {i + 1} ", f"{sources[fi]}: column 'vote_id': row "
                      f"{i - bounds[fi] + 1} ", 1)
    return InputError(msg)


# -- users --------------------------------------------------------------------------------------------
@dataclass
class UserIndex:
    """Global user codes in order of first appearance, through hash tables of 64-bit id hashes.

    :meth:`codes` takes a batch's ids (every row, repeats allowed) with their :func:`hash_ids` (and the
    :func:`heedful.hashparts.hash_parts` of those), finds the known ids and numbers the new ones n, n + 1, ...
    by first appearance (:class:`heedful.hashparts.PartTables`: 64 cache-sized tables, pandas'
    ``UInt64HashTable.get_labels``, which releases the GIL). String ids are confirmed exactly for
    every row, ``ids[code] == id``: on their :class:`ShortIds` (bytes and length as integers) while every id
    seen has at most 8 bytes, else on the ids themselves; should two distinct ids ever share a hash, the index
    switches to exact matching with Arrow's ``index_in`` for good. Integers hash to themselves, so their
    codes need no check. Cost per batch: O(rows), never O(users). The table is not pickled (a builder
    travels between Dask processes); it is rebuilt from the ids on first use.
    """

    chunks: list[pa.Array] = field(default_factory=list)
    n: int = 0
    exact: bool = False
    table: PartTables | None = field(default=None, repr=False, compare=False)
    short: ShortIds | None = field(default=None, repr=False, compare=False)   # every id's short form, while all
    long: bool = False                                                      # are short; True once one is not

    def __getstate__(self) -> dict:
        return {**self.__dict__, "table": None}

    @property
    def type(self) -> pa.DataType | None:
        return self.chunks[0].type if self.chunks else None

    def values(self) -> pa.Array | None:
        """All users' ids in code order (one array)."""
        if not self.chunks:
            return None
        if len(self.chunks) > 1:
            self.chunks = [pa.concat_arrays(self.chunks)]
        return self.chunks[0]

    def ids(self) -> pa.ChunkedArray:
        """Every user's id in code order, as an (immutable) chunked array."""
        if len(self.chunks) > 64:          # few chunks keep take() fast; joining them now and then is cheap
            self.chunks = [pa.concat_arrays(self.chunks)]
        return pa.chunked_array(self.chunks, type=self.type)

    def _table(self) -> PartTables:
        if self.table is None:
            self.table = PartTables(hash_ids(self.values()) if self.n else None)
        return self.table

    def conform(self, values: pa.Array) -> pa.Array:
        """``values`` in the type of the ids already held (InputError when they cannot be cast to it)."""
        if not self.chunks or values.type == self.type:
            return values
        try:
            return values.cast(self.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(f"user_id holds values of type {values.type} here and {self.type} "
                             "elsewhere; give every file the same user_id type") from None

    def confirms(self, values: pa.Array) -> bool:
        """Whether codes found for ``values`` (in the index's type) are confirmed on the ids: matching by hash,
        and not integers (which hash to themselves)."""
        return not self.exact and not pa.types.is_integer(values.type)

    def codes(self, values: pa.Array, h: np.ndarray | None = None, deferred: bool = False,
              short: ShortIds | None = None, parts: HashParts | None = None, lazy: bool = False
              ) -> np.ndarray | GroupedCodes:
        """Codes (int64) of ``values``, adding the new ids in order of first appearance; ``h``: their hash_ids,
        ``parts``: the hash_parts of those, ``short``: their short_ids. ``deferred``: the caller confirms them
        itself (the :meth:`check` made right after the call, with the :meth:`conform` ``(values)`` and the same
        ``short``). ``lazy``: the codes as found (:class:`GroupedCodes`, put in row order by the caller, in any
        thread) where they need no check here."""
        if (cast := self.conform(values)) is not values:
            values, h, short, parts = cast, None, None, None
        if self.exact:
            return self._codes_exact(values)
        if parts is None or len(parts) != len(values):
            parts = hash_parts(hash_ids(values) if h is None else h)
        short = self.short_form(values, short)
        n0, short0 = self.n, self.short
        found, first = self._table().codes(parts, n0)
        if len(first):
            self.chunks.append(values.take(pa.array(first)))
            self.n += len(first)
            if short is not None:
                self.short = short.take(first) if self.short is None else self.short.then(short.take(first))
        if lazy and (deferred or not self.confirms(values)):
            return found
        out = found.in_rows()
        if not deferred and self.confirms(values) and not self.check(values, short).holds(out):
            if len(first):
                self.chunks.pop()
            self.n, self.short = n0, short0
            return self._collision(values)
        return out

    def short_form(self, values: pa.Array, short: ShortIds | None = None) -> ShortIds | None:
        """``values``' short form while every id so far has been short (computed if not given), else None; a
        long id ends the short forms for good."""
        if self.long or not self.confirms(values):
            return None
        short = short_ids(values) if short is None or len(short.word) != len(values) else short
        if short is None:
            self.long, self.short = True, None
        return short

    def check(self, values: pa.Array, short: ShortIds | None) -> _Check:
        """What confirms codes just found for ``values``: their short forms against every id's (exact), or else
        the ids themselves (taken at the codes and compared); later ids do not change it."""
        if short is not None and self.short is not None:       # (a long id clears self.short)
            return _Check(short=short, known=self.short)
        return _Check(ids=self.ids(), values=values)

    def _collision(self, values: pa.Array) -> np.ndarray:
        self.exact = True
        self.table = None
        return self._codes_exact(values)

    def _codes_exact(self, values: pa.Array) -> np.ndarray:
        enc = pc.dictionary_encode(values)
        distinct, rows = enc.dictionary, enc.indices.to_numpy(zero_copy_only=False)
        known = self.values()
        if known is None:
            self.chunks, self.n = [distinct], len(distinct)
            return rows.astype(np.int64)
        idx = pc.index_in(distinct, value_set=known)
        new = idx.is_null().to_numpy(zero_copy_only=False)
        out = idx.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if new.any():
            out[new] = self.n + np.arange(int(new.sum()))
            self.chunks.append(distinct.filter(pa.array(new)))
            self.n += int(new.sum())
        return out[rows]


def _same_ids(ids: pa.ChunkedArray, codes: np.ndarray, values: pa.Array) -> bool:
    """Whether ``ids[codes] == values`` row by row (``ids``: every user's id, in code order)."""
    return not len(codes) or bool(pc.all(pc.equal(ids.take(pa.array(codes)), values)).as_py())


@dataclass(frozen=True)
class _Check:
    """A confirmation of a batch's user codes, made when they were found: the batch's short ids and every
    known id's, or every known id and the batch's ids."""

    short: ShortIds | None = None
    known: ShortIds | None = None
    ids: pa.ChunkedArray | None = None
    values: pa.Array | None = None

    def holds(self, codes: np.ndarray) -> bool:
        if self.short is not None:
            return self.short.matches(self.known, codes)
        return _same_ids(self.ids, codes, self.values)


# -- accumulation -------------------------------------------------------------------------------------
@dataclass
class StatsBuilder:
    """Folds batches into cell counts; :meth:`result` gives the VoteStats. Also usable across processes:
    builders of disjoint parts of the input combine with :meth:`merge` (in input order)."""

    buffer_rows: int = BUFFER_ROWS
    index: UserIndex = field(default_factory=UserIndex)
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)
    cell_key: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cell_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pending: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)
    n_pending: int = 0
    user_ties: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tie_users: list[np.ndarray] = field(default_factory=list)   # codes of tie votes' users, not yet counted
    pair_ties: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    gold_a: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    gold_n: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    id_hashes: list[np.ndarray] = field(default_factory=list)
    n_rows: int = 0
    presort: bool = False   # sort each batch's keys on arrival, so a fold merges sorted runs (PARALLEL_SORT_THREADS)

    @property
    def n_users(self) -> int:
        return self.index.n

    @property
    def users(self) -> pa.Array | None:
        """Every user's id, in order of first appearance."""
        return self.index.values()

    def _pair_codes(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Builder codes of a batch's pairs, the new ones numbered in sorted order: when every pair shows up in
        the first batch (the usual case), the codes are already the final ones and :meth:`result` needs no
        re-sort of the cells."""
        for p in sorted(set(pairs) - self.pairs.keys()):
            self.pairs[p] = len(self.pairs)
        return np.array([self.pairs[p] for p in pairs], dtype=np.int64)

    def _grow(self, arr: np.ndarray, n: int) -> np.ndarray:
        return arr if len(arr) >= n else np.concatenate([arr, np.zeros(n - len(arr), np.int64)])

    def _ties(self) -> np.ndarray:
        """Tie votes per user [n_users], counting the buffered ones."""
        self.user_ties = self._grow(self.user_ties, self.n_users)
        if self.tie_users:
            self.user_ties += np.bincount(np.concatenate(self.tie_users), minlength=self.n_users)
            self.tie_users = []
        return self.user_ties

    def add(self, b: _Batch) -> None:
        """Count a batch made by :func:`prepare_batch` (batches in input order)."""
        self._absorb(_cells(self._assign(b), self.presort))

    def _assign(self, b: _Batch, deferred: bool = False) -> _Assigned:
        """The in-order part of counting a batch: the users' and pairs' codes in this builder (new ones added).
        ``deferred``: the codes are not yet confirmed on the ids nor in row order; :func:`_cells` does both (in any
        thread).
        Also keeps the batch's vote-id hashes for :meth:`duplicate_ids`."""
        if b.id_hash is not None:
            self.id_hashes.append(b.id_hash)
        values = self.index.conform(b.user_values)
        lazy, deferred = deferred, deferred and self.index.confirms(values)
        same = values is b.user_values
        short = self.index.short_form(values, b.user_short if same else None)
        codes = self.index.codes(values, deferred=deferred, short=short, parts=b.user_parts if same else None,
                                 lazy=lazy)
        b.user_parts = None                     # the hashes are done with (the codes keep their order)
        return _Assigned(b, codes, self._pair_codes(b.pairs), len(self.pairs),
                         self.index.check(values, short) if deferred else None)

    def _absorb(self, c: _Cells) -> None:
        """Add a batch's counts from :func:`_cells` (in any order: sums and a multiset of keys)."""
        self.pair_ties, self.gold_a, self.gold_n = (self._grow(x, len(c.pair_ties)) for x in
                                                    (self.pair_ties, self.gold_a, self.gold_n))
        for mine, theirs in ((self.pair_ties, c.pair_ties), (self.gold_a, c.gold_a), (self.gold_n, c.gold_n)):
            mine[:len(theirs)] += theirs
        self.tie_users.append(c.tie_users)       # counted at the end: a per-batch bincount would be O(users)
        self.pending.append((c.key, None))
        self.n_pending += len(c.key)
        self.n_rows += c.n_rows
        if self.n_pending >= max(self.buffer_rows, len(self.cell_key)):   # geometric: O(log) folds
            self._fold()

    def _fold(self) -> None:
        """Fold the buffered keys (and weighted keys) into the sorted unique cells.

        The new plain keys are sorted once; merging them with the (sorted) cells is a stable sort of
        sorted runs, i.e. a linear merge, so total work stays O(votes log chunk), not O(cells x folds).
        """
        self._ties()                                  # the tie buffer stays within the keys' buffer
        if not self.pending:
            return
        keys, counts = [self.cell_key], [self.cell_count]
        plain = [k for k, w in self.pending if w is None]
        weighted = [(k, w) for k, w in self.pending if w is not None]
        self.pending, self.n_pending = [], 0
        only_plain = bool(plain) and not weighted and not len(self.cell_key)
        if plain and self.presort:
            k, c = merge_counts(plain)
            keys.append(k)
            counts.append(c)
        elif plain:
            joined = _concat_draining(plain)
            k, c = unique_counts(joined)
            del joined
            keys.append(k)
            counts.append(c)
        keys += [k for k, _ in weighted]
        counts += [w for _, w in weighted]
        if only_plain:
            self.cell_key, self.cell_count = keys[1], counts[1]
            return
        key, count = np.concatenate(keys), np.concatenate(counts)
        order = np.argsort(key, kind="stable")       # timsort: linear on the already sorted runs
        key, count = key[order], count[order]
        start = _group_starts(key)
        self.cell_key = key[start]
        self.cell_count = np.add.reduceat(count, start).astype(np.int64) if len(key) else count

    def merge(self, other: StatsBuilder) -> StatsBuilder:
        """Fold ``other`` (a later part of the input) into this builder."""
        other._fold()
        if other.users is None:
            self.n_rows += other.n_rows
            return self
        ucode = self.index.codes(other.users)
        pmap = self._pair_codes(other.pairs)
        n_users, n_pairs = self.n_users, len(self.pairs)
        self.user_ties = self._ties()
        self.user_ties += np.bincount(ucode, weights=other._ties(), minlength=n_users).astype(np.int64)
        for name in ("pair_ties", "gold_a", "gold_n"):
            mine = self._grow(getattr(self, name), n_pairs)
            mine += np.bincount(pmap, weights=getattr(other, name), minlength=n_pairs).astype(np.int64)
            setattr(self, name, mine)
        u, k = other.cell_key >> 32, other.cell_key & 0xFFFFFFFF
        pair, rest = k // KINDS_PER_PAIR, k % KINDS_PER_PAIR
        key = (ucode[u] << 32) | (pmap[pair] * KINDS_PER_PAIR + rest) if len(u) else other.cell_key
        self.pending.append((key, other.cell_count))
        self.n_pending += len(key)
        self.n_rows += other.n_rows
        self.id_hashes += other.id_hashes
        if self.n_pending >= max(self.buffer_rows, len(self.cell_key)):   # geometric: O(log) folds
            self._fold()
        return self

    def result(self, consume: bool = False) -> VoteStats:
        """The VoteStats, pairs in sorted order (as vote_stats numbers them), cells sorted by (user, kind).

        Leaves the builder as it was (it can take more batches afterwards); ``consume``: the builder's cell
        arrays become the result's (no copies, 2 x 8 bytes a cell less), and the builder is not to be used again.
        """
        pairs = sorted(self.pairs)
        order = np.array([self.pairs[p] for p in pairs], dtype=np.int64)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        n_pairs, n_kinds = len(pairs), max(len(pairs) * KINDS_PER_PAIR, 1)
        provisional = np.arange(n_kinds)
        final_kind = rank[provisional // KINDS_PER_PAIR] * KINDS_PER_PAIR + provisional % KINDS_PER_PAIR
        self._fold()
        key = self.cell_key
        if np.array_equal(order, np.arange(len(order))):      # the kinds are final already
            user, count = key >> 32, self.cell_count if consume else self.cell_count.copy()
            kind = np.bitwise_and(key, 0xFFFFFFFF, out=key if consume else None)
            if consume:
                self.cell_key = self.cell_count = np.zeros(0, np.int64)
        else:      # sorted by user, kinds permuted inside each user: re-sort user << 32 | final kind (timsort,
            packed = final_kind[key & 0xFFFFFFFF]      # close to linear), with at most 3 such arrays alive at once
            high = np.right_shift(key, 32)
            packed |= np.left_shift(high, 32, out=high)
            del high
            by_key = np.argsort(packed, kind="stable")
            packed, count = packed[by_key], self.cell_count[by_key]
            del by_key
            user = packed >> 32
            kind = np.bitwise_and(packed, 0xFFFFFFFF, out=packed)
        users = pd.Index(self.users.to_pandas() if self.users is not None else [], name="user_id")
        return VoteStats(
            users=users,
            pairs=[(str(a), str(b)) for a, b in pairs],
            cell_user=user,
            cell_kind=kind,
            cell_count=count.astype(np.int64, copy=False),
            gold_a=self._grow(self.gold_a, n_pairs)[order],
            gold_n=self._grow(self.gold_n, n_pairs)[order],
            user_ties=self._ties(),
            pair_ties=self._grow(self.pair_ties, n_pairs)[order],
            n_rows=self.n_rows,
        )

    def duplicate_ids(self) -> bool:
        """Whether two vote ids share a hash (then :func:`_vote_id_error` confirms on the ids); the batches'
        hashes come sorted (:func:`runs_have_repeats`). The runs are kept as they are."""
        return runs_have_repeats(self.id_hashes)


@dataclass
class _Assigned:
    """A batch with its users' and pairs' codes in the builder; ``unconfirmed``: when those codes still need
    confirming, the builder's user ids then and the batch's user values in their type."""

    batch: _Batch
    user_codes: np.ndarray | GroupedCodes   # int64, per row (batch.user is None) or per batch.user_values entry
    pair_codes: np.ndarray           # int64 [batch pairs]
    n_pairs: int
    unconfirmed: _Check | None = None


@dataclass
class _Cells:
    """One batch's counts: its non-tie rows' keys (sorted when presorting) and the per-pair sums."""

    key: np.ndarray
    tie_users: np.ndarray
    pair_ties: np.ndarray
    gold_a: np.ndarray
    gold_n: np.ndarray
    n_rows: int


class _Collision(Exception):
    """Two distinct user ids share a hash (found by :func:`_cells`): the input is counted again, exactly."""


def _cells(a: _Assigned, presort: bool) -> _Cells:
    """Keys and sums of an assigned batch (no builder state, so any thread); confirms deferred user codes."""
    b = a.batch
    codes = a.user_codes.in_rows() if isinstance(a.user_codes, GroupedCodes) else a.user_codes
    if a.unconfirmed is not None and not a.unconfirmed.holds(codes):
        raise _Collision
    user = codes if b.user is None else codes[b.user]
    pair = a.pair_codes[b.pair] if len(a.pair_codes) else b.pair
    live = ~b.tie
    gold = np.where(b.gold_known, np.where(b.gold_canon_a == b.pick_a, 1, 2), 0)
    kind = ((pair * 2 + b.pick_a) * N_FIRST + b.first) * N_GOLD + gold
    u, k = user[live], kind[live]
    key = _sorted_keys(u, k, a.n_pairs * KINDS_PER_PAIR) if presort else (u << 32) | k
    return _Cells(key, user[b.tie], np.bincount(pair[b.tie], minlength=a.n_pairs),
                  np.bincount(pair[b.gold_known & b.gold_canon_a], minlength=a.n_pairs),
                  np.bincount(pair[b.gold_known], minlength=a.n_pairs), len(user))


def _sorted_keys(user: np.ndarray, kind: np.ndarray, n_kinds: int) -> np.ndarray:
    """np.sort(user << 32 | kind) (int64, kind < n_kinds): sorted as the 32-bit user << b | kind (b the bits
    n_kinds needs) when that fits, then widened: the same order, and a 32-bit sort takes 30 ms per 1M keys here
    against 50 ms for 64 bits."""
    bits = max(int(n_kinds - 1).bit_length(), 1)
    if not len(user) or int(user.max()) >= 1 << (32 - bits):
        return np.sort((user << 32) | kind)
    packed = np.left_shift(user, bits).astype(np.uint32)
    packed |= kind.astype(np.uint32)
    packed.sort()
    wide = np.right_shift(packed, bits).astype(np.int64)
    wide <<= 32
    wide |= packed & np.uint32((1 << bits) - 1)
    return wide


def _sort_parallel(x: np.ndarray, threads: int | None = None, min_parallel: int = 1 << 22) -> np.ndarray:
    """np.sort of non-negative int64 (or uint64) values: split by value range, parts sorted in threads.

    The split costs about what one thread gains, so it is used from 4 threads on."""
    threads = threads or worker_threads()
    if threads < PARALLEL_SORT_THREADS or len(x) < min_parallel:
        return np.sort(x)
    top = int(x.max()).bit_length()
    shift = type(x[0])(max(top - 8, 0))
    bins = (x >> shift).astype(np.int16)                    # the top 8 bits: 256 ranges, in value order
    order = np.argsort(bins, kind="stable")                 # radix sort of a 16-bit key
    xs = x[order]
    bounds = np.searchsorted(bins[order], np.arange(257))
    out = np.empty_like(x)

    def sort_range(i: int) -> None:
        out[bounds[i]:bounds[i + 1]] = np.sort(xs[bounds[i]:bounds[i + 1]])

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(sort_range, range(256)))
    return out


def unique_counts(keys: np.ndarray, threads: int | None = None, min_parallel: int = 1 << 22) -> tuple[np.ndarray,
                                                                                                        np.ndarray]:
    """np.unique(keys, return_counts=True) for non-negative int64 keys, sorting in threads."""
    return _counts_of_sorted(_sort_parallel(keys, threads, min_parallel))


def _cut_runs(runs: list[np.ndarray], parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted runs cut at the same ``parts - 1`` values (quantiles of the largest run, found in each by binary
    search), so that equal values fall in the same range: ends [runs, parts + 1] of each run's pieces, and
    each range's size [parts]."""
    big = max(runs, key=len)
    cuts = big[(np.arange(1, parts) * len(big)) // parts]
    ends = np.stack([np.concatenate([[0], np.searchsorted(r, cuts), [len(r)]]) for r in runs])
    return ends, (ends[:, 1:] - ends[:, :-1]).sum(0)


def _merged_range(runs: list[np.ndarray], ends: np.ndarray, i: int, out: np.ndarray) -> np.ndarray:
    """Range i of the cut runs (:func:`_cut_runs`), its pieces merged (timsort) into ``out`` (sized to it)."""
    piece = np.concatenate([r[e[i]:e[i + 1]] for r, e in zip(runs, ends, strict=True)], out=out)
    piece.sort(kind="stable")
    return piece


def merge_counts(runs: list[np.ndarray], threads: int = 2, min_parallel: int = 1 << 22,
                 range_values: int = RANGE_VALUES) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of sorted runs (emptying the list) and how often each occurs.

    From ``min_parallel`` values on, the runs are cut at the same values (quantiles of the largest run, found in
    each by binary search) into ranges of about ``range_values`` values; each range's pieces are merged (timsort)
    and counted in a small buffer that stays in cache, ``threads`` threads taking consecutive ranges and writing
    straight into the output, whose parts are then moved together. Else one merge. Beyond the output, memory is
    a buffer per thread (one merge of everything took two copies of the keys and their group starts: at 10M
    votes 0.33-0.47 s at the end of a read, 0.27-0.30 s now, and 150 MB less resident after it)."""
    n = sum(len(r) for r in runs)
    if threads < 2 or n < max(min_parallel, 1):
        return _counts_of_sorted(_sort_in_place(_concat_draining(runs)))
    parts = max(threads, n // max(range_values, 1))
    ends, sizes = _cut_runs(runs, parts)
    first = np.concatenate([[0], np.cumsum(sizes)])          # where range i may start writing (it has sizes[i] values)
    key, count = np.empty(n, dtype=np.result_type(*runs)), np.empty(n, dtype=np.int64)

    def count_ranges(ranges: np.ndarray) -> tuple[int, int]:
        if not len(ranges):
            return 0, 0
        buf = np.empty(int(sizes[ranges].max()), dtype=key.dtype)
        at = pos = int(first[ranges[0]])
        for i in ranges.tolist():
            m = int(sizes[i])
            if not m:
                continue
            piece = _merged_range(runs, ends, i, buf[:m])
            st = _group_starts(piece)
            u = len(st)
            np.take(piece, st, out=key[pos:pos + u])
            np.subtract(st[1:], st[:-1], out=count[pos:pos + u - 1])
            count[pos + u - 1] = m - st[-1]
            pos += u
        return at, pos

    with ThreadPoolExecutor(threads) as ex:
        spans = list(ex.map(count_ranges, np.array_split(np.arange(parts), threads)))
    runs.clear()
    done = 0
    for lo, hi in spans:                # each thread's part moved down to follow the one before (memmove)
        if lo != done:
            key[done:done + hi - lo] = key[lo:hi]
            count[done:done + hi - lo] = count[lo:hi]
        done += hi - lo
    return key[:done], count[:done]


def _counts_of_sorted(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a sorted array and how often each occurs."""
    start = _group_starts(s)
    counts = np.empty(len(start), dtype=np.int64)
    np.subtract(start[1:], start[:-1], out=counts[:-1])
    counts[-1:] = len(s) - start[-1:]
    return s[start], counts


def _sort_in_place(x: np.ndarray) -> np.ndarray:
    """x sorted in place by a stable sort: timsort merges sorted runs in linear passes (and still sorts
    correctly, only slower, should a run not be sorted); returns x."""
    x.sort(kind="stable")
    return x


def _concat_draining(runs: list[np.ndarray]) -> np.ndarray:
    """np.concatenate(runs), emptying the list as it copies: a run no one else holds is freed once copied, so
    the copy needs about one run of extra memory, not all of them."""
    out = np.empty(sum(len(r) for r in runs), dtype=np.result_type(*runs))
    pos = 0
    runs.reverse()
    while runs:
        r = runs.pop()
        out[pos:pos + len(r)] = r
        pos += len(r)
    return out


def runs_have_repeats(runs: list[np.ndarray], range_values: int = RANGE_VALUES) -> bool:
    """Whether a value occurs twice in sorted runs taken together, without merging them.

    The runs are cut at the same values (quantiles of the largest run, found in each by binary search), so
    equal values fall in the same range; each range's pieces (about ``range_values`` values: a few hundred kB,
    in cache) are merged together (timsort) and neighbours compared. 10M vote-id hashes in 10 runs: 0.13 s, against
    0.15 s (0.34 s on fresh pages) for a merge of everything, and no 80 MB copy; beside ``result`` at the end of a
    read, 0.30-0.34 -> 0.17-0.18 s."""
    runs = [r for r in runs if len(r)]
    if len(runs) <= 1:
        return bool(runs) and _repeats_in_sorted(runs[0])
    ends, sizes = _cut_runs(runs, max(1, sum(len(r) for r in runs) // max(range_values, 1)))
    buf = np.empty(int(sizes.max()), dtype=np.result_type(*runs))
    return any(_repeats_in_sorted(_merged_range(runs, ends, i, buf[:m])) for i, m in enumerate(sizes.tolist()))


def _repeats_in_sorted(s: np.ndarray) -> bool:
    return bool((s[1:] == s[:-1]).any())


def _group_starts(s: np.ndarray) -> np.ndarray:
    """Where each run of equal values of a sorted array begins."""
    return np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]])) if len(s) else np.zeros(0, np.int64)


def has_repeats(h: np.ndarray, threads: int | None = None, min_parallel: int = 1 << 22) -> bool:
    """Whether any value of ``h`` (uint64 hashes) repeats (sorted by value range in threads)."""
    return _repeats_in_sorted(_sort_parallel(h, threads, min_parallel))


def worker_threads() -> int:
    """Threads for reading and encoding batches: the machine's cores, at most 8 (HEEDFUL_THREADS overrides)."""
    env = os.environ.get("HEEDFUL_THREADS")
    if env:
        return max(1, int(env))
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n))


def prepare_batch(batch: pa.RecordBatch, source: str, row0: int) -> _Batch:
    """Validate and encode one batch whose first row is row ``row0 + 1`` of ``source``; hash its ids.

    Needs no builder state, so batches are prepared in worker threads (Arrow and numpy release the GIL).
    """
    try:
        b = _encode_fast(batch)
    except _Fallback:
        b = _encode_pandas(batch, source, row0)
    if "vote_id" in batch.schema.names:
        col = batch.column("vote_id")
        ok = (_is_text(col.type) or pa.types.is_integer(col.type)) and not col.null_count and not (
            _is_text(col.type) and _any_blank(col))
        if not ok:
            _encode_pandas(batch, source, row0)        # raises validate_votes' message for a blank id
            col = pa.array(col.to_pandas().astype(str).to_numpy(dtype=object), type=pa.string())
        b.id_hash = np.sort(hash_ids(col))      # sorted here, in a worker: the final check merges sorted runs
    b.user_parts = hash_parts(hash_ids(b.user_values))
    b.user_short = short_ids(b.user_values)
    return b


def _prepare_part(part: _Part, chunk_rows: int) -> list[_Batch]:
    """Read (Parquet row groups) and prepare one part's batches, in a worker thread."""
    out, row0 = [], part.row0
    for batch in part.batches(chunk_rows):
        if batch.num_rows:
            out.append(prepare_batch(batch, str(part.path), row0))
        row0 += batch.num_rows
    return out


def add_batch(builder: StatsBuilder, batch: pa.RecordBatch, source: str, row0: int) -> None:
    """Validate and count one batch whose first row is row ``row0 + 1`` of ``source``."""
    builder.add(prepare_batch(batch, source, row0))


def stream_vote_stats(paths: str | Path | Sequence[str | Path], *, chunk_rows: int = CHUNK_ROWS,
                      buffer_rows: int = BUFFER_ROWS, threads: int | None = None) -> VoteStats:
    """VoteStats of one or many vote files (a path, a folder, a glob, or a list), read in chunks.

    Equal to ``vote_stats(read_votes(path))`` for one file, and to the vote_stats of the files'
    concatenation for many; raises InputError with validate_votes' one-line messages (the first bad
    row in input order, whatever the threads). Batches are read in order, validated and encoded by
    ``threads`` workers (default :func:`worker_threads`); the main thread numbers their users and pairs
    in input order, and the workers confirm the user codes on the ids and form and sort the keys. At
    most ``threads + 1`` batches are in each stage, so memory stays bounded by the cells plus a few
    chunks. Should two user ids share a hash, the input is counted again with exact matching.
    """
    sources = expand_sources(paths)
    label = str(paths) if isinstance(paths, (str, Path)) else ", ".join(map(str, sources))
    threads = threads or worker_threads()
    try:
        builder, rows = _count_parts(sources, chunk_rows, buffer_rows, threads, exact=False)
    except _Collision:
        builder, rows = _count_parts(sources, chunk_rows, buffer_rows, threads, exact=True)
    if builder.n_rows == 0:
        raise InputError(f"{label}: no rows (only a header)")
    with ThreadPoolExecutor(1) as ex:           # the two final sorts side by side (numpy releases the GIL)
        repeats = ex.submit(builder.duplicate_ids)
        stats = builder.result(consume=True)
        if repeats.result():
            e = _vote_id_error(sources, rows, str(sources[0]))
            if e is not None:
                raise e
    return stats


def _count_parts(sources: list[Path], chunk_rows: int, buffer_rows: int, threads: int,
                 exact: bool) -> tuple[StatsBuilder, list[int]]:
    """A builder holding every part of ``sources`` (and each file's row count), counted in input order."""
    builder = StatsBuilder(buffer_rows=buffer_rows, index=UserIndex(exact=exact),
                           presort=threads < PARALLEL_SORT_THREADS)
    rows: list[int] = []
    inflight: deque[Future] = deque()          # parts being read and prepared
    counting: deque[Future] = deque()          # assigned batches whose keys are being formed

    def count(fut: Future) -> None:
        for b in fut.result():
            counting.append(ex.submit(_cells, builder._assign(b, deferred=True), builder.presort))
            while len(counting) > threads:
                builder._absorb(counting.popleft().result())

    with ThreadPoolExecutor(threads) as ex:
        try:
            for path in sources:
                rows.append(0)
                for part in _parts(path, chunk_rows):
                    inflight.append(ex.submit(_prepare_part, part, chunk_rows))
                    rows[-1] = part.row0 + part.rows
                    while len(inflight) > threads:
                        count(inflight.popleft())
                if rows[-1] == 0 and len(sources) == 1:
                    raise InputError(f"{path}: no rows (only a header)")
        except InputError:
            while inflight:                     # an earlier part's error comes first
                count(inflight.popleft())
            raise
        while inflight:
            count(inflight.popleft())
        while counting:
            builder._absorb(counting.popleft().result())
    return builder, rows


__all__ = ["StatsBuilder", "UserIndex", "add_batch", "expand_sources", "has_repeats", "hash_ids", "merge_counts",
           "prepare_batch", "runs_have_repeats", "shift_rows", "stream_vote_stats", "unique_counts", "worker_threads"]
