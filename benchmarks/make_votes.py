"""Write a simulated comparison-mode log straight to Parquet (or CSV) with pyarrow, in row chunks.

Same model as ``heedful simulate`` (eta_u ~ Beta(a, b); attentive picks follow t ~ Bernoulli(mu_p), casual
picks are a coin; half the rows list the pair the other way round), but rows are shuffled across users
(as in a real log) and written chunk by chunk, so 10M+ votes need no more than a few hundred MB:

    python benchmarks/make_votes.py --users 1000000 --votes-per-user 10 --pairs 10 -o /tmp/votes10m.parquet
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

CHUNK = 1_000_000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--votes-per-user", type=int, default=10)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--eta-prior", type=float, nargs=2, default=(3.0, 5.0))
    p.add_argument("--tie-rate", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=1, help="split the rows over this many files (OUTPUT's stem + -i)")
    p.add_argument("--jobs", type=int, default=1, help="write the files in this many processes (each file's "
                   "choices then come from its own seeded generator)")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.jobs <= 1:
        rng = np.random.default_rng(args.seed)
        for f in range(args.files):
            write_file(args, f, rng)
        return
    with ProcessPoolExecutor(min(args.jobs, args.files)) as ex:
        list(ex.map(write_file, [args] * args.files, range(args.files)))


def write_file(args: argparse.Namespace, f: int, rng: np.random.Generator | None = None) -> None:
    """Write file ``f`` of ``args.files``; without ``rng``, a generator seeded by (seed, f) draws its choices."""
    shared = rng if rng is not None else np.random.default_rng(args.seed)
    if rng is None or f == 0:
        eta = shared.beta(*args.eta_prior, size=args.users)
        user = shared.permutation(np.repeat(np.arange(args.users), args.votes_per_user))
        args._cache = (eta, user)
    eta, user = args._cache
    rng = rng if rng is not None else np.random.default_rng([args.seed, f])
    n = len(user)
    mus = np.linspace(0.6, 0.9, args.pairs) if args.pairs > 1 else np.array([0.8])
    ma = pa.array([f"model-{2 * i:02d}" for i in range(args.pairs)])
    mb = pa.array([f"model-{2 * i + 1:02d}" for i in range(args.pairs)])
    width = len(str(args.users - 1))
    uid = pa.array(np.char.add("u", np.char.zfill(np.arange(args.users).astype(str), width)))
    ab = pa.array(["a", "b"])
    choice3 = pa.array(["a", "b", "tie"])
    bounds = np.linspace(0, n, args.files + 1).astype(np.int64)
    out = args.output if args.files == 1 else args.output.with_name(
        f"{args.output.name.split('.')[0]}-{f:03d}{''.join(args.output.suffixes)}")
    writer = None
    for s in range(bounds[f], bounds[f + 1], CHUNK):
        e = min(s + CHUNK, bounds[f + 1])
        u = user[s:e]
        m = e - s
        pair = rng.integers(0, args.pairs, size=m)
        attentive = rng.random(m) < eta[u]
        truth_a = rng.random(m) < mus[pair]
        picked_a = np.where(attentive, truth_a, rng.random(m) < 0.5)
        tie = rng.random(m) < args.tie_rate
        swap = rng.random(m) < 0.5
        choice = np.where(tie, 2, np.where(picked_a ^ swap, 0, 1))
        table = pa.table({
            "vote_id": pa.array(np.char.add("v", np.arange(s, e).astype(str))),
            "user_id": uid.take(pa.array(u)),
            "model_a": pa.array(np.where(swap, mb.take(pa.array(pair)), ma.take(pa.array(pair)))),
            "model_b": pa.array(np.where(swap, ma.take(pa.array(pair)), mb.take(pa.array(pair)))),
            "choice": choice3.take(pa.array(choice)),
            "shown_first": ab.take(pa.array((rng.random(m) < 0.5).astype(np.int64))),
        })
        if out.suffix == ".csv":
            if writer is None:
                writer = pacsv.CSVWriter(str(out), table.schema)
            writer.write_table(table)
        else:
            if writer is None:
                writer = pq.ParquetWriter(str(out), table.schema)
            writer.write_table(table, row_group_size=CHUNK)
    writer.close()
    print(f"wrote {bounds[f + 1] - bounds[f]:,} votes to {out}", flush=True)


if __name__ == "__main__":
    main()
