"""Figures for docs/performance.md: fit (em, marginal) at 1M and 10M votes beside the read-and-encode floor.

Every figure is one fresh process, timed from outside (wall; peak RSS and CPU seconds from ``/usr/bin/time`` when it
exists, else ``resource.getrusage(RUSAGE_CHILDREN)`` of a one-shot helper):

- ``startup``: ``heedful --help`` (interpreter + imports), subtracted from every CLI fit;
- ``floor``: read the Parquet file's vote columns with pyarrow and dictionary-encode the id columns
  (user_id, model_a, model_b; ``floor+vote_id`` also reads and encodes vote_id), timed inside the
  process, best of three;
- ``ingest``: :func:`heedful.ingest.stream_vote_stats` alone, timed inside the process;
- ``fit em`` / ``fit marginal``: ``heedful fit FILE -o OUT --method M`` end to end (read, count, fit,
  posterior summaries, write); ratio = (wall - startup) / floor (and / floor+vote_id);
- ``svi`` (1M users, 10M votes) and ``nuts`` (5k users) through ``Attentiveness(method=...)`` when those
  modules exist (their defaults; each capped at ``--extra-timeout`` seconds);
- ``peer``: crowd-kit's NoisyBT on 100k votes (``--crowdkit-python`` names a Python with crowd-kit);
- ``--rounds N``: then N rounds, each one floor run and one fit per method back to back, every ratio against its
  own round's floor: on a machine whose speed drifts by tens of percent within minutes, a ratio of neighbours
  (their median over the rounds) is steadier than one against the best of three floors taken earlier.

    python benchmarks/fit_speed.py --sizes 1m 10m --data /tmp/heedful-bench --json figures.json
    python benchmarks/fit_speed.py --sizes 100m --device cuda --extra    # the GPU target (<= 10 s)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {"5k": (5_000, 10), "100k": (10_000, 10), "1m": (100_000, 10), "10m": (1_000_000, 10),
         "100m": (10_000_000, 10)}
TIME = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)

FLOOR = r"""
import heedful, json, pathlib, sys, time
import pyarrow.compute as pc, pyarrow.parquet as pq
t = time.perf_counter()
ids = ["user_id", "model_a", "model_b"] + (["vote_id"] if sys.argv[2] == "1" else [])
src = pathlib.Path(sys.argv[1])   # a file, or a folder of Parquet files (read as one dataset)
names = pq.ParquetFile(src if src.is_file() else sorted(src.glob("*.parquet"))[0]).schema_arrow.names
table = pq.read_table(sys.argv[1], columns=[c for c in ("vote_id", "user_id", "model_a", "model_b", "choice",
                                                        "shown_first", "gold") if c in names])
enc = [pc.dictionary_encode(table[c]) for c in ids if c in names]
print(json.dumps({"inner_s": time.perf_counter() - t, "rows": table.num_rows}))
"""

INGEST = r"""
import heedful, json, sys, time
from heedful.ingest import stream_vote_stats
t = time.perf_counter()
s = stream_vote_stats(sys.argv[1])
print(json.dumps({"inner_s": time.perf_counter() - t, "rows": s.n_rows, "users": s.n_users, "cells": len(s.cell_user)}))
"""

METHOD = r"""
import heedful, json, sys, time
from heedful.ingest import stream_vote_stats
from heedful.inference import Attentiveness
t = time.perf_counter()
s = stream_vote_stats(sys.argv[1])
m = Attentiveness(method=sys.argv[2], options=json.loads(sys.argv[3])).fit(s)
print(json.dumps({"inner_s": time.perf_counter() - t, "rows": s.n_rows, "users": s.n_users, "iterations": m.n_iter_}))
"""

NOISYBT = r"""
import json, sys, time
import pandas as pd
import pyarrow.parquet as pq
from crowdkit.aggregation import NoisyBradleyTerry
v = pq.read_table(sys.argv[1], columns=["user_id", "model_a", "model_b", "choice"])
v = v.slice(0, int(sys.argv[2])).to_pandas()
v = v[v.choice != "tie"]
data = pd.DataFrame({"worker": v.user_id, "left": v.model_a, "right": v.model_b,
                     "label": v.model_a.where(v.choice == "a", v.model_b)})
t = time.perf_counter()
NoisyBradleyTerry(random_state=0).fit(data)
print(json.dumps({"inner_s": time.perf_counter() - t, "rows": len(data)}))
"""


def run(cmd: list[str], timeout: float | None = None) -> dict:
    """Wall time, peak RSS (MiB), CPU seconds (user + system, all threads), the system part of them (mostly
    page faults: first touches of memory) and the JSON line the command printed last (if any)."""
    if TIME:
        full = [TIME, "-f", "@@rss %M %U %S", *cmd]
    else:
        full = [sys.executable, "-c", "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
                "print('@@rss', u.ru_maxrss, u.ru_utime, u.ru_stime, file=sys.stderr); "
                "sys.exit(r.returncode)", *cmd]
    t = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)         # the measured process, not only /usr/bin/time
        proc.communicate()
        raise
    p = subprocess.CompletedProcess(full, proc.returncode, stdout, stderr)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    usage = next((line.split()[1:] for line in p.stderr.splitlines() if line.startswith("@@rss")), None)
    rss = int(usage[0]) / 1024 if usage else float("nan")
    cpu = sys_s = float("nan")
    if usage and len(usage) == 3:
        cpu, sys_s = float(usage[1]) + float(usage[2]), float(usage[2])
    out = next((json.loads(line) for line in reversed(p.stdout.splitlines()) if line.startswith("{")), {})
    return {"wall_s": wall, "rss_mib": rss, "cpu_s": cpu, "sys_s": sys_s, **out}


def heedful_cmd() -> list[str]:
    """The ``heedful`` script beside this Python, or ``python -m heedful`` where it is not installed."""
    script = shutil.which("heedful") or str(Path(sys.executable).with_name("heedful"))
    return [script] if Path(script).exists() else [sys.executable, "-m", "heedful"]


def data_file(root: Path, size: str) -> Path:
    users, per = SIZES[size]
    path = root / f"votes-{size}.parquet"
    if not path.exists():
        subprocess.run([sys.executable, str(HERE / "make_votes.py"), "--users", str(users), "--votes-per-user",
                        str(per), "--pairs", "10", "-o", str(path)], check=True)
    return path


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=["1m", "10m"], choices=list(SIZES))
    p.add_argument("--methods", nargs="+", default=["em", "marginal"])
    p.add_argument("--data", type=Path, default=Path("/tmp/heedful-bench"))
    p.add_argument("--crowdkit-python", default=None, help="a Python with crowd-kit installed (skipped if none)")
    p.add_argument("--peer-votes", type=int, default=100_000)
    p.add_argument("--extra", nargs="*", default=[], help="also these methods: svi (at 1M users), nuts (5k users)")
    p.add_argument("--device", default="auto", help="passed to heedful fit (cuda: the GPU path; 100m for its target)")
    p.add_argument("--extra-timeout", type=float, default=1200.0, help="seconds allowed to svi / nuts")
    p.add_argument("--extra-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for svi / nuts, e.g. draws=250 (as --option of heedful fit; repeatable)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=0, help="then this many rounds of (floor, each fit) back to back")
    args = p.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    heedful = heedful_cmd()
    rows: list[dict] = []

    def record(name: str, size: str, res: dict, floor: float | None = None, startup: float = 0.0) -> None:
        res = {"name": name, "size": size, "load": load(), **res}
        if floor:
            res["floor_s"] = floor
            res["ratio"] = (res["wall_s"] - startup) / floor
        if res.get("rows") and "inner_s" in res:
            res["votes_per_s"] = res["rows"] / res["inner_s"]
        elif res.get("rows"):
            res["votes_per_s"] = res["rows"] / max(res["wall_s"] - startup, 1e-9)
        rows.append(res)
        print(json.dumps(res), flush=True)

    startup = min(run([*heedful, "--help"])["wall_s"] for _ in range(3))
    record("startup (heedful --help)", "-", {"wall_s": startup})
    for size in args.sizes:
        path = data_file(args.data, size)
        # the floors: best of three (the first read of a file can pay for the page cache)
        floor = min((run([sys.executable, "-c", FLOOR, str(path), "0"]) for _ in range(3)), key=lambda r: r["inner_s"])
        record("floor: read + encode ids", size, floor)
        with_ids = min((run([sys.executable, "-c", FLOOR, str(path), "1"]) for _ in range(3)),
                       key=lambda r: r["inner_s"])
        record("floor + vote_id", size, with_ids)
        ingest = run([sys.executable, "-c", INGEST, str(path)])
        record("ingest (stream_vote_stats)", size, ingest, floor["inner_s"])
        for method in args.methods:
            res = run(_fit_cmd(heedful, args, path, size, method))
            params = json.loads((args.data / f"fit-{size}-{method}" / "params.json").read_text())
            res.update(rows=params["n_rows"], iterations=params["iterations"], converged=params["converged"],
                       timings_s=params.get("timings_s"))
            res["ratio_with_vote_id"] = (res["wall_s"] - startup) / with_ids["inner_s"]
            record(f"heedful fit --method {method}", size, res, floor["inner_s"], startup)
    paired = _rounds(args, heedful, startup) if args.rounds else []
    import importlib.util
    for method, size in (("svi", "10m"), ("nuts", "5k")):     # SVI at 1M users, NUTS at 5k users
        if method in args.extra and importlib.util.find_spec(f"heedful.inference.{method}") is not None:
            try:
                opts = dict(kv.split("=", 1) for kv in args.extra_option)
                label = f"Attentiveness(method={method!r}" + "".join(f", {k}={v}" for k, v in opts.items()) + ")"
                record(label, size, run([sys.executable, "-c", METHOD, str(data_file(args.data, size)), method,
                                         json.dumps(opts)], timeout=args.extra_timeout))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"# {method}: {e}", file=sys.stderr)
    if args.crowdkit_python:
        path = data_file(args.data, "1m")
        record("peer: crowd-kit NoisyBradleyTerry (defaults)", f"{args.peer_votes // 1000}k",
               run([args.crowdkit_python, "-c", NOISYBT, str(path), str(args.peer_votes)]))
    print("\n| what | votes | wall s | CPU s (cores busy) | of which system s | peak RSS MiB | votes/s | floor s "
          "| ratio | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fl, ra, rss, cpu = r.get("floor_s"), r.get("ratio"), r.get("rss_mib", float("nan")), r.get("cpu_s")
        busy = "" if cpu is None else f"{cpu:.1f} ({cpu / r['wall_s']:.1f})"
        system = "" if r.get("sys_s") is None else f"{r['sys_s']:.1f}"
        print(f"| {r['name']} | {r['size']} | {r['wall_s']:.2f}"
              f"{' (inner ' + format(r['inner_s'], '.2f') + ')' if 'inner_s' in r else ''} | {busy} | {system} | "
              f"{rss:.0f} | "
              f"{r.get('votes_per_s', float('nan')):,.0f} | {'' if fl is None else format(fl, '.2f')} | "
              f"{'' if ra is None else format(ra, '.1f')} | {r['load']} |")
    phased = [r for r in rows if r.get("timings_s")]
    if phased:
        names = list(dict.fromkeys(k for r in phased for k in r["timings_s"]))
        print("\n| fit | votes | " + " | ".join(names) + " | rest (imports, writing) |")
        print("|---|---|" + "---|" * (len(names) + 1))
        for r in phased:
            t = r["timings_s"]
            rest = r["wall_s"] - startup - sum(t.values())
            print(f"| {r['name']} | {r['size']} | " + " | ".join(f"{t.get(k, 0):.2f}" for k in names)
                  + f" | {rest:.2f} |")
    if paired:
        print("\n| round | votes | floor inner s | fit | wall s | ratio to this round's floor |")
        print("|---|---|---|---|---|---|")
        for r in paired:
            print(f"| {r['round']} | {r['size']} | {r['floor_s']:.2f} | {r['method']} | {r['wall_s']:.2f} | "
                  f"{r['ratio']:.2f} |")
        for size in args.sizes:
            for method in args.methods:
                ratios = sorted(r["ratio"] for r in paired if r["size"] == size and r["method"] == method)
                print(f"# {method} at {size}: ratios {', '.join(f'{x:.2f}' for x in ratios)}; "
                      f"median {statistics.median(ratios):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows, "rounds": paired}, indent=2))


def _fit_cmd(heedful: list[str], args: argparse.Namespace, path: Path, size: str, method: str) -> list[str]:
    """``heedful fit`` of ``path`` into ``--data``/fit-SIZE-METHOD (its params.json is read back)."""
    return [*heedful, "fit", str(path), "-o", str(args.data / f"fit-{size}-{method}"), "--method", method,
            "--device", args.device]


def _rounds(args: argparse.Namespace, heedful: list[str], startup: float) -> list[dict]:
    """``args.rounds`` rounds of one floor run and one fit per method, each fit's ratio against its own round."""
    out = []
    for k in range(1, args.rounds + 1):
        for size in args.sizes:
            path = data_file(args.data, size)
            floor = run([sys.executable, "-c", FLOOR, str(path), "0"])["inner_s"]
            for method in args.methods:
                res = run(_fit_cmd(heedful, args, path, size, method))
                row = {"round": k, "size": size, "method": method, "floor_s": floor, "wall_s": res["wall_s"],
                       "ratio": (res["wall_s"] - startup) / floor, "load": load()}
                out.append(row)
                print(json.dumps(row), flush=True)
    return out


def machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "max_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    main()
