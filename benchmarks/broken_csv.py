"""A large vote CSV with one broken row in the middle: clear error, no partial output, bounded memory.

Writes ROWS valid votes (user_id, model_a, model_b, choice, vote_id) with one row carrying an extra field
at the middle, then, each under ``/usr/bin/time -v``, runs ``heedful fit`` on it (``--via cli``) and/or
``heedful.votes.read_votes`` (``--via read_votes``), and prints the exit code, the error line, peak RSS
and wall time, and whether anything was left in the output folder.

    python benchmarks/broken_csv.py [--rows 10000000] [--workdir /tmp/heedful-bench] [--valid] [--via cli]

``--valid`` leaves the broken row out (to compare the cost of reading a good file of the same size).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_csv(path: Path, rows: int, broken_at: int | None, chunk: int = 1_000_000, fault: str = "field") -> None:
    """ROWS vote rows; data row ``broken_at`` (counted from 1, header excluded) gets a sixth field
    (``fault="field"``) or the choice ``sideways`` (``fault="choice"``)."""
    rng = np.random.default_rng(0)
    models = np.array(["gpt-4", "llama-13b", "claude-2", "mistral-7b"])
    with open(path, "w", encoding="utf-8") as f:
        f.write("user_id,model_a,model_b,choice,vote_id\n")
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ia = rng.integers(0, 4, n)
            ib = (ia + rng.integers(1, 4, n)) % 4
            user = np.char.add("u", rng.integers(0, rows // 20 + 1, n).astype(str))
            choice = rng.choice(np.array(["a", "b", "tie"]), n, p=[0.5, 0.4, 0.1])
            vid = np.char.add("v", np.arange(start + 1, start + n + 1).astype(str))
            lines = [",".join(t) for t in zip(user, models[ia], models[ib], choice, vid, strict=True)]
            if broken_at is not None and start < broken_at <= start + n:
                i = broken_at - start - 1
                if fault == "field":
                    lines[i] += ",stray"
                else:
                    parts = lines[i].split(",")
                    lines[i] = ",".join([*parts[:3], "sideways", parts[4]])
            f.write("\n".join(lines))
            f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/heedful-bench"))
    ap.add_argument("--valid", action="store_true", help="no broken row")
    ap.add_argument("--fault", choices=["field", "choice"], default="field",
                    help="an extra field (a parse error) or a bad choice value (a validation error)")
    ap.add_argument("--keep", action="store_true", help="keep the CSV for another run")
    ap.add_argument("--via", choices=["cli", "read_votes"], action="append",
                    help="what to run (repeatable; default both)")
    args = ap.parse_args()
    args.via = args.via or ["cli", "read_votes"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    broken_at = None if args.valid else args.rows // 2
    kind = "valid" if args.valid else ("broken" if args.fault == "field" else "badchoice")
    csv = args.workdir / f"votes-{args.rows}-{kind}.csv"
    if not csv.exists():
        t0 = time.perf_counter()
        write_csv(csv, args.rows, broken_at, fault=args.fault)
        print(f"wrote {csv} ({csv.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    for via in args.via:
        measure(via, csv, args.workdir, args.rows, broken_at)
    if not args.keep:
        csv.unlink()


def measure(via: str, csv: Path, workdir: Path, rows: int, broken_at: int | None) -> None:
    out = workdir / "fit"
    shutil.rmtree(out, ignore_errors=True)
    code = ("from heedful.cli import main; main()" if via == "cli" else
            "import sys\nfrom heedful.errors import InputError\nfrom heedful.votes import read_votes\n"
            "try:\n    v = read_votes(sys.argv[1]); print(f'read {len(v):,} rows')\n"
            "except InputError as e:\n    print(f'heedful: error: {e}', file=sys.stderr); sys.exit(2)\n")
    args = ["fit", str(csv), "-o", str(out)] if via == "cli" else [str(csv)]
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, *args], capture_output=True, text=True,
                       cwd=workdir)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("heedful")]
    left = sorted(str(q.relative_to(workdir)) for q in out.rglob("*")) if out.exists() else []
    print(f"--- via {via}: rows {rows:,}; broken row: {broken_at}")
    print(f"exit code: {p.returncode}")
    print(f"message: {lines[0] if lines else p.stdout.strip() or '(none)'}")
    print(f"traceback printed: {'Traceback' in p.stderr}")
    print(f"peak RSS: {int(rss.group(1)) / 2**10:,.0f} MiB" if rss else "peak RSS: ?")
    print(f"wall time: {wall:.1f} s")
    print(f"left in the output folder: {left or 'nothing'}")


if __name__ == "__main__":
    main()
