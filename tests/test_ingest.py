"""Streaming ingestion equals vote_stats(read_votes(...)): counts, order, dtypes, and the error messages."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from heedful.cli import app
from heedful.errors import InputError
from heedful.ingest import HASH_BLOCK, StatsBuilder, hash_ids, shift_rows, stream_vote_stats
from heedful.simulate import default_pairs, simulate
from heedful.suffstats import VoteStats, vote_stats
from heedful.votes import read_votes

FIELDS = ("cell_user", "cell_kind", "cell_count", "gold_a", "gold_n", "user_ties", "pair_ties")


def assert_same(a: VoteStats, b: VoteStats) -> None:
    pd.testing.assert_index_equal(a.users, b.users)
    assert a.pairs == b.pairs
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        np.testing.assert_array_equal(x, y, err_msg=f)
    assert a.n_rows == b.n_rows


def messy_votes(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Votes with everything the contract allows: both pair orders, ties, gold, order, case and spaces."""
    rng = np.random.default_rng(seed)
    models = np.array(["m1", " m2", "m3 ", "zeta", "alpha"])
    a = rng.integers(0, 5, n)
    b = (a + rng.integers(1, 5, n)) % 5
    return pd.DataFrame({
        "vote_id": [f"v{i}" for i in range(n)],
        "user_id": [f"u{k}" for k in rng.zipf(1.5, n) % 400],
        "model_a": models[a],
        "model_b": models[b],
        "choice": rng.choice(["a", "b", "tie", " A", "B ", "Tie"], n, p=[0.35, 0.35, 0.1, 0.1, 0.05, 0.05]),
        "shown_first": rng.choice(["a", "b", None, " B"], n),
        "gold": rng.choice([None, None, None, "a", "b", "A "], n),
        "prompt": "p",
    })


@pytest.fixture
def messy(tmp_path: Path) -> pd.DataFrame:
    return messy_votes()


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("chunk_rows", [1 << 20, 257])
def test_stream_equals_vote_stats_of_read_votes(tmp_path, messy, suffix, chunk_rows):
    path = tmp_path / f"votes{suffix}"
    if suffix == ".parquet":
        messy.to_parquet(path, row_group_size=500)
    elif suffix == ".jsonl":
        messy.to_json(path, orient="records", lines=True)
    else:
        messy.to_csv(path, index=False, sep="," if suffix == ".csv" else "\t")
    assert_same(stream_vote_stats(path, chunk_rows=chunk_rows, buffer_rows=1000), vote_stats(read_votes(path)))


def test_parquet_parts_read_the_few_valued_columns_as_dictionaries(tmp_path, messy):
    """Model, choice, order and gold columns come out of Parquet as dictionaries (nothing to hash or encode);
    the ids stay text. The counts are the same (test_stream_equals_vote_stats_of_read_votes)."""
    from heedful.ingest import FEW_VALUES, _parts

    path = tmp_path / "v.parquet"
    messy.to_parquet(path, row_group_size=500)
    batch = next(_parts(path, 1 << 20)).batches(1 << 20)[0]
    assert all(pa.types.is_dictionary(batch.schema.field(c).type) for c in FEW_VALUES)
    text = (pa.types.is_string, pa.types.is_large_string)
    assert all(any(t(batch.schema.field(c).type) for t in text) for c in ("user_id", "vote_id"))


def test_integer_user_ids_keep_their_dtype(tmp_path):
    v = messy_votes(500).assign(user_id=lambda d: np.arange(len(d)) % 37 * 1000)
    v.to_parquet(tmp_path / "v.parquet", row_group_size=100)
    s = stream_vote_stats(tmp_path / "v.parquet", chunk_rows=64)
    assert s.users.dtype == np.int64
    assert_same(s, vote_stats(read_votes(tmp_path / "v.parquet")))


def test_many_files_folder_and_glob_equal_the_concatenation(tmp_path, messy):
    parts = np.array_split(np.arange(len(messy)), 4)
    for i, idx in enumerate(parts):
        messy.iloc[idx].to_parquet(tmp_path / f"part-{i}.parquet")
    want = vote_stats(read_votes_concat([tmp_path / f"part-{i}.parquet" for i in range(4)]))
    assert_same(stream_vote_stats(tmp_path, chunk_rows=300), want)
    assert_same(stream_vote_stats(str(tmp_path / "part-*.parquet")), want)
    assert_same(stream_vote_stats([tmp_path / f"part-{i}.parquet" for i in range(4)]), want)


def read_votes_concat(paths):
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def test_builders_merge_in_order_like_one_pass(tmp_path, messy):
    from heedful.ingest import add_batch

    table = pa.Table.from_pandas(messy, preserve_index=False)
    whole, first, second = StatsBuilder(), StatsBuilder(), StatsBuilder()
    add_batch(whole, table.to_batches()[0], "v", 0)
    add_batch(first, table.slice(0, 1000).to_batches()[0], "v", 0)
    add_batch(second, table.slice(1000).to_batches()[0], "v", 1000)
    assert_same(first.merge(second).result(), whole.result())


def _message(fn) -> str:
    with pytest.raises(InputError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("column, value", [
    ("user_id", None), ("user_id", "  "), ("model_a", None), ("choice", "maybe"), ("choice", None),
    ("shown_first", "left"), ("gold", "c"), ("model_b", "m1"), ("vote_id", ""),
])
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_errors_match_read_votes_with_rows_counted_across_chunks(tmp_path, messy, column, value, suffix):
    v = messy.copy()
    row = 2345
    v.loc[row, column] = value
    if column == "model_b":
        v.loc[row, "model_a"] = "m1"
    path = tmp_path / f"bad{suffix}"
    v.to_parquet(path, row_group_size=700) if suffix == ".parquet" else v.to_csv(path, index=False)
    want = _message(lambda: read_votes(path))
    assert f"row {row + 1} " in want
    assert _message(lambda: stream_vote_stats(path)) == want               # one chunk: the very same message
    chunked = _message(lambda: stream_vote_stats(path, chunk_rows=1000))     # row counted across chunks
    assert chunked.split(" (")[0] == want.split(" (")[0]


def test_duplicate_vote_ids_across_chunks_and_files(tmp_path, messy):
    v = messy.copy()
    v.loc[2900, "vote_id"] = "v17"
    v.to_parquet(tmp_path / "dup.parquet", row_group_size=500)
    want = _message(lambda: read_votes(tmp_path / "dup.parquet"))
    assert _message(lambda: stream_vote_stats(tmp_path / "dup.parquet", chunk_rows=500)) == want
    messy.iloc[:10].to_parquet(tmp_path / "x1.parquet")
    messy.iloc[5:20].to_parquet(tmp_path / "x2.parquet")
    msg = _message(lambda: stream_vote_stats([tmp_path / "x1.parquet", tmp_path / "x2.parquet"]))
    assert msg.startswith(f"{tmp_path / 'x2.parquet'}: column 'vote_id': row 1 repeats vote id 'v5' of ")
    assert f"of {tmp_path / 'x1.parquet'} row 6" in msg


def test_reader_failures_are_read_table_messages(tmp_path, messy):
    messy.iloc[:50].to_csv(tmp_path / "bad.csv", index=False)
    with open(tmp_path / "bad.csv", "a") as f:
        f.write("x,y\n")
    assert _message(lambda: stream_vote_stats(tmp_path / "bad.csv")) == _message(
        lambda: read_votes(tmp_path / "bad.csv"))
    (tmp_path / "empty.csv").write_text("")
    assert _message(lambda: stream_vote_stats(tmp_path / "empty.csv")) == _message(
        lambda: read_votes(tmp_path / "empty.csv"))
    messy.iloc[:0].to_parquet(tmp_path / "none.parquet")
    assert _message(lambda: stream_vote_stats(tmp_path / "none.parquet")) == _message(
        lambda: read_votes(tmp_path / "none.parquet"))
    messy.drop(columns="choice").to_parquet(tmp_path / "nochoice.parquet")
    assert _message(lambda: stream_vote_stats(tmp_path / "nochoice.parquet")) == _message(
        lambda: read_votes(tmp_path / "nochoice.parquet"))
    assert "no file matches" in _message(lambda: stream_vote_stats(str(tmp_path / "nothing-*.parquet")))


def test_shift_rows():
    assert shift_rows("f: column 'user_id': row 3 is empty (2 such rows)", 10) == \
        "f: column 'user_id': row 13 is empty (2 such rows)"
    assert shift_rows("f: column 'vote_id': row 5 repeats vote id 'a' of row 2 (1 repeats)", 100) == \
        "f: column 'vote_id': row 105 repeats vote id 'a' of row 102 (1 repeats)"


def test_hash_ids_separates_ids_and_respects_slices():
    ids = pa.array([f"id-{i}" for i in range(20000)] + ["", "a", "a\x00", "ab"])
    h = hash_ids(ids)
    assert len(np.unique(h)) == len(ids)
    np.testing.assert_array_equal(hash_ids(ids.slice(5, 10)), h[5:15])
    large = pa.array(["x", "y"], type=pa.large_string())
    np.testing.assert_array_equal(hash_ids(large), hash_ids(pa.array(["x", "y"])))


def test_hash_ids_in_blocks_equal_each_id_hashed_alone():
    """Past HASH_BLOCK ids the hashing runs block by block; every id still hashes as it does on its own."""
    ids = [f"user-{i}" * (i % 4 + 1) for i in range(2 * HASH_BLOCK + 17)]
    col = pa.array(ids)
    h = hash_ids(col)
    picks = [0, HASH_BLOCK - 1, HASH_BLOCK, HASH_BLOCK + 1, 2 * HASH_BLOCK, len(ids) - 1]
    for i in picks:
        assert hash_ids(pa.array([ids[i]]))[0] == h[i]
    np.testing.assert_array_equal(hash_ids(col.slice(3, HASH_BLOCK + 5)), h[3:HASH_BLOCK + 8])
    assert len(np.unique(h)) == len(ids)


def test_cli_fit_streams_and_writes_the_same_fit(tmp_path, messy):
    from heedful.inference import Attentiveness

    path = tmp_path / "v.parquet"
    messy.to_parquet(path)
    r = CliRunner().invoke(app, ["fit", str(path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    got = pd.read_parquet(tmp_path / "out" / "users.parquet")
    want = Attentiveness().fit(read_votes(path)).users_
    pd.testing.assert_frame_equal(got, want.reset_index(drop=True), check_dtype=False, rtol=0, atol=0)


@pytest.mark.parametrize("fails", [False, True])
def test_cli_fit_pauses_the_collector_only_while_reading(tmp_path, messy, monkeypatch, fails):
    """No cyclic collection while the votes are read and torch imported beside them; during the fit the
    collector runs with what existed then frozen; afterwards (or after a bad file) it is as it was."""
    import gc

    import heedful.ingest
    from heedful.inference import Attentiveness

    path = tmp_path / "v.parquet"
    messy.to_parquet(path)
    seen = {}
    read, fit = heedful.ingest.stream_vote_stats, Attentiveness.fit

    def reading(p):
        seen["read"] = gc.isenabled()
        if fails:
            raise InputError("a bad file")
        return read(p)

    def fitting(self, votes):
        seen["fit"] = (gc.isenabled(), gc.get_freeze_count() > 0)
        return fit(self, votes)

    monkeypatch.setattr(heedful.ingest, "stream_vote_stats", reading)
    monkeypatch.setattr(Attentiveness, "fit", fitting)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    r = CliRunner().invoke(app, ["fit", str(path), "-o", str(tmp_path / "out")])
    assert (r.exit_code != 0) == fails, r.output
    assert seen["read"] is False
    assert seen.get("fit") == (None if fails else (True, True))
    assert gc.isenabled() and gc.get_freeze_count() == 0


# -- the user index, threads and the repeat check ------------------------------------------------------
def _first_appearance_codes(batches: list[list[str]]) -> list[np.ndarray]:
    seen: dict[str, int] = {}
    return [np.array([seen.setdefault(v, len(seen)) for v in b]) for b in batches]


@pytest.mark.parametrize("widths", ["short", "long", "short then long"])
@pytest.mark.parametrize("collide", [False, True])
@pytest.mark.parametrize("repeats", [False, True])
def test_user_index_codes_in_order_of_first_appearance(collide, repeats, widths):
    """Codes per row (ids may repeat within a batch), the new ids numbered by first appearance; a hash shared
    by two distinct ids is caught on the ids (their 8-byte short forms while every id has at most 8 bytes, the
    ids themselves once one is longer) and the index turns exact, with the same codes."""
    from heedful.ingest import UserIndex
    rng = np.random.default_rng(3)
    short, long = [f"user-{i}" for i in range(300)], [f"user-id-{i:05d}" for i in range(300)]
    pools = {"short": [short] * 6, "long": [long] * 6, "short then long": [short] * 3 + [short + long] * 3}[widths]
    batches = [rng.choice(pool, size=120).tolist() for pool in pools]
    if not repeats:
        batches = [list(dict.fromkeys(b)) for b in batches]
    assert repeats == any(len(set(b)) < len(b) for b in batches)
    index = UserIndex()
    for j, (b, want) in enumerate(zip(batches, _first_appearance_codes(batches), strict=True)):
        # collide: every id gets the same hash from the third batch on, which the index must notice
        h = np.zeros(len(b), np.uint64) if collide and j >= 2 else None
        np.testing.assert_array_equal(index.codes(pa.array(b), h), want)
    assert index.exact == collide
    assert index.long == (widths != "short" and not (collide and widths == "short then long"))
    assert index.values().to_pylist() == list(dict.fromkeys(v for b in batches for v in b))


def test_short_ids_are_each_ids_bytes_and_length():
    """short_ids: the id's UTF-8 bytes as a little-endian word (zeros past its end) and its byte length, for
    string and large_string columns, slices, empty ids, the last ids of the data; None past 8 bytes or with nulls."""
    from heedful.ingest import short_ids
    ids = ["", "a", "ab", "ab\x00", "abcdefgh", "é", "ü12345", "12345678", "x"]
    for typ in (pa.string(), pa.large_string()):
        col = pa.array(ids, type=typ)
        for sl in (col, col.slice(1), col.slice(3, 4), col.slice(8)):
            got = short_ids(sl)
            want = [int.from_bytes(v.encode().ljust(8, b"\x00"), "little") for v in sl.to_pylist()]
            assert got.word.tolist() == want
            assert got.length.tolist() == [len(v.encode()) for v in sl.to_pylist()]
    pairs = set(zip(short_ids(pa.array(ids)).word.tolist(), short_ids(pa.array(ids)).length.tolist(), strict=True))
    assert len(pairs) == len(ids)                                   # "ab" and "ab\x00" apart by their length
    assert short_ids(pa.array(["abcdefghi"])) is None
    assert short_ids(pa.array(["a", None])) is None
    assert short_ids(pa.array([1, 2])) is None
    assert len(short_ids(pa.array([], type=pa.string())).word) == 0


def test_user_index_survives_pickling_and_integer_ids():
    """A pickled index (a builder sent between Dask processes) leaves its hash table behind and rebuilds it from
    the ids, giving the same codes; integer ids (their own hashes) are numbered the same way."""
    import pickle

    from heedful.ingest import UserIndex
    for pool in ([f"u{i}" for i in range(50)], list(range(1000, 1050))):
        first, second = [pool[i] for i in (3, 1, 3, 7, 1)], [pool[i] for i in (9, 7, 3, 9, 0)]
        index = UserIndex()
        np.testing.assert_array_equal(index.codes(pa.array(first)), [0, 1, 0, 2, 1])
        copy = pickle.loads(pickle.dumps(index))
        assert copy.table is None and index.table is not None
        for ix in (index, copy):
            np.testing.assert_array_equal(ix.codes(pa.array(second)), [3, 2, 0, 3, 4])
            assert ix.values().to_pylist() == [pool[i] for i in (3, 1, 7, 9, 0)]


@pytest.mark.parametrize("first_ints", [True, False])
def test_user_ids_of_another_type_in_a_later_file_take_the_first_files_type(tmp_path, first_ints):
    """Integer ids in one file and numeric strings in the next (or the reverse): the later ids are cast to the
    first file's type and numbered with it, their codes confirmed (strings) in that type, whatever the threads."""
    a = pd.DataFrame({"user_id": [1, 2, 3, 1], "model_a": ["x", "y", "x", "y"], "model_b": ["y", "x", "y", "x"],
                      "choice": ["a", "b", "a", "tie"]})
    b = pd.DataFrame({"user_id": ["1", "4", "2", "4"], "model_a": ["x", "y", "x", "y"],
                      "model_b": ["y", "x", "y", "x"], "choice": ["a", "b", "b", "a"]})
    if not first_ints:
        a, b = b.assign(user_id=[4, 1, 2, 4]).astype({"user_id": str}), a.assign(user_id=[1, 2, 3, 1])
    a.to_parquet(tmp_path / "a.parquet")
    b.to_parquet(tmp_path / "b.parquet")
    both = pd.concat([a, b.astype({"user_id": a.user_id.dtype})], ignore_index=True)
    want = vote_stats(both)
    for threads in (1, 2):
        assert_same(stream_vote_stats(tmp_path, threads=threads), want)


def test_a_shared_user_hash_found_by_the_workers_recounts_the_input_exactly(tmp_path, monkeypatch):
    """The workers confirm the main thread's user codes on the ids; when every id hashes alike, the confirmation
    fails and the input is counted again with exact matching, giving vote_stats' counts all the same."""
    import heedful.ingest as ingest

    sim = simulate(300, 8, pairs=default_pairs(3, 0.8), tie_rate=0.05, seed=21)
    path = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pandas(sim.votes, preserve_index=False), path, row_group_size=500)
    monkeypatch.setattr(ingest, "hash_ids", lambda col: np.zeros(len(col), np.uint64))
    runs = []
    count_parts = ingest._count_parts
    monkeypatch.setattr(ingest, "_count_parts", lambda *a, exact: runs.append(exact) or count_parts(*a, exact=exact))
    got, want = stream_vote_stats(path, threads=2), vote_stats(sim.votes)
    assert runs == [False, True]
    assert_same(got, want)


def test_threads_and_chunking_do_not_change_the_counts(tmp_path):
    sim = simulate(700, 12, vote_counts="lognormal", tie_rate=0.05, gold_rate=0.05, pairs=default_pairs(4, 0.8), seed=5)
    path = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pandas(sim.votes, preserve_index=False), path, row_group_size=700)  # many groups
    assert pq.ParquetFile(path).num_row_groups > 5
    one = stream_vote_stats(path, threads=1)
    np.testing.assert_array_equal(one.cell_count, vote_stats(sim.votes).cell_count)
    for threads, chunk in [(3, 97), (2, 1000), (4, 13)]:
        other = stream_vote_stats(path, threads=threads, chunk_rows=chunk, buffer_rows=500)
        assert list(other.users) == list(one.users)
        for name in ("cell_user", "cell_kind", "cell_count", "user_ties", "pair_ties", "gold_a", "gold_n"):
            np.testing.assert_array_equal(getattr(other, name), getattr(one, name), err_msg=name)


def test_pairs_first_seen_in_later_batches_are_renumbered_in_sorted_order():
    """The first batch's pairs get their final (sorted) codes at once; a pair that sorts before them but shows up
    only later makes result() renumber and re-sort the cells, which must still equal vote_stats."""
    from heedful.ingest import add_batch

    sim = simulate(300, 8, pairs=default_pairs(4, 0.8), tie_rate=0.05, seed=13)
    v = sim.votes
    first_pair = min(zip(v.model_a, v.model_b, strict=True), key=lambda p: tuple(sorted(p)))
    late = (v.model_a.isin(first_pair) & v.model_b.isin(first_pair)).to_numpy()
    v = pd.concat([v[~late], v[late]], ignore_index=True)      # the pair that sorts first comes last
    table = pa.Table.from_pandas(v, preserve_index=False)
    builder = StatsBuilder(buffer_rows=100, presort=True)
    for i, batch in enumerate(table.to_batches(max_chunksize=250)):
        add_batch(builder, batch, "v", 250 * i)
    assert list(builder.pairs) != sorted(builder.pairs)
    assert_same(builder.result(), vote_stats(v))


def test_builder_results_and_repeat_check_leave_it_counting(tmp_path):
    """result() and duplicate_ids() (which keeps the id-hash runs) leave the builder able to take more
    batches: the final counts equal one pass over everything, in either order of the calls."""
    from heedful.ingest import add_batch

    sim = simulate(300, 8, pairs=default_pairs(4, 0.8), tie_rate=0.05, seed=12)
    v = sim.votes.iloc[::-1].reset_index(drop=True)         # pairs first seen out of sorted order
    table = pa.Table.from_pandas(v, preserve_index=False)
    want = vote_stats(v)
    for presort in (True, False):
        builder = StatsBuilder(buffer_rows=50, presort=presort)
        for i, batch in enumerate(table.slice(0, 1200).to_batches(max_chunksize=300)):
            add_batch(builder, batch, "v", 300 * i)
        half = builder.result()
        np.testing.assert_array_equal(half.cell_count, vote_stats(v.iloc[:1200]).cell_count)
        assert not builder.duplicate_ids() and sum(map(len, builder.id_hashes)) == 1200
        for i, batch in enumerate(table.slice(1200).to_batches(max_chunksize=300)):
            add_batch(builder, batch, "v", 1200 + 300 * i)
        assert not builder.duplicate_ids()
        add_batch(builder, table.slice(7, 1).to_batches()[0], "v", len(v))     # a repeated vote id
        assert builder.duplicate_ids()
        full = builder.result()
        np.testing.assert_array_equal(half.cell_count, vote_stats(v.iloc[:1200]).cell_count)   # not overwritten
        for name in ("cell_user", "cell_kind", "cell_count", "user_ties", "pair_ties"):
            again = pd.concat([v, v.iloc[7:8]]).drop(columns="vote_id")       # the reference checks no ids
            got, ref = getattr(full, name), getattr(vote_stats(again), name)
            np.testing.assert_array_equal(got, ref, err_msg=name)
    assert list(full.users) == list(want.users)


def test_the_first_bad_row_is_reported_whatever_the_threads(tmp_path):
    sim = simulate(200, 10, seed=6)
    v = sim.votes.astype({"choice": object})
    v.loc[55, "choice"] = "maybe"
    v.loc[1500, "choice"] = "never"
    path = tmp_path / "bad.parquet"
    v.to_parquet(path)
    with pytest.raises(InputError, match="row 56"):
        stream_vote_stats(path, threads=4, chunk_rows=50)


def test_repeats_across_sorted_runs_found_range_by_range():
    """runs_have_repeats agrees with merging everything, whatever the ranges: repeats inside one run, across
    runs, on a cut value, none; empty runs and a single run."""
    from heedful.ingest import runs_have_repeats
    rng = np.random.default_rng(4)
    for _ in range(400):
        runs = [np.sort(rng.integers(0, int(rng.integers(2, 300)), int(rng.integers(0, 40))).astype(np.uint64))
                for _ in range(int(rng.integers(0, 6)))]
        merged = np.sort(np.concatenate(runs)) if runs else np.zeros(0, np.uint64)
        want = bool((merged[1:] == merged[:-1]).any())
        assert runs_have_repeats(runs, int(rng.integers(1, 30))) == want
    distinct = np.arange(0, 3000, dtype=np.uint64)
    runs = [distinct[i::3] for i in range(3)]
    assert not runs_have_repeats(runs, 100)
    runs[1] = np.sort(np.append(runs[1], runs[2][500]))        # one value in two runs
    assert runs_have_repeats(runs, 100)


def test_repeated_hashes_found_by_the_partitioned_check():
    from heedful.ingest import has_repeats
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=50_000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    h = np.unique(h)
    assert not has_repeats(h, threads=4, min_parallel=0)
    for i, j in [(0, 1), (17, 40_000), (len(h) - 1, 5)]:
        g = h.copy()
        g[j] = g[i]
        assert has_repeats(g, threads=4, min_parallel=0)
        assert has_repeats(g, threads=1)


def test_threaded_unique_counts_equal_numpy():
    from heedful.ingest import unique_counts
    rng = np.random.default_rng(1)
    keys = (rng.integers(0, 5_000, 200_000) << 32) | rng.integers(0, 400, 200_000)
    for threads in (1, 4):
        u, c = unique_counts(keys, threads=threads, min_parallel=0)
        u2, c2 = np.unique(keys, return_counts=True)
        np.testing.assert_array_equal(u, u2)
        np.testing.assert_array_equal(c, c2)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_merged_counts_of_sorted_runs_equal_numpy(threads):
    """Runs cut at common values and merged in threads: every value counted once, in its own range, whatever
    the runs (uneven, empty, one value repeated across a cut)."""
    from heedful.ingest import merge_counts
    rng = np.random.default_rng(2)
    for sizes in ([50_000, 3, 20_000, 0, 7_000], [1], [0, 0], [10, 10]):
        runs = [np.sort((rng.integers(0, 300, n) << 32) | rng.integers(0, 40, n)) for n in sizes]
        if sizes == [10, 10]:
            runs = [np.full(10, 7), np.full(10, 7)]                  # one value in every run and at every cut
        want = np.unique(np.concatenate(runs), return_counts=True)
        for range_values in (1, 7, 1000, 1 << 15):               # many ranges per thread, down to one value each
            got = merge_counts(list(runs), threads=threads, min_parallel=0, range_values=range_values)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)


def test_batch_keys_sorted_through_32_bits_equal_the_64_bit_sort():
    """A batch's keys user << 32 | kind come out as np.sort of them, whether they fit 32 bits packed (few users)
    or not (users up to 2^31, many kinds), and stay int64."""
    from heedful.ingest import _sorted_keys
    rng = np.random.default_rng(9)
    for n_users, n_kinds in [(10, 1), (1000, 18), (1 << 20, 180), (1 << 24, 256), (1 << 31, 18), (5, 1 << 20)]:
        for n in (0, 1, 500):
            u, k = rng.integers(0, n_users, n), rng.integers(0, n_kinds, n)
            got = _sorted_keys(u, k, n_kinds)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, np.sort((u << 32) | k))


def test_an_id_hashes_the_same_in_every_batch():
    ids = ["", "a", "ab", "abcdefgh", "abcdefghi", "é", "abcdefgh\x00", "x" * 40, "x" * 41, "u0001234"]
    col = pa.array(ids, type=pa.string())
    h = hash_ids(col)
    assert len(set(h.tolist())) == len(ids)
    for i in range(len(ids)):       # alone, at the start or end of a slice, and as large_string
        assert hash_ids(col.slice(i, 1))[0] == h[i]
        assert hash_ids(pa.array(ids[i:] + ["z" * 50], type=pa.large_string()))[0] == h[i]


def test_per_pair_counts_are_the_votes_counted_once_and_read_only():
    """pair_votes / pair_a_votes equal a groupby of the raw votes; the per-kind counts behind them are
    counted once per VoteStats and cannot be changed through the returned array."""
    votes = simulate(400, 6, pairs=default_pairs(3, 0.8), tie_rate=0.1, seed=3).votes
    stats = vote_stats(votes)
    lo = np.minimum(votes.model_a, votes.model_b)
    hi = np.maximum(votes.model_a, votes.model_b)
    picked = np.where(votes.choice == "a", votes.model_a, votes.model_b)
    frame = pd.DataFrame({"lo": lo, "hi": hi, "a": picked == lo})[votes.choice != "tie"]
    groups = frame.groupby(["lo", "hi"])
    expect = {pair: (len(g), int(g.a.sum())) for pair, g in groups}
    got = {pair: (int(n), int(na)) for pair, n, na in zip(stats.pairs, stats.pair_votes(), stats.pair_a_votes(),
                                                          strict=True)}
    assert got == expect
    assert stats.kind_votes() is stats.kind_votes()
    with pytest.raises(ValueError, match="read-only"):
        stats.kind_votes()[0] += 1


def test_per_user_and_per_kind_votes_sum_the_cell_counts_in_integers():
    """user_votes / kind_votes equal the raw votes grouped by user (ties left out) and the float-weighted sums of
    the cells, with cells that hold one vote, several, and none."""
    votes = simulate(300, 9, pairs=default_pairs(2, 0.8), tie_rate=0.1, seed=5).votes
    stats = vote_stats(votes)
    assert (stats.cell_count > 1).any() and (stats.cell_count == 1).any()
    per_user = votes[votes.choice != "tie"].groupby("user_id").size()
    np.testing.assert_array_equal(stats.user_votes(), per_user.reindex(stats.users, fill_value=0).to_numpy())
    for index, n, got in ((stats.cell_user, stats.n_users, stats.user_votes()),
                          (stats.cell_kind, stats.n_kinds, stats.kind_votes())):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.bincount(index, weights=stats.cell_count, minlength=n))
    zeros = dataclasses.replace(stats, cell_count=np.where(np.arange(len(stats.cell_count)) % 3 == 0, 0,
                                                           stats.cell_count))
    np.testing.assert_array_equal(zeros.kind_votes(), np.bincount(zeros.cell_kind, weights=zeros.cell_count,
                                                                  minlength=zeros.n_kinds))
