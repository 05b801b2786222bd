"""Posterior plots (PNG) from a fit folder: users.parquet, params.json and, for svi/nuts, posterior.nc.

* ``trace.png`` / ``rank.png``: trace and rank plots of the globals (a, b, mu, rho, strengths)
* ``forest_eta.png``: eta intervals of the most and least attentive users (by posterior mean)
* ``mu_prior_posterior.png``: each pair's mu posterior against its prior
* ``ppc_choice_rate.png``: observed per-user rates of picking the favoured answer vs replicated data
* ``reliability.png`` (with the simulation's truth file): binned posterior means against the true eta, and
  the coverage of central intervals at every level against the level
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats as sstats  # noqa: E402

GLOBALS = ("a", "b", "mu", "rho", "strength")


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _sampled_globals(idata) -> list[str]:
    """Global variables that vary across draws (a known mu or a fixed prior does not)."""
    out = []
    for v in GLOBALS:
        if v in idata.posterior and float(idata.posterior[v].std()) > 0:
            out.append(v)
    return out


def _plot_globals(idata, path: Path, kind: str) -> Path | None:
    """An ArviZ trace or rank plot of the sampled globals; None when no global was sampled."""
    names = _sampled_globals(idata)
    if not names:
        return None
    az = _az()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "trace":
            axes = az.plot_trace(idata, var_names=names, compact=True, figsize=(10, 2.2 * len(names)))
        else:
            axes = az.plot_rank(idata, var_names=names, kind="bars")
    return _save(np.ravel(axes)[0].figure, path)


def plot_trace(idata, path: Path) -> Path | None:
    return _plot_globals(idata, path, "trace")


def plot_rank(idata, path: Path) -> Path | None:
    return _plot_globals(idata, path, "rank")


def plot_forest(users: pd.DataFrame, path: Path, k: int = 15, level: float = 0.9) -> Path:
    """The k most and k least attentive users (posterior mean), with their central intervals and votes."""
    u = users.sort_values("eta_mean")
    pick = pd.concat([u.head(k), u.tail(k)]).drop_duplicates("user_id")
    y = np.arange(len(pick))
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(pick) + 1.2))
    top = pick.eta_mean.to_numpy() >= u.eta_mean.median()
    for sel, colour, label in ((~top, "tab:red", f"least attentive {k}"), (top, "tab:blue", f"most attentive {k}")):
        ax.errorbar(pick.eta_mean[sel], y[sel], xerr=[pick.eta_mean[sel] - pick.eta_lo[sel],
                                                      pick.eta_hi[sel] - pick.eta_mean[sel]],
                    fmt="o", color=colour, ms=4, capsize=2, label=label)
    ax.set_yticks(y, [f"{i} (n={n})" for i, n in zip(pick.user_id, pick.n_votes, strict=True)], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"eta: posterior mean and {level:.0%} interval")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Attentiveness of the most and least attentive users")
    return _save(fig, path)


def plot_mu(idata, params: dict, path: Path) -> Path | None:
    """Per pair: posterior of mu (histogram) against its prior (the prior group's draws, or Beta from attrs)."""
    if "mu" not in idata.posterior:
        return None
    mu = idata.posterior["mu"]
    pairs = [str(p) for p in mu.coords["pair"].values]
    n = len(pairs)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    al = idata.posterior.attrs.get("mu_prior_alpha")
    be = idata.posterior.attrs.get("mu_prior_beta")
    source = {f"{r['model_a']} vs {r['model_b']}": r.get("source") for r in params.get("mu", [])}
    grid = np.linspace(0.001, 0.999, 400)
    for i, (ax, pair) in enumerate(zip(axes.ravel(), pairs, strict=False)):
        draws = mu.sel(pair=pair).values.ravel()
        if draws.std() == 0:
            ax.axvline(draws[0], color="k", label=f"known: {draws[0]:.3f}")
        else:
            ax.hist(draws, bins=50, density=True, color="tab:blue", alpha=0.7, label="posterior")
            if "prior" in idata.groups() and "mu" in idata.prior:
                pr = idata.prior["mu"].sel(pair=pair).values.ravel()
                ax.hist(pr, bins=50, density=True, histtype="step", color="tab:orange", label="prior (draws)")
            elif al is not None:
                a_, b_ = np.ravel(al)[i], np.ravel(be)[i]
                ax.plot(grid, sstats.beta.pdf(grid, a_, b_), color="tab:orange", label=f"prior Beta({a_:g}, {b_:g})")
        ax.set_title(f"{pair} ({source.get(pair, '')})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("mu")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle("mu: posterior against prior")
    return _save(fig, path)


def plot_ppc(idata, path: Path, n_rep: int = 100) -> Path | None:
    """Histogram of per-user favoured-choice rates: observed, and the 5-95% band of replicated histograms."""
    if "posterior_predictive" not in idata.groups() or "choice_rate" not in idata.posterior_predictive:
        return None
    obs = idata.observed_data["choice_rate"].values
    rep = idata.posterior_predictive["choice_rate"].values.reshape(-1, obs.shape[0])
    idx = np.linspace(0, rep.shape[0] - 1, min(n_rep, rep.shape[0])).astype(int)
    bins = np.linspace(0, 1, 22)
    h_obs = np.histogram(obs, bins)[0]
    h_rep = np.stack([np.histogram(rep[i], bins)[0] for i in idx])
    lo, mid, hi = np.percentile(h_rep, [5, 50, 95], axis=0)
    centre = 0.5 * (bins[1:] + bins[:-1])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(centre, lo, hi, step="mid", color="tab:orange", alpha=0.35, label="replicated 5-95%")
    ax.step(centre, mid, where="mid", color="tab:orange", label="replicated median")
    ax.step(centre, h_obs, where="mid", color="k", label="observed")
    ax.set_xlabel("per-user rate of picking the answer mu favours")
    ax.set_ylabel("users")
    ax.set_title(f"Posterior predictive check ({obs.shape[0]:,} users)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reliability(users: pd.DataFrame, truth: pd.DataFrame, path: Path, idata=None, level: float = 0.9) -> Path:
    """Left: mean true eta per decile of the posterior mean. Right: coverage of central intervals vs level
    (from the posterior draws of eta when there are some, else the one level in users.parquet)."""
    u = users.merge(truth[["user_id", "true_eta"]], on="user_id")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    q = pd.qcut(u.eta_mean, 10, duplicates="drop")
    g = u.groupby(q, observed=True).agg(pred=("eta_mean", "mean"), true=("true_eta", "mean"), n=("true_eta", "size"))
    se = u.groupby(q, observed=True).true_eta.std() / np.sqrt(g.n)
    a1.plot([0, 1], [0, 1], color="grey", lw=1)
    a1.errorbar(g.pred, g.true, yerr=2 * se, fmt="o-", ms=4)
    a1.set_xlabel("posterior mean of eta (decile means)")
    a1.set_ylabel("true eta (mean, +-2 se)")
    a1.set_title("Reliability of the posterior mean")
    levels = np.linspace(0.1, 0.95, 18)
    a2.plot([0, 1], [0, 1], color="grey", lw=1)
    if idata is not None and "eta" in idata.posterior:
        ids = [str(s) for s in idata.posterior["eta"].coords["user"].values]
        draws = idata.posterior["eta"].values.reshape(-1, len(ids))
        t = truth.set_index(truth.user_id.astype(str)).true_eta.reindex(ids).to_numpy()
        ok = ~np.isnan(t)
        pit = (draws[:, ok] < t[ok]).mean(0)
        cov = [(np.abs(pit - 0.5) <= lv / 2).mean() for lv in levels]
        a2.plot(levels, cov, "o-", ms=3, label=f"posterior draws ({int(ok.sum()):,} users)")
    inside = ((u.true_eta >= u.eta_lo) & (u.true_eta <= u.eta_hi)).mean()
    a2.plot([level], [inside], "s", color="tab:red", label=f"users.parquet {level:.0%}: {inside:.3f}")
    a2.set_xlabel("nominal level of the central interval")
    a2.set_ylabel("share of users whose true eta is inside")
    a2.set_title("Interval coverage")
    a2.legend(fontsize=8)
    return _save(fig, path)


def plot_fit(outdir: str | Path, truth: str | Path | None = None, dest: str | Path | None = None,
             top: int = 15) -> list[Path]:
    """Every plot the fit folder allows; returns the PNGs written (into ``dest``, default OUTDIR/plots)."""
    from heedful.errors import InputError

    outdir = Path(outdir)
    if not (outdir / "users.parquet").exists():
        raise InputError(f"{outdir} has no users.parquet: run `heedful fit VOTES -o {outdir}` first")
    dest = Path(dest) if dest else outdir / "plots"
    dest.mkdir(parents=True, exist_ok=True)
    users = pd.read_parquet(outdir / "users.parquet")
    users["user_id"] = users.user_id.astype(str)
    params = json.loads((outdir / "params.json").read_text()) if (outdir / "params.json").exists() else {}
    level = float(params.get("interval_level", 0.9))
    idata = None
    if (outdir / "posterior.nc").exists():
        idata = _az().from_netcdf(outdir / "posterior.nc")
    written = [plot_forest(users, dest / "forest_eta.png", top, level)]
    if idata is not None:
        written += [plot_trace(idata, dest / "trace.png"), plot_rank(idata, dest / "rank.png"),
                    plot_mu(idata, params, dest / "mu_prior_posterior.png"),
                    plot_ppc(idata, dest / "ppc_choice_rate.png")]
    if truth is not None:
        from heedful.votes import read_table  # parquet, csv or jsonl

        t = read_table(truth)
        if "true_eta" not in t.columns:
            raise InputError(f"{truth}: no true_eta column (use the .truth.parquet that `heedful simulate` writes)")
        t["user_id"] = t.user_id.astype(str)
        written.append(plot_reliability(users, t, dest / "reliability.png", idata, level))
    return [p for p in written if p is not None]
