"""One compact table over several runs of ``run.py`` (the README's sensitivity table).

    python benchmarks/downstream/compare.py "main=/tmp/hd-main" "mu learned=/tmp/hd-mulearn" --taus 0.5 0.7

Per run, source and threshold tau: votes kept by heedful, the wrong-label share heedful and the raw
agreement heuristic keep at that size, and the paired accuracy differences (95% t intervals over
seeds) heedful minus all votes, minus random and minus raw agreement at the same size; then oracle
minus all votes, and how much better eta_mean ranks the attentive-type users than the raw agreement
rate does (AUC difference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.downstream.run import _fmt, _key, markdown, paired, t_interval  # noqa: E402


def rows_for(name: str, results: pd.DataFrame, diag: pd.DataFrame, taus: list[float]) -> list[dict]:
    """The compact rows of one run (see the module docstring)."""
    out = []
    results = results.assign(key=[_key(m, t) for m, t in zip(results.method, results.tau, strict=True)])
    for src, df in results.groupby("source", sort=False):
        d = diag[diag.source == src]
        auc = _fmt(*t_interval((d.auc_heedful - d.auc_agreement).to_numpy()), signed=True)
        for tau in taus:
            h, a = df[df.key == _key("heedful", tau)], df[df.key == _key("agreement", tau)]
            if h.empty:
                continue
            out.append({
                "run": name, "source": src, "tau": f"{tau:g}", "votes kept": f"{h.n_train.mean():.0f}",
                "wrong labels heedful / agreement": f"{h.wrong_labels.mean():.3f} / {a.wrong_labels.mean():.3f}",
                "heedful minus all": _fmt(*paired(df, _key("heedful", tau), "all"), signed=True),
                "minus random": _fmt(*paired(df, _key("heedful", tau), _key("random", tau)), signed=True),
                "minus agreement": _fmt(*paired(df, _key("heedful", tau), _key("agreement", tau)), signed=True),
                "oracle minus all": _fmt(*paired(df, "oracle", "all"), signed=True),
                "AUC eta_mean minus agreement": auc,
                "seeds": df.seed.nunique(),
            })
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="NAME=DIR, DIR written by run.py")
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.7])
    args = p.parse_args(argv)
    rows = []
    for spec in args.runs:
        name, _, folder = spec.rpartition("=")
        folder = Path(folder)
        rows += rows_for(name or folder.name, pd.read_csv(folder / "results.csv"),
                         pd.read_csv(folder / "diagnostics.csv"), args.taus)
    print(markdown(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
