"""The GPU figures of docs/performance.md, in one run on a machine with a CUDA card.

1. writes the data with ``make_votes.py`` in parallel (100M votes: 10M users x 10 votes, 10 pairs, 16
   Parquet files; 1M votes: 100k users), unless the folder already holds them;
2. agreement: ``heedful fit`` at 1M votes with ``--device cpu`` and ``--device cuda``; the largest
   differences of mu and of every per-user column;
3. the floor at 100M votes (pyarrow reads the folder and dictionary-encodes the id columns) and
   ``heedful --help`` (start-up);
4. ``heedful fit FOLDER --device cuda`` at 100M votes, ``marginal`` then ``em``, then ``marginal`` with
   ``--option warm=false`` (the climb without the user-sample warm start; ``--no-cold`` skips it): wall
   time, the ratio (wall - start-up) / floor, peak RSS, and the phases the fit records in params.json
   (``timings_s``).

Prints one JSON line per figure and, with ``--out``, writes them to a file:

    python benchmarks/gpu_check.py --data /tmp/hf-gpu --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fit_speed import FLOOR, heedful_cmd, load, run  # noqa: E402

# users (10 votes each), files; "dry": a quick rehearsal with --device cpu
SIZES = {"1m": (100_000, 1), "100m": (10_000_000, 16), "dry": (2_000, 4)}


def data_dir(root: Path, size: str) -> Path:
    users, files = SIZES[size]
    folder = root / f"votes-{size}"
    if not folder.exists() or not any(folder.glob("*.parquet")):
        t = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "make_votes.py"), "--users", str(users), "--votes-per-user", "10",
                        "--pairs", "10", "--files", str(files), "--jobs", str(min(files, os.cpu_count() or 1)),
                        "-o", str(folder / "votes.parquet")], check=True, stdout=subprocess.DEVNULL)
        emit({"name": f"write data {size}", "wall_s": time.perf_counter() - t})
    return folder


OUT: Path | None = None


def emit(row: dict, rows: list[dict] | None = None) -> None:
    """Print a figure as a JSON line and rewrite --out with every figure so far (a run cut short keeps them)."""
    row = {"load": load(), **row}
    print(json.dumps(row), flush=True)
    if rows is not None:
        rows.append(row)
        if OUT is not None:
            OUT.write_text(json.dumps(rows, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/hf-gpu"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--methods", nargs="+", default=["marginal", "em"])
    p.add_argument("--sizes", nargs="+", default=["100m"], choices=list(SIZES))
    p.add_argument("--device", default="cuda", help="the device compared with cpu (cpu here: a dry run)")
    p.add_argument("--no-cold", action="store_true",
                   help="skip the marginal fit with --option warm=false (the warm start's effect on this device)")
    args = p.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    global OUT
    OUT = args.out
    import torch

    heedful = heedful_cmd()
    rows: list[dict] = []
    emit({"name": "machine", "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "cpus": os.cpu_count(), "torch": torch.__version__}, rows)
    # agreement of the CPU and GPU paths on the same votes
    small = data_dir(args.data, "1m")
    fits = {}
    for dev in ("cpu", args.device):
        out = args.data / f"fit-1m-{dev}"
        res = run([*heedful, "fit", str(small), "-o", str(out), "--device", dev])
        fits[dev] = (pd.read_parquet(out / "users.parquet"), json.loads((out / "params.json").read_text()))
        emit({"name": f"fit 1m --device {dev}", **res, "timings_s": fits[dev][1].get("timings_s")}, rows)
    (uc, pc_), (ug, pg) = fits["cpu"], fits[args.device]
    diff = {c: float((uc[c] - ug[c]).abs().max()) for c in ("eta_hat", "eta_mean", "eta_lo", "eta_hi", "eta_sd")}
    diff["mu"] = max(abs(a["mu"] - b["mu"]) for a, b in zip(pc_["mu"], pg["mu"], strict=True))
    diff["log_likelihood"] = abs(pc_["log_likelihood"] - pg["log_likelihood"])
    emit({"name": f"cpu vs {args.device}, 1m votes: largest differences", **diff}, rows)
    startup = min(run([*heedful, "--help"])["wall_s"] for _ in range(3))
    emit({"name": "startup (heedful --help)", "wall_s": startup}, rows)
    for size in args.sizes:
        folder = data_dir(args.data, size)
        floor = run([sys.executable, "-c", FLOOR, str(folder), "0"])
        emit({"name": f"floor: read + encode ids {size}", **floor}, rows)
        runs = [(m, []) for m in args.methods]
        if "marginal" in args.methods and not args.no_cold:
            runs.append(("marginal", ["--option", "warm=false"]))
        for method, extra in runs:
            out = args.data / f"fit-{size}-{method}{'-cold' if extra else ''}"
            res = run([*heedful, "fit", str(folder), "-o", str(out), "--method", method, "--device", args.device,
                       *extra])
            params = json.loads((out / "params.json").read_text())
            emit({"name": f"heedful fit --method {method} --device {args.device} {' '.join(extra)}".rstrip(),
                  "size": size, **res,
                  "ratio": (res["wall_s"] - startup) / floor["inner_s"], "floor_s": floor["inner_s"],
                  "rows": params["n_rows"], "users": params["n_users"], "iterations": params["iterations"],
                  "converged": params["converged"], "timings_s": params.get("timings_s"),
                  "mu": [round(m["mu"], 4) for m in params["mu"]],
                  "mu_90": [[round(m.get("mu_lo") or float("nan"), 4), round(m.get("mu_hi") or float("nan"), 4)]
                            for m in params["mu"]]}, rows)


if __name__ == "__main__":
    main()
