"""Dask: statistics counted on a real LocalCluster equal the single-process streaming counts and fit."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("dask.distributed")

from test_ingest import assert_same, messy_votes  # noqa: E402

from heedful.distributed import dask_vote_stats, frame_vote_stats, partitions  # noqa: E402
from heedful.errors import InputError  # noqa: E402
from heedful.inference import Attentiveness  # noqa: E402
from heedful.ingest import expand_sources, stream_vote_stats  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(processes=False, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture
def files(tmp_path):
    v = messy_votes(4000, seed=1)
    for i, idx in enumerate(np.array_split(np.arange(len(v)), 3)):
        part = v.iloc[idx]
        if i == 2:
            part.to_csv(tmp_path / f"part-{i}.csv", index=False)
        else:
            part.to_parquet(tmp_path / f"part-{i}.parquet", row_group_size=300)
    return tmp_path


def test_dask_counts_equal_streaming_counts(client, files):
    parts = partitions(expand_sources(files), rows_per_part=500)
    assert len(parts) > 3                                   # row-group partitions, not one per file
    assert_same(dask_vote_stats(files, client=client, rows_per_part=500), stream_vote_stats(files))


def test_dask_fit_equals_single_process_fit(client, files):
    a = Attentiveness().fit(dask_vote_stats(str(files / "part-*"), client=client, rows_per_part=700))
    b = Attentiveness().fit(stream_vote_stats(str(files / "part-*")))
    pd.testing.assert_frame_equal(a.users_, b.users_, rtol=0, atol=0)
    assert a.params()["mu"] == b.params()["mu"]


def test_dask_errors_name_the_file_and_row(client, tmp_path):
    v = messy_votes(2000)
    v.loc[1500, "choice"] = "maybe"
    v.to_parquet(tmp_path / "bad.parquet", row_group_size=200)
    with pytest.raises(InputError) as want:
        stream_vote_stats(tmp_path / "bad.parquet")
    with pytest.raises(InputError) as got:
        dask_vote_stats(tmp_path / "bad.parquet", client=client, rows_per_part=400)
    assert str(got.value).split(" (")[0] == str(want.value).split(" (")[0]


def test_dask_dataframe_input(client, tmp_path):
    import dask.dataframe as dd

    v = messy_votes(3000, seed=2)
    frame = dd.from_pandas(v, npartitions=4)
    assert_same(frame_vote_stats(frame, client=client), stream_vote_stats(_write(v, tmp_path)))
    v.loc[2222, "user_id"] = None
    with pytest.raises(InputError, match="user_id.: row 2223 is "):
        frame_vote_stats(dd.from_pandas(v, npartitions=4), client=client)


def _write(v, tmp_path):
    v.to_parquet(tmp_path / "v.parquet")
    return tmp_path / "v.parquet"
