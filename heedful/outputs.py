"""Writing results atomically: a temporary file in the same folder, then one rename.

``write_fit`` stages every file of a fit first and renames them only when all are written, with
SIGINT/SIGTERM deferred during the renames, so an interrupted or failed fit leaves the previous
outputs (or nothing) behind, never a mix or half a file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from heedful.errors import InputError

Writer = Callable[[str], None]
_HELD = {signal.SIGINT, signal.SIGTERM}
_UMASK: dict[str, int] = {}


def _folder(path: Path) -> None:
    """Create the parent folder, with a clear error when a file stands where the folder should be."""
    for p in [path.parent, *path.parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{path}: {p} is a file, not a folder")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")


def _stage(path: Path, write: Writer, staged: dict[Path, str]) -> None:
    """Write through ``write`` into a hidden temporary file beside ``path``, registered in ``staged``
    before anything is written, so that whoever cleans up after an interrupt knows it."""
    _folder(path)
    with _signals_held():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        staged[path] = tmp
    write(tmp)
    os.chmod(tmp, _file_mode())             # mkstemp makes 0600; outputs get the usual umask-based mode
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def _file_mode() -> int:
    """0666 less the process umask, as open() would create the file."""
    if "mode" not in _UMASK:
        mask = os.umask(0o022)
        os.umask(mask)
        _UMASK["mode"] = 0o666 & ~mask
    return _UMASK["mode"]


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM (re-raised on exit) so a rename sequence is not cut in the middle.

    Python runs signal handlers in the main thread whichever thread the signal hit, so swapping the
    handlers there is enough; from other threads this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {sig: signal.getsignal(sig) for sig in _HELD}
    old = {sig: h for sig, h in old.items() if h is not None}
    for sig in old:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in pending:
            signal.raise_signal(sig)


def write_atomic(files: dict[Path, Writer]) -> None:
    """Write several files so that they appear together: stage all, then rename all.

    On any failure or interrupt the staged files are removed, and so are folders this call created.
    """
    staged: dict[Path, str] = {}
    created = [d for d in {Path(p).parent for p in files} for d in (d, *d.parents) if not d.exists()]
    try:
        for path, write in files.items():
            _stage(Path(path), write, staged)
        with _signals_held():
            for path, tmp in staged.items():
                os.replace(tmp, path)
            staged.clear()
            created.clear()
    finally:
        for tmp in staged.values():
            Path(tmp).unlink(missing_ok=True)
        if created:
            for d in sorted(set(created), key=lambda d: len(d.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()       # only when empty


def _atomic(path: Path, write: Writer) -> None:
    write_atomic({path: write})


def _clean(obj):
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):
        return _clean(obj.item())
    return obj


def _json_writer(doc: dict) -> Writer:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_clean(doc), f, indent=2, allow_nan=False)
            f.write("\n")
    return w


def _table_writer(path: Path, frame: pd.DataFrame) -> Writer:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        # floats (posterior summaries: nearly all distinct) plain, not dictionary-encoded first and then given
        # up on (users.parquet of 1M users 229 -> 152 ms, and a little smaller), and not compressed: snappy saved
        # nothing on them (46,974,013 bytes with, 46,971,005 without) and took 15 ms of 150
        floats = {str(c) for c in frame.columns if pd.api.types.is_float_dtype(frame[c].dtype)}
        few = [str(c) for c in frame.columns if str(c) not in floats]
        codec = {str(c): "none" if str(c) in floats else "snappy" for c in frame.columns}
        return lambda tmp: frame.to_parquet(tmp, index=False, use_dictionary=few, compression=codec)
    if suffix == ".csv":
        return lambda tmp: frame.to_csv(tmp, index=False)
    if suffix in (".jsonl", ".ndjson"):
        return lambda tmp: frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    raise InputError(f"{path}: choose .parquet, .csv or .jsonl for the output")


def write_json(path: str | Path, doc: dict) -> None:
    """A JSON document (non-finite floats as null), atomically."""
    _atomic(Path(path), _json_writer(doc))


def write_table(path: str | Path, frame: pd.DataFrame) -> None:
    """Parquet, CSV or JSON lines by the file's suffix, atomically."""
    path = Path(path)
    _atomic(path, _table_writer(path, frame))


def check_output_folder(outdir: str | Path) -> Path:
    """Fail early (before a long fit) when ``outdir`` cannot be an output folder; creates nothing."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: is a file; -o/--output names the output folder")
    for p in outdir.parents:
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{outdir}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise InputError(f"{outdir}: cannot create it, {p} is not writable")
            break
    return outdir


def write_fit(outdir: str | Path, users: pd.DataFrame, params: dict, *, inference_data=None) -> None:
    """users.parquet and params.json (and posterior.nc when ``inference_data`` is given), all or nothing.

    Every file is staged first; params.json is renamed last, so its presence marks a finished fit.
    """
    outdir = check_output_folder(outdir)
    files: dict[Path, Writer] = {}
    if inference_data is not None:
        files[outdir / "posterior.nc"] = lambda tmp: inference_data.to_netcdf(tmp)
    files[outdir / "users.parquet"] = _table_writer(outdir / "users.parquet", users)
    files[outdir / "params.json"] = _json_writer(params)
    write_atomic(files)


def write_inference_data(path: str | Path, idata) -> None:
    """An arviz.InferenceData as NetCDF, atomically."""
    _atomic(Path(path), lambda tmp: idata.to_netcdf(tmp))


def read_fit(outdir: str | Path, columns: tuple[str, ...] | list[str]) -> tuple[pd.DataFrame, dict]:
    """OUTDIR/users.parquet (checked for ``columns``) and OUTDIR/params.json of a ``heedful fit``."""
    outdir = Path(outdir)
    up, pp = outdir / "users.parquet", outdir / "params.json"
    for p in (up, pp):
        if not p.is_file():
            raise InputError(f"{p}: no such file; run `heedful fit VOTES -o {outdir}` first")
    users = pd.read_parquet(up)
    missing = [c for c in columns if c not in users.columns]
    if missing:
        raise InputError(f"{up}: missing column(s) {', '.join(missing)}")
    try:
        params = json.loads(pp.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{pp}: not valid JSON ({e})") from None
    if not isinstance(params, dict) or not {"mu", "eta_prior"} <= set(params):
        raise InputError(f"{pp}: not a heedful params.json (needs 'mu' and 'eta_prior')")
    return users, params
