"""Outputs appear whole or not at all; re-runs are idempotent; the same seed gives the same bytes.

Interrupts are tested at the worst moments: a signal while the fit runs, a signal after users.parquet
is staged but before params.json is, and a real SIGINT/SIGTERM sent from outside to a running
``heedful fit`` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_validation import run_cli

from heedful.outputs import write_fit, write_json, write_table
from heedful.simulate import simulate

USERS = pd.DataFrame({"user_id": ["u1", "u2"], "eta_hat": [0.2, 0.9]})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def votes_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("votes") / "votes.parquet"
    simulate(400, 8, seed=3, tie_rate=0.05).votes.to_parquet(path, index=False)
    return path


# -- the writers -----------------------------------------------------------------------------------------
def test_failed_write_fit_leaves_nothing(tmp_path):
    out = tmp_path / "deep" / "fit"
    with pytest.raises(TypeError):
        write_fit(out, USERS, {"bad": object()})           # params.json fails after users.parquet is staged
    assert list(tmp_path.iterdir()) == []                  # no file, no temporary, no folder it created


def test_failed_write_fit_keeps_the_previous_fit(tmp_path):
    write_fit(tmp_path, USERS, {"run": 1})
    before = _files(tmp_path)
    mixed = pd.DataFrame({"user_id": ["u1", "u2"], "eta_hat": [0.5, "x"]})   # pyarrow cannot write it
    with pytest.raises(Exception, match="eta_hat|Conversion|convert"):
        write_fit(tmp_path, mixed, {"run": 2})
    with pytest.raises(TypeError):
        write_fit(tmp_path, USERS, {"run": 2, "bad": object()})
    assert _files(tmp_path) == before


def test_interrupt_while_staging_removes_the_staged_file(tmp_path, monkeypatch):
    """KeyboardInterrupt after users.parquet is staged: the temporary is removed, nothing is renamed."""
    import heedful.outputs as outputs

    real = outputs._stage

    def stage(path, write, staged):
        real(path, write, staged)
        if path.name == "users.parquet":
            raise KeyboardInterrupt

    write_fit(tmp_path, USERS, {"run": 1})
    before = _files(tmp_path)
    monkeypatch.setattr(outputs, "_stage", stage)
    with pytest.raises(KeyboardInterrupt):
        write_fit(tmp_path, USERS.assign(eta_hat=0.0), {"run": 2})
    assert _files(tmp_path) == before


def test_signal_during_the_renames_is_held_until_both_are_done(tmp_path, monkeypatch):
    """SIGINT sent between the two renames arrives after both: the new fit is complete, not mixed."""
    import heedful.outputs as outputs

    real = os.replace
    calls = []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    write_fit(tmp_path, USERS, {"run": 1})
    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_fit(tmp_path, USERS.assign(eta_hat=0.5), {"run": 2})
    assert len(calls) == 2
    assert json.loads((tmp_path / "params.json").read_text())["run"] == 2
    assert (pd.read_parquet(tmp_path / "users.parquet").eta_hat == 0.5).all()


def test_outputs_get_the_usual_file_mode(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    write_fit(tmp_path, USERS, {"run": 1})
    for name in ("users.parquet", "params.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_json_and_tables_have_no_nan(tmp_path):
    write_json(tmp_path / "p.json", {"x": float("nan"), "y": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "p.json").read_text()) == {"x": None, "y": [None, 1.0]}
    write_table(tmp_path / "t.csv", USERS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parquet_tables_keep_floats_plain_and_read_back_the_same(tmp_path):
    """Float columns (posterior summaries, nearly all distinct) are written without a dictionary; ids and counts
    keep theirs; the table reads back equal."""
    import pyarrow.parquet as pq

    frame = pd.DataFrame({"user_id": ["u1", "u2", "u1"], "n_votes": [3, 1, 3], "eta_mean": [0.25, 0.5, 0.75]})
    write_table(tmp_path / "t.parquet", frame)
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    dictionary = {meta.column(i).path_in_schema: "RLE_DICTIONARY" in meta.column(i).encodings for i in range(3)}
    assert dictionary == {"user_id": True, "n_votes": True, "eta_mean": False}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), frame, check_dtype=False)


# -- the fit command -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_fit_leaves_no_output(sig, votes_file, tmp_path, capsys, monkeypatch):
    """The signal arrives while the model is being fitted (in-process CLI)."""
    from heedful.inference import Attentiveness

    real = Attentiveness.fit

    def fit(self, votes):
        os.kill(os.getpid(), sig)
        return real(self, votes)

    monkeypatch.setattr(Attentiveness, "fit", fit)
    code, out, err = run_cli(("fit", str(votes_file), "-o", str(tmp_path / "out")), capsys, monkeypatch)
    assert code == 128 + sig
    assert err == f"heedful: interrupted ({signal.Signals(sig).name}); nothing was written for the unfinished step\n"
    assert not (tmp_path / "out").exists()


def test_signal_while_writing_leaves_the_previous_fit(votes_file, tmp_path, capsys, monkeypatch):
    """SIGTERM after users.parquet is staged and before params.json is: the previous fit stays as it was."""
    import heedful.outputs as outputs

    out = tmp_path / "out"
    assert run_cli(("fit", str(votes_file), "-o", str(out), "--method", "em"), capsys, monkeypatch)[0] == 0
    before = _files(out)
    real = outputs._stage

    def stage(path, write, staged):
        real(path, write, staged)
        if path.name == "users.parquet":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(outputs, "_stage", stage)
    code, _, err = run_cli(("fit", str(votes_file), "-o", str(out)), capsys, monkeypatch)   # marginal
    assert code == 143 and err.startswith("heedful: interrupted (SIGTERM)")
    assert _files(out) == before


def test_external_sigint_on_a_running_fit(votes_file, tmp_path):
    """A real `heedful fit` process gets SIGINT from outside once its fit has started: exit 130, no output."""
    mark = tmp_path / "fitting"
    script = ("import pathlib, sys, time\n"
              "from heedful.inference import Attentiveness\n"
              "real = Attentiveness.fit\n"
              "def fit(self, votes):\n"
              f"    pathlib.Path({str(mark)!r}).touch()\n"
              "    time.sleep(0.2)\n"
              "    return real(self, votes)\n"
              "Attentiveness.fit = fit\n"
              "from heedful.cli import main\n"
              "main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script, "fit", str(votes_file), "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("heedful: interrupted (SIGINT)") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fitting"]


# -- idempotence and determinism -------------------------------------------------------------------------
def _without_time(params: bytes) -> dict:
    """params.json without wall-clock fields (keys ending in ``_s``: elapsed_s, sampling_s, ...)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not k.endswith("_s")}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj
    return strip(json.loads(params))


@pytest.mark.parametrize("method", ["em", "marginal"])
def test_rerun_is_idempotent_and_deterministic(method, votes_file, tmp_path, capsys, monkeypatch):
    """Same input, same method: byte-identical users.parquet, params.json equal but for elapsed_s."""
    runs = []
    for out in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):      # re-run in place, then elsewhere
        assert run_cli(("fit", str(votes_file), "-o", str(out), "--method", method), capsys, monkeypatch)[0] == 0
        runs.append(_files(out))
    for r in runs:
        assert sorted(r) == ["params.json", "users.parquet"]           # no stray temporaries
        assert r["users.parquet"] == runs[0]["users.parquet"]
        assert _without_time(r["params.json"]) == _without_time(runs[0]["params.json"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["svi", "nuts"])
def test_sampling_methods_repeat_with_the_same_seed(method, tmp_path, capsys, monkeypatch):
    """Same seed on CPU: the same draws, hence identical users.parquet and params.json but for timings."""
    pytest.importorskip(f"heedful.inference.{method}")
    votes = tmp_path / "votes.parquet"
    simulate(60, 5, seed=2).votes.to_parquet(votes, index=False)
    extra = ("--draws", "20", "--warmup", "20", "--chains", "1") if method == "nuts" else ("--draws", "50")
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        args = ("fit", str(votes), "-o", str(out), "--method", method, "--seed", "7", "--device", "cpu", *extra)
        assert run_cli(args, capsys, monkeypatch)[0] == 0
        runs.append(_files(out))
    assert runs[0]["users.parquet"] == runs[1]["users.parquet"]
    assert _without_time(runs[0]["params.json"]) == _without_time(runs[1]["params.json"])


def test_check_output_folder_fails_early_and_creates_nothing(tmp_path):
    from heedful.errors import InputError
    from heedful.outputs import check_output_folder

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file; -o/--output names the output folder"):
        check_output_folder(tmp_path / "file")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file" / "out")
    assert check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
