"""One self-contained HTML page from a fit's outputs (``OUTDIR/users.parquet``, ``OUTDIR/params.json``).

The page has no external references (no scripts, fonts, style sheets or image links): the figures are
PNGs embedded as base64 ``data:`` URIs, the style is inline, so the file can be mailed, archived and
opened offline. Sections: the fit summary, warnings, the eta prior, per-pair mu with intervals, the
distribution of eta over users, the most and least attentive users, sampler diagnostics when the fit
has them, and the figures.

The report's own figures (mu per pair, eta over users with the fitted prior, per-user intervals
against votes, the profile likelihood of mu and generator strengths when present) are drawn from the
two files every fit writes. :func:`heedful.plots.plot_fit` adds its figures when that module is
installed: the most and least attentive users, and with ``posterior.nc`` (svi/nuts) trace, rank, mu
posterior against its prior and the posterior predictive check; with a simulation's truth file, the
reliability plot. Without it, the report draws its own trace and predictive check from
``posterior.nc``.

>>> from heedful.report import build_report
>>> rep = build_report("fit-out")
>>> rep.write("fit-out/report.html"); [f.title for f in rep.figures]
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from heedful.errors import InputError

USER_COLUMNS = ("user_id", "n_votes", "eta_hat", "eta_mean", "eta_lo", "eta_hi")
TOP_USERS = 10


@dataclass(frozen=True)
class Figure:
    """A figure of the report: an id (its anchor), a title, a caption and the PNG bytes."""

    key: str
    title: str
    caption: str
    png: bytes
    source: str = "heedful.report"   # which module drew it

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Report:
    """The report of one fit: its HTML, the figures it embeds and the warnings it shows."""

    html: str
    figures: list[Figure]
    warnings: list[str]
    params: dict
    notes: list[str] = field(default_factory=list)   # what was left out and why (e.g. no posterior.nc)

    def write(self, path: str | Path) -> Path:
        """Write the page (UTF-8), atomically; returns the path."""
        from heedful.outputs import _atomic

        path = Path(path)
        _atomic(path, lambda tmp: Path(tmp).write_text(self.html, encoding="utf-8"))
        return path


# -- reading a fit -----------------------------------------------------------------------------------
def load_outputs(outdir: str | Path) -> tuple[pd.DataFrame, dict]:
    """users.parquet and params.json of a fit, checked for the columns and keys the report reads."""
    from heedful.outputs import read_fit

    return read_fit(outdir, USER_COLUMNS)


# -- figures -------------------------------------------------------------------------------------------
def _new_figure(width: float = 7.0, height: float = 4.0):
    """A matplotlib Figure on the Agg canvas, outside pyplot (no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _num(v, default: float = float("nan")) -> float:
    try:
        return float(v) if v is not None else default
    except (TypeError, ValueError):
        return default


def mu_figure(pairs: pd.DataFrame, level: float):
    """Per pair: mu with its interval (known values as diamonds), 1/2 (no asymmetry) marked."""
    n = len(pairs)
    fig = _new_figure(7.0, max(2.2, 0.45 * n + 1.2))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    labels = (pairs.model_a.astype(str) + " vs " + pairs.model_b.astype(str)).tolist()
    mu = pairs.mu.to_numpy(float)
    lo = pairs.get("mu_lo", pd.Series(np.nan, index=pairs.index)).to_numpy(float)
    hi = pairs.get("mu_hi", pd.Series(np.nan, index=pairs.index)).to_numpy(float)
    known = (pairs.get("source", pd.Series("", index=pairs.index)) == "known").to_numpy()
    ok = np.isfinite(lo) & np.isfinite(hi) & ~known
    ax.hlines(y[ok], lo[ok], hi[ok], color="tab:blue", lw=2.5, label=f"{level:.0%} interval")
    ax.plot(mu[~known], y[~known], "o", color="tab:blue", label="estimate")
    if known.any():
        ax.plot(mu[known], y[known], "D", color="tab:green", label="known (config)")
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.text(0.5, n - 0.4, " 1/2: no asymmetry", color="grey", fontsize=8, va="bottom")
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.7, n - 0.1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("mu = P(model_a's answer is truly better)")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def eta_distribution_figure(users: pd.DataFrame, a: float, b: float, threshold: float):
    """Histogram of the per-user posterior means and modes of eta, with the fitted Beta(a, b) density."""
    from scipy import stats

    fig = _new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 41)
    heights, _, _ = ax.hist(users.eta_mean, bins=bins, density=True, alpha=0.6, color="tab:blue",
                            label="eta_mean (posterior mean)")
    modes, _, _ = ax.hist(users.eta_hat, bins=bins, density=True, histtype="step", lw=1.5, color="tab:orange",
                          label="eta_hat (posterior mode)")
    top = 1.5 * max(float(np.max(heights)), 1.0)
    if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0:
        x = np.linspace(0.0025, 0.9975, 400)
        ax.plot(x, stats.beta(a, b).pdf(x), color="black", lw=1.5, label=f"prior Beta({a:.2f}, {b:.2f})")
    ax.set_ylim(0, top)
    if float(np.max(modes)) > top:
        ax.set_title("the mode bars are cut at the top: modes pile up at 0 and 1", fontsize=9, color="tab:orange")
    ax.axvline(threshold, color="tab:red", ls="--", lw=1, label=f"casual threshold {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("eta (attentiveness)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return fig


def user_intervals_figure(users: pd.DataFrame, level: float, max_users: int = 2000, seed: int = 0):
    """Every user's eta_mean with its interval against the user's number of votes (log scale, jittered)."""
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    u = users
    if len(u) > max_users:
        u = u.sample(max_users, random_state=seed)
    rng = np.random.default_rng(seed)
    x = u.n_votes.to_numpy(float) * np.exp(rng.uniform(-0.08, 0.08, len(u)))
    ax.vlines(x, u.eta_lo, u.eta_hi, color="tab:blue", alpha=0.15, lw=1)
    ax.plot(x, u.eta_mean, ".", ms=3, color="tab:blue", alpha=0.6)
    nv = users.n_votes.to_numpy(float)
    edges = np.unique(np.round(np.geomspace(max(1.0, nv.min()), nv.max() + 1, 16)))
    which = np.clip(np.searchsorted(edges, nv, side="right") - 1, 0, max(len(edges) - 2, 0))
    width = (users.eta_hi - users.eta_lo).groupby(which).mean()
    centre = pd.Series(nv).groupby(which).median()
    ax.plot(centre.to_numpy(), width.to_numpy(), color="black", lw=1.5, marker="s", ms=3,
            label=f"mean width of the {level:.0%} interval")
    if users.n_votes.max() > 2 * max(1, users.n_votes.min()):
        ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("non-tie votes of the user" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("eta: posterior mean and interval")
    title = f"{len(u):,} users" + (f" (a random {max_users:,} of {len(users):,})" if len(users) > max_users else "")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def strengths_figure(strengths: dict):
    """Bradley-Terry strengths of the generators with intervals (the reference model at 0)."""
    items = sorted(strengths.items(), key=lambda kv: _num(kv[1].get("strength")))
    fig = _new_figure(7.0, max(2.2, 0.4 * len(items) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(items))
    s = np.array([_num(v.get("strength")) for _, v in items])
    lo = np.array([_num(v.get("lo")) for _, v in items])
    hi = np.array([_num(v.get("hi")) for _, v in items])
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.hlines(y[ok], lo[ok], hi[ok], color="tab:purple", lw=2.5)
    ax.plot(s, y, "o", color="tab:purple")
    ax.set_yticks(y, [m + (" (reference)" if v.get("reference") else "") for m, v in items])
    ax.axvline(0, color="grey", ls="--", lw=1)
    ax.set_xlabel("strength s (mu_AB = sigmoid(s_A - s_B))")
    return fig


def profile_figure(profiles: dict, level: float):
    """Profile log-likelihood of each profiled mu (other globals re-maximised), with the interval cut-off."""
    from scipy import stats

    fig = _new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    for label, prof in profiles.items():
        mu, obj = np.asarray(prof.get("mu", []), float), np.asarray(prof.get("objective", []), float)
        if not len(mu):
            continue
        order = np.argsort(mu)
        ax.plot(mu[order], obj[order] - np.nanmax(obj), "-o", ms=3, label=label)
    ax.axhline(-stats.chi2.ppf(level, 1) / 2, color="grey", ls=":", label=f"{level:.0%} cut-off")
    ax.set_xlim(0, 1)
    ax.set_ylim(-6, 0.5)
    ax.set_xlabel("mu")
    ax.set_ylabel("profile log-likelihood - max")
    ax.legend(fontsize=8)
    return fig


def _posterior_figures(outdir: Path) -> tuple[list[Figure], list[str]]:
    """Trace of the globals and a predictive check from OUTDIR/posterior.nc (sampling methods), drawn here."""
    path = outdir / "posterior.nc"
    if not path.is_file():
        return [], []
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import arviz as az

            idata = az.from_netcdf(path)
    except Exception as e:  # an unreadable optional file must not lose the whole report
        return [], [f"{path.name} could not be read: {type(e).__name__}: {e}"]
    figs: list[Figure] = []
    post = idata.posterior
    names = [v for v in ("a", "b", "mu", "rho") if v in post]
    series = []
    for v in names:
        da = post[v]
        extra = [d for d in da.dims if d not in ("chain", "draw")]
        if extra:
            for coord in da[extra[0]].values[:6]:
                series.append((f"{v}[{coord}]", da.sel({extra[0]: coord}).values))
        else:
            series.append((v, da.values))
    if series:
        fig = _new_figure(9.0, 1.6 * len(series) + 0.6)
        axes = fig.subplots(len(series), 2, squeeze=False, width_ratios=[3, 1])
        for (label, vals), (ax_t, ax_h) in zip(series, axes, strict=True):
            for c in range(vals.shape[0]):
                ax_t.plot(vals[c], lw=0.6, alpha=0.8)
                ax_h.hist(vals[c], bins=30, histtype="step", orientation="horizontal")
            ax_t.set_ylabel(label)
            ax_h.set_yticks([])
        axes[-1, 0].set_xlabel("draw")
        axes[-1, 1].set_xlabel("count")
        figs.append(Figure("trace", "trace of the globals", "Each chain's draws of the global parameters (left) "
                           "and their histograms (right). Chains that overlap and look like stationary noise have "
                           "mixed; see the sampler diagnostics table for r_hat and effective sample sizes.",
                           png_bytes(fig)))
    if "posterior_predictive" in idata.groups() and "choice_rate" in idata.posterior_predictive:
        obs = np.asarray(idata.observed_data["choice_rate"].values, float)
        rep = np.asarray(idata.posterior_predictive["choice_rate"].values, float).reshape(-1, obs.shape[-1])
        rng = np.random.default_rng(0)
        fig = _new_figure(7.0, 3.8)
        ax = fig.add_subplot()
        bins = np.linspace(0, 1, 26)
        for i in rng.choice(len(rep), size=min(50, len(rep)), replace=False):
            ax.hist(rep[i][np.isfinite(rep[i])], bins=bins, histtype="step", color="tab:blue", alpha=0.12)
        ax.hist(obs[np.isfinite(obs)], bins=bins, histtype="step", color="black", lw=2, label="observed")
        ax.plot([], [], color="tab:blue", alpha=0.5, label="replicated from posterior draws")
        ax.set_xlabel("per-user rate of picking the favoured model")
        ax.set_ylabel("users")
        ax.legend(fontsize=8)
        figs.append(Figure("ppc", "posterior predictive check", "The observed distribution of per-user choice "
                           "rates (black) against replicates drawn from the posterior (blue). A model that misses "
                           "the population's shape shows it here.", png_bytes(fig)))
    return figs, []


def _own_figures(users: pd.DataFrame, params: dict) -> list[Figure]:
    level = _num(params.get("interval_level"), 0.9)
    pairs = pd.DataFrame(params["mu"])
    ep = params["eta_prior"]
    a, b = _num(ep.get("a")), _num(ep.get("b"))
    threshold = _num(params.get("casual_threshold"), 0.5)
    figs = [
        Figure("mu", "mu per pair", f"Each pair's mu with its {level:.0%} interval; diamonds are values fixed in the "
               "config. Intervals far from 1/2 mean the pair separates attentive from casual users; wide ones mean "
               "mu is weakly identified (one user's votes identify only eta (mu - 1/2)).",
               png_bytes(mu_figure(pairs, level))),
        Figure("eta-distribution", "eta over users", "Histogram of the per-user posterior means (filled) and modes "
               "(outline) of eta, with the population prior Beta(a, b) the fit used. Modes pile up at 0 and 1 for "
               "users with few votes; the means are shrunk toward the prior mean.",
               png_bytes(eta_distribution_figure(users, a, b, threshold))),
        Figure("user-intervals", "per-user intervals against votes", f"Each user's posterior mean of eta with its "
               f"{level:.0%} interval (vertical line) against the user's number of non-tie votes. Intervals narrow "
               "as votes accumulate; users with a handful of votes stay close to the prior.",
               png_bytes(user_intervals_figure(users, level))),
    ]
    if params.get("profiles"):
        figs.append(Figure("profiles", "profile likelihood of mu", "For each profiled pair, the log-likelihood with "
                           "every other parameter re-maximised at each mu. The interval is where the curve stays "
                           "above the dotted line; a curve still flat at 0 or 1 means the data do not bound mu on "
                           "that side.", png_bytes(profile_figure(params["profiles"], level))))
    if params.get("strengths"):
        figs.append(Figure("strengths", "generator strengths", "Bradley-Terry strengths of the generator models with "
                           "their intervals; mu for a pair is sigmoid(s_A - s_B).",
                           png_bytes(strengths_figure(params["strengths"]))))
    return figs


PLOTS_CAPTIONS = {  # heedful.plots' PNG names -> (title, caption)
    "forest_eta": ("most and least attentive users", "The most and the least attentive users by posterior mean of "
                   "eta, with their intervals and vote counts (drawn by heedful.plots)."),
    "trace": ("trace of the globals", "Trace plots of the sampled global parameters: each chain's draws and its "
              "marginal density. Overlapping, stationary chains have mixed."),
    "rank": ("rank plots of the globals", "Rank plots: the histogram of each chain's ranks among all draws. Flat "
             "bars mean the chains sample the same distribution."),
    "mu_prior_posterior": ("mu: posterior against prior", "Each pair's posterior draws of mu against its prior: "
                           "how much the votes moved mu away from what was assumed."),
    "ppc_choice_rate": ("posterior predictive check", "Observed per-user rates of picking the answer mu favours "
                        "against the 5-95% band of replicated data. A model that misses the population's shape "
                        "shows it here."),
    "reliability": ("reliability against the truth", "Left: the true eta against the posterior mean (decile "
                    "means). Right: the share of users whose true eta lies inside the central interval, against "
                    "the interval's level (simulated data only)."),
}


def _plots_figures(outdir: Path, truth: str | Path | None = None) -> tuple[list[Figure], list[str]]:
    """The PNGs of :func:`heedful.plots.plot_fit` (forest, and with posterior.nc: trace, rank, mu, PPC;
    with a truth file: reliability), when that module is installed."""
    import tempfile

    try:
        from heedful.plots import plot_fit
    except ImportError:
        return [], ["the truth file needs heedful.plots (its reliability figure), which this installation lacks"
                    ] if truth is not None else []
    figs: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="heedful-report-") as tmp:
        try:
            paths = plot_fit(outdir, truth=truth, dest=tmp)
        except InputError:
            raise
        except Exception as e:  # a broken optional figure must not lose the whole report
            return [], [f"heedful.plots could not draw its figures: {type(e).__name__}: {e}"]
        for p in paths:
            p = Path(p)
            title, caption = PLOTS_CAPTIONS.get(p.stem, (p.stem.replace("_", " "), ""))
            figs.append(Figure(f"plots-{p.stem}", title, caption, p.read_bytes(), source="heedful.plots"))
    return figs, []


# -- HTML ----------------------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1000px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
.sub{color:#59636e;font-size:13px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f6f8fa}.warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;border-radius:6px}
.warn li{margin:4px 0}.ok{background:#dafbe1;border:1px solid #4ac26b;padding:8px 12px;border-radius:6px}
figure{margin:16px 0;padding:8px;border:1px solid #d0d7de;border-radius:6px}figure img{max-width:100%}
figcaption{font-size:13px;color:#59636e}figcaption b{color:#1f2328}nav a{margin-right:12px;font-size:13px}
.cols{display:flex;gap:24px;flex-wrap:wrap}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "&ndash;"
        return f"{v:,.{digits}f}"
    return _e(v)


def _table(header: list[str], rows: list[list[object]], digits: int = 3) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for v in r:
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            cells.append(f'<td class="n">{_fmt(v, digits)}</td>' if num else f"<td>{_fmt(v, digits)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _interval(lo: object, hi: object) -> str:
    lo, hi = _num(lo), _num(hi)
    return f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "–"


def _summary_rows(users: pd.DataFrame, params: dict) -> list[list[object]]:
    ep = params["eta_prior"]
    n_users = params.get("n_users", len(users))
    rows: list[list[object]] = [
        ["method", params.get("method", "?")],
        ["users", n_users],
        ["votes in the likelihood (non-tie)", params.get("n_votes", int(users.n_votes.sum()))],
        ["ties (counted, left out)", params.get("n_ties")],
        ["input rows", params.get("n_rows")],
        ["pairs", params.get("n_pairs", len(params["mu"]))],
        ["gold labels", params.get("n_gold")],
        ["eta prior", f"Beta({_num(ep.get('a')):.3f}, {_num(ep.get('b')):.3f}) "
                      f"({'learned' if ep.get('learned') else 'fixed'})"],
        ["eta prior mean", f"{_num(ep.get('mean')):.3f}"
                           + (f" {_interval(ep.get('mean_lo'), ep.get('mean_hi'))}" if "mean_lo" in ep else "")],
        ["mean of users' eta_mean", float(users.eta_mean.mean())],
        [f"users with eta_mean < {_num(params.get('casual_threshold'), 0.5):g}",
         params.get("n_inattentive", int((users.eta_mean < _num(params.get("casual_threshold"), 0.5)).sum()))],
    ]
    pb = params.get("position_bias")
    if pb:
        rows.append(["position bias rho (casual users pick the first-shown answer)",
                     f"{_num(pb.get('rho')):.3f} {_interval(pb.get('lo'), pb.get('hi'))}"])
    rows += [
        ["log-likelihood", _num(params.get("log_likelihood"))],
        ["iterations", params.get("iterations")],
        ["converged", params.get("converged")],
        ["interval level", f"{_num(params.get('interval_level'), 0.9):.0%} central"],
        ["priors config", params.get("config")],
        ["device / dtype", f"{params.get('device', '?')} / {params.get('dtype', '?')}"],
        ["fit time (s)", _num(params.get("elapsed_s"))],
        ["heedful version", params.get("heedful_version")],
    ]
    return [r for r in rows if r[1] is not None]


def _report_warnings(users: pd.DataFrame, params: dict) -> list[str]:
    """The fit's warnings plus what the report itself notices."""
    out = [str(w) for w in params.get("warnings") or []]
    if params.get("converged") is False:
        if params.get("method") in ("svi", "nuts"):
            out.append(f"the {params['method']} fit did not pass its checks (see the warnings above and the sampler "
                       "diagnostics): treat its estimates and intervals with care")
        else:
            out.append("the fit did not converge: the estimates below are where the optimiser stopped")
    few = int((users.n_votes < 5).sum())
    if few and few >= 0.2 * len(users):
        out.append(f"{few:,} of {len(users):,} users have fewer than 5 votes: their intervals are wide and their "
                   "eta_mean sits near the prior mean; filter them by P(eta > tau), not by eta_hat")
    return out


def _pairs_rows(params: dict) -> list[list[object]]:
    rows = []
    for p in params["mu"]:
        lo, hi = _num(p.get("mu_lo")), _num(p.get("mu_hi"))
        rows.append([f"{p.get('model_a')} vs {p.get('model_b')}", _num(p.get("mu")), _interval(lo, hi),
                     hi - lo if math.isfinite(lo) and math.isfinite(hi) else None, p.get("n_votes"), p.get("n_ties"),
                     _num(p.get("a_rate")), p.get("source", "")])
    return rows


def _users_tables(users: pd.DataFrame) -> str:
    cols = ["user_id", "n_votes", "eta_hat", "eta_mean", "eta_lo", "eta_hi"]
    order = users.sort_values(["eta_mean", "n_votes"], ascending=[False, False])
    def rows(df: pd.DataFrame) -> list[list[object]]:
        return [[str(r.user_id), int(r.n_votes), float(r.eta_hat), float(r.eta_mean),
                 _interval(r.eta_lo, r.eta_hi)] for r in df[cols].itertuples()]
    head = ["user", "votes", "eta_hat", "eta_mean", "interval"]
    return (f'<div class="cols"><div><h3>most attentive</h3>{_table(head, rows(order.head(TOP_USERS)))}</div>'
            f'<div><h3>least attentive</h3>{_table(head, rows(order.tail(TOP_USERS).iloc[::-1]))}</div></div>')


def _eta_quantiles(users: pd.DataFrame) -> str:
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    rows = []
    for c in ("eta_mean", "eta_hat"):
        rows.append([c, *[float(users[c].quantile(q)) for q in qs], float(users[c].mean())])
    width = users.eta_hi - users.eta_lo
    rows.append(["interval width", *[float(width.quantile(q)) for q in qs], float(width.mean())])
    rows.append(["votes per user", *[float(users.n_votes.quantile(q)) for q in qs], float(users.n_votes.mean())])
    return _table(["", *[f"{q:.0%}" for q in qs], "mean"], rows, digits=3)


def _diagnostics(params: dict) -> str:
    """Sampler diagnostics: a table of the globals (az.summary columns), the users' worst cases, the rest."""
    d = params.get("diagnostics")
    if not d:
        return ""
    parts = ["<h2 id='diagnostics'>Sampler diagnostics</h2>",
             f"<p class='sub'>r_hat above {1.01} means the chains disagree; effective sample sizes (ess) below a "
             "few hundred mean too few independent draws; divergences mean the sampler may have missed part of the "
             "posterior.</p>"]
    glob = d.get("globals")
    if isinstance(glob, dict) and glob:
        cols = [c for c in ("mean", "sd", "hdi_5%", "hdi_95%", "r_hat", "ess_bulk", "ess_tail", "mcse_mean")
                if any(isinstance(v, dict) and c in v for v in glob.values())]
        rows = [[name, *[_num(v.get(c)) if isinstance(v, dict) else None for c in cols]] for name, v in glob.items()]
        parts.append(_table(["parameter", *cols], rows, digits=3))
    users = d.get("users")
    if isinstance(users, dict) and users:
        rows = [[k.replace("_", " "), ", ".join(map(str, v)) if isinstance(v, list) else v] for k, v in users.items()]
        parts.append("<h3>users' eta</h3>" + _table(["", "value"], rows, digits=3))
    rest = []
    for k, v in d.items():
        if k in ("globals", "users", "warnings"):
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
            v = v if len(v) <= 200 else v[:197] + "..."
        rest.append([k.replace("_", " "), v])
    if rest:
        parts.append("<h3>run</h3>" + _table(["", "value"], rest, digits=4))
    return "\n".join(parts)


def build_report(outdir: str | Path, *, title: str | None = None, truth: str | Path | None = None,
                 with_plots_module: bool = True) -> Report:
    """Read a fit's outputs and lay out the page (see the module docstring); nothing is written.

    ``truth``: a simulation's truth file (``heedful simulate`` writes ``*.truth.parquet``) adds the
    reliability figure of :mod:`heedful.plots`. ``with_plots_module=False`` uses the report's own
    figures only.
    """
    outdir = Path(outdir)
    users, params = load_outputs(outdir)
    warnings = _report_warnings(users, params)
    figures = _own_figures(users, params)
    notes: list[str] = []
    if with_plots_module:
        extra, notes = _plots_figures(outdir, truth)
        figures += extra
    if not any(f.source == "heedful.plots" for f in figures):
        extra, more = _posterior_figures(outdir)
        figures += extra
        notes += more
    title = title or f"heedful fit report: {outdir.resolve().name}"
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    level = _num(params.get("interval_level"), 0.9)
    warn_html = ("<div class='warn'><ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>"
                 if warnings else "<div class='ok'>No warnings.</div>")
    fig_html = "".join(
        f"<figure id='fig-{_e(f.key)}'><img alt='{_e(f.title)}' src='{f.data_uri()}'>"
        f"<figcaption><b>Figure {i}. {_e(f.title)}.</b> {_e(f.caption)}</figcaption></figure>"
        for i, f in enumerate(figures, 1))
    notes_html = ("<p class='sub'>" + "<br>".join(_e(n) for n in notes) + "</p>") if notes else ""
    nav = " ".join(f"<a href='#{k}'>{t}</a>" for k, t in (
        ("summary", "Summary"), ("warnings", "Warnings"), ("pairs", "Pairs (mu)"), ("eta", "eta over users"),
        ("users", "Users"), *((("diagnostics", "Sampler diagnostics"),) if params.get("diagnostics") else ()),
        ("figures", "Figures")))
    body = f"""<main>
<h1>{_e(title)}</h1>
<div class="sub">from <code>{_e(outdir)}</code> &middot; generated {now} &middot; {len(figures)} figures</div>
<nav>{nav}</nav>
<h2 id="summary">Summary</h2>
{_table(["", "value"], _summary_rows(users, params))}
<h2 id="warnings">Warnings ({len(warnings)})</h2>
{warn_html}
<h2 id="pairs">Pairs: mu = P(model_a's answer is truly better)</h2>
<p class="sub">{level:.0%} intervals. <i>source</i>: known (fixed in the config), prior (a Beta prior from the
config) or learned. One user's votes identify only eta&nbsp;(mu&nbsp;&minus;&nbsp;1/2): a wide interval for a
learned mu is the data saying so.</p>
{_table(["pair", "mu", "interval", "width", "votes", "ties", "share of votes for model_a", "source"],
        _pairs_rows(params))}
<h2 id="eta">eta over users</h2>
<p class="sub">Quantiles over users of the posterior mean and mode of eta, of the width of the {level:.0%}
interval, and of the votes per user.</p>
{_eta_quantiles(users)}
<h2 id="users">Users</h2>
{_users_tables(users)}
{_diagnostics(params)}
<h2 id="figures">Figures</h2>
{notes_html}
{fig_html}
</main>"""
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")
    return Report(html=page, figures=figures, warnings=warnings, params=params, notes=notes)


def write_report(outdir: str | Path, output: str | Path | None = None, *, title: str | None = None,
                 truth: str | Path | None = None) -> Report:
    """Build the report of ``outdir`` and write it to ``output`` (default ``OUTDIR/report.html``)."""
    rep = build_report(outdir, title=title, truth=truth)
    rep.write(Path(output) if output is not None else Path(outdir) / "report.html")
    return rep


__all__ = ["Figure", "Report", "build_report", "load_outputs", "write_report"]
