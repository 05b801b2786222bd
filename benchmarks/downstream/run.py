"""Downstream benchmark: reward models trained on heedful-filtered user votes vs the alternatives.

    python benchmarks/downstream/run.py --seeds 10 --out /tmp/heedful-downstream

Writes ``OUT/results.csv`` (one row per source, seed and training set), ``OUT/diagnostics.csv`` (per
seed: users, fitted mu, eta prior, AUC of the user rankings), ``OUT/summary.md`` (the tables of the
README) and ``OUT/downstream.png``; prints the tables. See ``README.md`` beside this file.

Intervals: per training set, mean accuracy over seeds +- t_{0.975, S-1} sd / sqrt(S); differences
between two training sets are paired by seed (same split, same users, same votes) and get the same
t interval of the per-seed differences.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):          # run as a script: make ``benchmarks.downstream`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.downstream.data import SOURCES, load_items  # noqa: E402
from benchmarks.downstream.embed import (  # noqa: E402
    Embedder,
    cache_dir,
    embed_items,
    hash_embedder,
    item_features,
    minilm_embedder,
)
from benchmarks.downstream.pipeline import Settings, run_seed  # noqa: E402
from benchmarks.downstream.users import Population  # noqa: E402

# the penalty best for *all votes* (the baseline) in l2_sweep.py, on seeds 1000-1004 (not the benchmark's)
DEFAULT_L2 = {"pandalm": 1e-3, "hh": 1e-2}
LABELS = {"gold": "gold labels (ceiling)", "all": "all votes", "oracle": "oracle: attentive-type users",
          "heedful": "heedful eta_mean >= {tau}", "random": "random votes, same size",
          "agreement": "raw agreement, same size", "rbt": "all votes, rBT eps=(1-eta_mean)/2",
          "cbt": "all votes, cBT eps=(1-eta_mean)/2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--seeds", type=int, default=20, help="seeds 0..S-1 (default 20)")
    p.add_argument("--out", type=Path, default=Path("/tmp/heedful-downstream"))
    p.add_argument("--data-dir", type=Path, default=None, help="shared/data (default: found beside the checkout)")
    p.add_argument("--max-items", type=int, default=None, help="use only the first N items (smoke tests)")
    p.add_argument("--embedder", choices=("minilm", "hash"), default="minilm",
                   help="hash: random vectors keyed by the text (tests only; measures nothing)")
    p.add_argument("--test-frac", type=float, default=0.25)
    p.add_argument("--taus", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    p.add_argument("--mu", choices=("known", "learn", "strengths"), default="known",
                   help="known: mu per pair fixed to the pair's gold win rate (a leaderboard); learn: one mu "
                        "per pair from the votes; strengths: Bradley-Terry generator strengths")
    p.add_argument("--gold-fraction", type=float, default=0.0,
                   help="share of training votes whose gold label heedful's fit sees")
    p.add_argument("--casual", choices=("auto", "uniform", "position"), default="auto")
    p.add_argument("--p-attentive", type=float, default=0.6)
    p.add_argument("--mean-votes", type=float, default=10.0)
    p.add_argument("--rho", type=float, default=0.75, help="P(a casual pick is the first-shown answer)")
    p.add_argument("--hh-mu", type=float, default=0.8, help="P(HH's gold-better answer is the strong model's)")
    p.add_argument("--head", choices=("linear", "mlp"), default="linear")
    p.add_argument("--l2", type=float, default=None,
                   help="L2 penalty of the head; default per source (l2_sweep.py): " + str(DEFAULT_L2))
    p.add_argument("--eps-max", type=float, default=0.45)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="redraw OUT/downstream.png from OUT/results.csv")
    return p.parse_args(argv)


def t_interval(x: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t interval of per-seed values (NaNs dropped)."""
    from scipy.stats import t as student_t

    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return np.nan, np.nan, np.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, np.nan, np.nan
    half = float(student_t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - half, m + half


def _key(method: str, tau: float) -> str:
    return method if not np.isfinite(tau) else f"{method}@{tau:g}"


def paired(df: pd.DataFrame, a: str, b: str) -> tuple[float, float, float]:
    """Mean and 95% interval of accuracy(a) - accuracy(b), paired by seed."""
    wide = df.pivot_table(index="seed", columns="key", values="accuracy")
    if a not in wide or b not in wide:
        return np.nan, np.nan, np.nan
    return t_interval((wide[a] - wide[b]).to_numpy())


def _fmt(m: float, lo: float, hi: float, signed: bool = False) -> str:
    if not np.isfinite(m):
        return "n/a"
    s = f"{m:+.3f}" if signed else f"{m:.3f}"
    if not np.isfinite(lo):
        return s
    lo_s, hi_s = (f"{lo:+.3f}", f"{hi:+.3f}") if signed else (f"{lo:.3f}", f"{hi:.3f}")
    cell = f"{s} [{lo_s}, {hi_s}]"
    return f"**{cell}**" if signed and (lo > 0 or hi < 0) else cell


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per training set: size, wrong-label share, accuracy and paired differences."""
    df = df.assign(key=[_key(m, t) for m, t in zip(df.method, df.tau, strict=True)])
    order = ["gold", "all", "oracle"]
    taus = sorted(t for t in df.tau.unique() if np.isfinite(t))
    for t in taus:
        order += [_key("heedful", t), _key("random", t), _key("agreement", t)]
    order += ["rbt", "cbt"]
    rows = []
    for key in order:
        sub = df[df.key == key]
        if sub.empty:
            continue
        method, tau = sub.method.iloc[0], sub.tau.iloc[0]
        label = LABELS[method].format(tau=f"{tau:g}")
        if method in ("random", "agreement"):
            label = f"{label} (as >= {tau:g})"
        row = {"training set": label, "votes kept": f"{sub.n_train.mean():.0f}",
               "wrong labels": f"{sub.wrong_labels.mean():.3f}",
               "accuracy [95% CI]": _fmt(*t_interval(sub.accuracy.to_numpy())),
               "minus all votes": "" if key in ("all",) else _fmt(*paired(df, key, "all"), signed=True),
               "minus random, same size": "", "minus raw agreement, same size": "", "oracle minus this": ""}
        if method == "heedful":
            row["minus random, same size"] = _fmt(*paired(df, key, _key("random", tau)), signed=True)
            row["minus raw agreement, same size"] = _fmt(*paired(df, key, _key("agreement", tau)), signed=True)
        if method not in ("oracle", "gold"):
            row["oracle minus this"] = _fmt(*paired(df, "oracle", key), signed=True)
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]
    return "\n".join(lines)


def diagnostics_text(diag: pd.DataFrame) -> str:
    """One line per source: sizes, the casual model used, user-ranking AUCs, fit time."""
    out = []
    for src, d in diag.groupby("source", sort=False):
        ah, al, ahi = t_interval(d.auc_heedful.to_numpy())
        gh, gl, ghi = t_interval((d.auc_heedful - d.auc_agreement).to_numpy())
        out.append(f"- {src}: {d.n_train_votes.iloc[0]} training votes from {d.n_users.mean():.0f} users on average, "
                   f"{d.n_test.iloc[0]} held-out gold pairs; heedful casual model `{d.casual.iloc[0]}`; "
                   f"AUC of eta_mean for the attentive-type users {ah:.3f} [{al:.3f}, {ahi:.3f}], "
                   f"minus the raw agreement rate's AUC {gh:+.3f} [{gl:+.3f}, {ghi:+.3f}]; "
                   f"heedful fit {d.fit_seconds.mean():.1f} s per seed.")
    return "\n".join(out)


def plot(df: pd.DataFrame, path: Path) -> None:
    """Accuracy against votes kept: heedful/random/agreement curves, the other sets as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(df.source))
    fig, axes = plt.subplots(1, len(sources), figsize=(6.5 * len(sources), 5.2), squeeze=False)
    style = {"heedful": ("C0", "o"), "random": ("C7", "s"), "agreement": ("C1", "^"), "all": ("k", "D"),
             "oracle": ("C2", "*"), "rbt": ("C3", "v"), "cbt": ("C4", "P")}
    for ax, src in zip(axes[0], sources, strict=True):
        d = df[df.source == src]
        for method, (color, marker) in style.items():
            g = d[d.method == method].groupby("tau", dropna=False)
            pts = [(s.n_train.mean(), *t_interval(s.accuracy.to_numpy())) for _, s in g]
            if not pts:
                continue
            x, m, lo, hi = map(np.array, zip(*sorted(pts), strict=True))
            x = x * {"rbt": 0.985, "cbt": 1.015}.get(method, 1.0)     # keep full-size points apart
            ax.errorbar(x, m, yerr=[m - lo, hi - m], color=color, marker=marker, capsize=3,
                        linestyle="-" if len(x) > 1 else "none", label=LABELS[method].format(tau="tau"))
        gm = d[d.method == "gold"].accuracy.mean()
        ax.axhline(gm, color="C2", linestyle="--", linewidth=1, label="gold labels (ceiling)")
        ax.set_title(f"{src}: {d.seed.nunique()} seeds, 95% intervals")
        ax.set_xlabel("training votes kept")
        ax.set_ylabel("pairwise accuracy on held-out gold pairs")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def make_embedder(kind: str) -> Embedder:
    return hash_embedder() if kind == "hash" else minilm_embedder()


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Run every source and seed; write the outputs; return (results, diagnostics, summary text)."""
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    t0 = time.perf_counter()
    population = Population(p_attentive=args.p_attentive, mean_votes=args.mean_votes, rho=args.rho)
    embedder = None
    records, diags = [], []
    for src in args.sources:
        base = load_items(src, args.data_dir, hh_mu=args.hh_mu, seed=0)
        if args.max_items:
            base = base.iloc[: args.max_items].reset_index(drop=True)
        embedder = embedder or make_embedder(args.embedder)
        cache = cache_dir() if args.embedder == "minilm" else None
        table = embed_items(base, embedder, src, cache)
        settings = Settings(test_frac=args.test_frac, taus=tuple(args.taus), mu=args.mu, casual=args.casual,
                            gold_fraction=args.gold_fraction, head=args.head, eps_max=args.eps_max,
                            l2=args.l2 if args.l2 is not None else DEFAULT_L2[src], population=population)
        for seed in range(args.seeds):
            items = base
            if src == "hh":          # a new strong/weak assignment per seed
                items = load_items(src, args.data_dir, hh_mu=args.hh_mu, seed=seed)
                items = items[items.item_id.isin(base.item_id)].reset_index(drop=True)
            phi_a, phi_b = item_features(items, table)
            recs, diag = run_seed(items, phi_a, phi_b, seed, settings)
            records += [{"source": src, **r} for r in recs]
            diags.append({"source": src, **diag})
            print(f"[{time.perf_counter() - t0:7.1f}s] {src} seed {seed} done", file=sys.stderr, flush=True)
    results, diag = pd.DataFrame(records), pd.DataFrame(diags)
    text = summary_text(results, diag, args, time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out / "results.csv", index=False)
    diag.assign(mu_fit=diag.mu_fit.astype(str)).to_csv(args.out / "diagnostics.csv", index=False)
    (args.out / "summary.md").write_text(text, encoding="utf-8")
    if not args.no_plot:
        plot(results, args.out / "downstream.png")
    return results, diag, text


def summary_text(results: pd.DataFrame, diag: pd.DataFrame, args: argparse.Namespace, seconds: float) -> str:
    parts = [f"Settings: seeds {args.seeds}, held out {args.test_frac:g}, users {args.p_attentive:g} "
             f"Beta(8, 2) / {1 - args.p_attentive:g} Beta(1, 5), mean votes per user {args.mean_votes:g} "
             f"(log-normal), casual position bias rho {args.rho:g}, heedful mu `{args.mu}`, gold fraction "
             f"{args.gold_fraction:g}, head `{args.head}` "
             f"(l2 {args.l2 if args.l2 is not None else DEFAULT_L2}), embedder `{args.embedder}`; "
             f"wall time {seconds:.0f} s.", ""]
    for src in dict.fromkeys(results.source):
        parts += [f"### {src}", "", markdown(summary_table(results[results.source == src])), ""]
    parts += ["Diagnostics:", "", diagnostics_text(diag), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        plot(pd.read_csv(args.out / "results.csv"), args.out / "downstream.png")
        return 0
    _, _, text = run(args)
    print(text)
    print(f"outputs in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
