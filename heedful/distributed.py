"""Sufficient statistics on a Dask cluster: many files or partitions counted in parallel, fitted on one node.

The votes become a ``dask.dataframe`` (one partition per group of Parquet row groups, or per CSV/TSV/JSONL
file, read with pyarrow exactly as :mod:`heedful.ingest` reads them; or any dask DataFrame you pass).
Each partition is validated and counted on a worker into a :class:`heedful.ingest.StatsBuilder` (its
users, pairs and (user, kind) cells); the client merges the builders in partition order, so users keep
their order of first appearance and the result equals the single-process
:func:`heedful.ingest.stream_vote_stats` (and ``vote_stats(read_votes(path))``). What travels back is
the cells, bounded by users x kinds per partition, never the votes.

Install with ``pip install 'heedful[dask]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from heedful.errors import InputError
from heedful.ingest import (
    CHUNK_ROWS,
    NEEDED,
    StatsBuilder,
    _batches,
    _check_header,
    _format,
    _vote_id_error,
    add_batch,
    duplicate_id_error,
    expand_sources,
    shift_rows,
)
from heedful.suffstats import VoteStats


def _dask():
    try:
        import dask
        import dask.dataframe as dd
        from dask.distributed import Client, LocalCluster
    except ImportError as e:
        raise InputError(f"--dask needs the dask extra: pip install 'heedful[dask]' ({e})") from None
    return dask, dd, Client, LocalCluster


@dataclass(frozen=True)
class Part:
    """One partition: a file, its row groups (Parquet) or None (the whole file), and its first row."""

    path: str
    row_groups: tuple[int, ...] | None
    row0: int


def partitions(sources: list[Path], rows_per_part: int = CHUNK_ROWS) -> list[Part]:
    """Parquet files split at row-group boundaries into parts of about ``rows_per_part`` rows; others whole."""
    parts: list[Part] = []
    for p in sources:
        if _format(p) != "parquet" or not p.exists():
            parts.append(Part(str(p), None, 0))
            continue
        pf = pq.ParquetFile(p)
        _check_header(pf.schema_arrow.names, str(p))
        groups: list[int] = []
        row0 = rows = 0
        for g in range(pf.metadata.num_row_groups):
            groups.append(g)
            rows += pf.metadata.row_group(g).num_rows
            if rows - row0 >= rows_per_part:
                parts.append(Part(str(p), tuple(groups), row0))
                groups, row0 = [], rows
        if groups or not parts or parts[-1].path != str(p):
            parts.append(Part(str(p), tuple(groups), row0))
    return parts


def read_part(part: Part) -> pd.DataFrame:
    """The needed columns of one partition as a pandas frame (text columns as pyarrow reads them)."""
    if part.row_groups is None:
        batches = list(_batches(Path(part.path), CHUNK_ROWS))
        table = pa.Table.from_batches(batches) if batches else pa.table({})
    else:
        pf = pq.ParquetFile(part.path)
        cols = [c for c in NEEDED if c in pf.schema_arrow.names]
        table = pf.read_row_groups(list(part.row_groups), columns=cols)
    return table.to_pandas()


def part_stats(frame: pd.DataFrame, source: str, row0: int) -> tuple[StatsBuilder | None, str | None, int]:
    """Count one partition: (builder, None, rows), or (None, the validation message, rows) on bad input."""
    builder = StatsBuilder()
    try:
        if len(frame):
            add_batch(builder, pa.RecordBatch.from_pandas(frame, preserve_index=False), source, row0)
    except InputError as e:
        return None, str(e), len(frame)
    builder._fold()
    return builder, None, len(frame)


def merge_parts(results: Sequence[tuple[StatsBuilder | None, str | None, int]], shift: bool = False) -> StatsBuilder:
    """Merge partition builders in order; raise the first partition's error (rows shifted when ``shift``)."""
    total = StatsBuilder()
    row0 = 0
    for builder, error, n in results:
        if error is not None:
            raise InputError(shift_rows(error, row0) if shift else error)
        total.merge(builder)
        row0 += n
    return total


def _client(address: str | None):
    dask, dd, Client, LocalCluster = _dask()
    if address in (None, "", "local"):
        return Client(LocalCluster(processes=False, dashboard_address=None)), True
    try:
        return Client(address, timeout="20s"), True
    except (OSError, TimeoutError) as e:
        raise InputError(f"--dask: cannot reach the Dask scheduler at {address} ({e})") from None


def frame_vote_stats(frame, *, source: str = "votes", client=None) -> VoteStats:
    """VoteStats of a dask DataFrame of votes (rows numbered across its partitions in messages)."""
    dask, dd, _, _ = _dask()
    tasks = [dask.delayed(part_stats)(p, source, 0) for p in frame.to_delayed()]
    results = client.gather(client.compute(tasks)) if client is not None else dask.compute(*tasks)
    total = merge_parts(results, shift=True)
    if total.n_rows == 0:
        raise InputError(f"{source}: no rows (only a header)")
    if total.duplicate_ids():
        e = duplicate_id_error(frame["vote_id"].compute().reset_index(drop=True), [], [], source)
        if e is not None:
            raise e
    return total.result()


def dask_vote_stats(paths: str | Path | Sequence[str | Path], address: str | None = "local", *,
                    rows_per_part: int = CHUNK_ROWS, client=None) -> VoteStats:
    """VoteStats of vote files counted on a Dask cluster (``address``: a scheduler, or 'local').

    The files become a dask DataFrame (``dd.from_map`` over :func:`partitions`); every partition is
    counted on a worker and the builders are merged here. Equal to
    :func:`heedful.ingest.stream_vote_stats` on the same files, messages included.
    """
    dask, dd, _, _ = _dask()
    sources = expand_sources(paths)
    parts = partitions(sources, rows_per_part)
    own = client is None
    if own:
        client, _ = _client(address)
    try:
        meta = None
        if parts[0].row_groups is not None:
            schema = pq.ParquetFile(parts[0].path).schema_arrow
            meta = schema.empty_table().select([c for c in NEEDED if c in schema.names]).to_pandas()
        frame = dd.from_map(read_part, parts, meta=meta, enforce_metadata=False)
        tasks = [dask.delayed(part_stats)(d, p.path, p.row0) for d, p in zip(frame.to_delayed(), parts, strict=True)]
        results = client.gather(client.compute(tasks))
    finally:
        if own:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()
    rows: dict[str, int] = {}
    for p, (_, _, n) in zip(parts, results, strict=True):
        rows[p.path] = rows.get(p.path, 0) + n
    for p in sources:
        if rows.get(str(p), 0) == 0 and len(sources) == 1:
            raise InputError(f"{p}: no rows (only a header)")
    total = merge_parts(results)
    if total.n_rows == 0:
        raise InputError(f"{paths}: no rows (only a header)")
    if total.duplicate_ids():
        e = _vote_id_error(sources, [rows.get(str(p), 0) for p in sources], str(sources[0]))
        if e is not None:
            raise e
    return total.result()


__all__ = ["Part", "dask_vote_stats", "frame_vote_stats", "merge_parts", "part_stats", "partitions", "read_part"]
