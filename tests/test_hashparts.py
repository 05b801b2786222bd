"""The grouped hash tables that number user ids: the same codes as one table, whatever the grouping."""

import numpy as np
import pandas as pd
import pytest

from heedful.hashparts import PARTS, PartTables, hash_parts


def _first_appearance(batches: list[np.ndarray]) -> list[np.ndarray]:
    """Codes by first appearance over the batches in order (pandas.factorize on all of them)."""
    codes, _ = pd.factorize(np.concatenate(batches))
    return np.split(codes.astype(np.int64), np.cumsum([len(b) for b in batches])[:-1])


def _batches(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    ids = rng.integers(0, 2**63, 5000, dtype=np.uint64) if kind == "hashes" else np.arange(5000, dtype=np.uint64)
    sizes = [0, 1, 3000, 7000, 2500, 4000]
    return [ids[rng.integers(0, len(ids) if i > 2 else 1200, n)] for i, n in enumerate(sizes)]


@pytest.mark.parametrize("kind", ["hashes", "small integers"])
def test_part_tables_number_ids_by_first_appearance_across_batches(kind):
    """Every row's code and the rows where new ids first appear equal one table's (pandas.factorize) over
    batches of 0 to 7000 rows with repeats, for well-mixed hashes and for integer ids 0..4999 (their own
    hashes), which must spread over the groups too."""
    rng = np.random.default_rng(7)
    batches = _batches(kind, rng)
    tables, n = PartTables(), 0
    for b, want in zip(batches, _first_appearance(batches), strict=True):
        found, first = tables.codes(hash_parts(b), n)
        np.testing.assert_array_equal(found.in_rows(), want)
        new = np.flatnonzero(want >= n)
        np.testing.assert_array_equal(first, new[np.unique(want[new], return_index=True)[1]])
        n += len(first)
    assert n == len(np.unique(np.concatenate(batches)))
    sizes = np.diff(hash_parts(np.arange(5000, dtype=np.uint64)).bounds)
    assert sizes.min() > 5000 / PARTS / 2


def test_hash_parts_keep_input_order_within_each_group():
    h = np.random.default_rng(1).integers(0, 2**63, 3000, dtype=np.uint64)
    parts = hash_parts(h)
    np.testing.assert_array_equal(parts.hashes, h[parts.order])
    assert sorted(parts.order.tolist()) == list(range(3000))
    for g in range(PARTS):
        rows = parts.order[parts.bounds[g]:parts.bounds[g + 1]]
        assert np.all(np.diff(rows) > 0)


def test_codes_found_earlier_stay_valid_as_the_tables_grow_and_a_rebuilt_table_agrees():
    """A batch's grouped codes put in row order after many more ids were added (their code arrays grown and
    copied) read the same codes; tables rebuilt from the known hashes in code order continue identically."""
    rng = np.random.default_rng(11)
    batches = _batches("hashes", rng)
    tables, n, early = PartTables(), 0, []
    for b in batches:
        found, first = tables.codes(hash_parts(b), n)
        early.append((found, found.in_rows().copy()))
        n += len(first)
    for found, rows in early:
        np.testing.assert_array_equal(found.in_rows(), rows)
    known = pd.unique(np.concatenate(batches))
    rebuilt, more = PartTables(known), rng.integers(0, 2**63, 4000, dtype=np.uint64)
    more[::2] = known[rng.integers(0, len(known), 2000)]
    a, fa = tables.codes(hash_parts(more), n)
    b, fb = rebuilt.codes(hash_parts(more), n)
    np.testing.assert_array_equal(a.in_rows(), b.in_rows())
    np.testing.assert_array_equal(fa, fb)
    assert b.in_rows()[::2].max() < n and len(fb) > 0
