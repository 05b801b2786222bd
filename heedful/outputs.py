"""Writing results atomically: a temporary file in the same folder, then one rename."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def write_json(path: str | Path, doc: dict) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_clean(doc), f, indent=2, allow_nan=False)
            f.write("\n")
    _atomic(Path(path), w)


def write_table(path: str | Path, frame: pd.DataFrame) -> None:
    """Parquet, CSV or JSON lines by the file's suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        _atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
    elif suffix == ".csv":
        _atomic(path, lambda tmp: frame.to_csv(tmp, index=False))
    elif suffix in (".jsonl", ".ndjson"):
        _atomic(path, lambda tmp: frame.to_json(tmp, orient="records", lines=True, force_ascii=False))
    else:
        from heedful.errors import InputError
        raise InputError(f"{path}: choose .parquet, .csv or .jsonl for the output")


def write_fit(outdir: str | Path, users: pd.DataFrame, params: dict) -> None:
    """users.parquet and params.json; params.json is written last, so its presence marks a finished fit."""
    outdir = Path(outdir)
    write_table(outdir / "users.parquet", users)
    write_json(outdir / "params.json", params)


def write_inference_data(path: str | Path, idata) -> None:
    """An arviz.InferenceData as NetCDF, atomically."""
    _atomic(Path(path), lambda tmp: idata.to_netcdf(tmp))
