"""How OpenMP's wait between parallel ops costs small tensor ops, per GOMP_SPINCOUNT (heedful/__init__.py).

For each spin count, in a fresh process (the runtime reads it once, when torch loads it):
- us/op: a chain of elementwise ops on n doubles (x * y, + 1, / x, where) with torch's threads;
- idle CPU ms: CPU time a parallel op and a 20 ms sleep cost, minus the same with no spinning, i.e. how
  long the worker thread spins after a burst before it sleeps.

    python benchmarks/omp_wait.py [--counts 0 3000 10000 30000 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import heedful
from heedful.memory import keep_freed_memory
keep_freed_memory()
import torch

out = {"threads": torch.get_num_threads()}
for n in (65536, 131072, 1 << 20):
    x = torch.rand(n, dtype=torch.float64) + 0.5
    y = torch.rand(n, dtype=torch.float64)
    for _ in range(50):
        z = (x * y + 1.0) / x
    t = time.perf_counter()
    for _ in range(500):
        z = x * y
        z = z + 1.0
        z = z / x
        z = torch.where(z > 1, z, x)
    out[f"us_per_op_{n}"] = (time.perf_counter() - t) / 2000 * 1e6


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


x = torch.rand(1 << 20, dtype=torch.float64)
y = x * 2
c0 = cpu()
for _ in range(100):
    torch.mul(x, 2, out=y)
    time.sleep(0.02)
out["cpu_ms_per_burst"] = (cpu() - c0) / 100 * 1e3
print(json.dumps(out))
"""


def measure(count: int) -> dict:
    env = {**os.environ, "GOMP_SPINCOUNT": str(count)}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 3000, 10000, 30000, 100000])
    args = ap.parse_args()
    rows = [(c, measure(c)) for c in args.counts]
    base = rows[0][1]["cpu_ms_per_burst"] if rows and rows[0][0] == 0 else None
    print(f"torch threads: {rows[0][1]['threads'] if rows else '-'}")
    print("| GOMP_SPINCOUNT | us/op, 65,536 | us/op, 131,072 | us/op, 1,048,576 | idle CPU ms after a burst |")
    print("|---|---|---|---|---|")
    for c, r in rows:
        idle = f"{r['cpu_ms_per_burst'] - base:.2f}" if base is not None else f"{r['cpu_ms_per_burst']:.2f} (total)"
        print(f"| {c:,} | {r['us_per_op_65536']:.1f} | {r['us_per_op_131072']:.1f} | {r['us_per_op_1048576']:.1f} "
              f"| {idle} |")


if __name__ == "__main__":
    main()
