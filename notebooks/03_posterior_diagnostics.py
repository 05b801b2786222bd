# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Posterior diagnostics: EM, marginal, SVI and NUTS on the same votes
#
# heedful fits the same behaviour model four ways (`method=`):
#
# | method | what it computes | per-user uncertainty |
# |---|---|---|
# | `em` | the paper's EM: MAP of every $\eta_u$ and $\mu$, population prior fixed (Beta(1, 1) unless the config fixes one) | $\eta_u$'s posterior given the MAP globals |
# | `marginal` | exact-marginal empirical Bayes: every $\eta_u$, $z_n$ integrated out; $\mu$, $a$, $b$ maximised | exact posterior given the globals; globals' intervals from the curvature |
# | `svi` | variational posterior over every $\eta_u$ and the globals | the variational distribution |
# | `nuts` | Hamiltonian Monte Carlo over the globals (and, in the full form, every $\eta_u$); $z_n$ summed out | posterior draws: uncertainty of the globals propagated |
#
# The point estimates should agree closely; the sampling methods add the uncertainty of $\mu$, $a$
# and $b$ to every user's interval. A sampler's output is only trustworthy when its diagnostics are:
# $\hat R \le 1.01$ (the chains agree), a bulk and tail effective sample size of a few hundred, no
# divergent transitions. We look at them with ArviZ: summaries, trace and rank plots, a forest plot
# of users' $\eta$, and a posterior predictive check.
#
# Set `HEEDFUL_NB_SMALL=1` for a small, fast run (the CI does; its chains are too short for the
# diagnostics to pass, and the notebook says so rather than hiding it).

# %%
import logging
import os
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm's notebook probe, via pyro
warnings.filterwarnings("ignore", category=FutureWarning)            # arviz 0.x's notices about 1.x
warnings.filterwarnings("ignore", message="All-NaN")                  # r_hat of a single-chain method is NaN

import heedful  # noqa: F401  (import before torch: sets OpenMP's passive wait policy)
import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from heedful.config import Priors
from heedful.errors import InputError
from heedful.inference import Attentiveness
from heedful.simulate import simulate

# arviz 0.x logs through its own logger object (az._log), not logging.getLogger("arviz"): quiet its
# "shape validation" notice about the one-chain SVI draws
getattr(az, "_log", logging.getLogger("arviz")).setLevel(logging.ERROR)

SMALL = os.environ.get("HEEDFUL_NB_SMALL", "0") == "1"
USERS, VOTES = (300, 15) if SMALL else (2000, 20)
SAMPLER = dict(chains=2, draws=60, warmup=60) if SMALL else dict(chains=4, draws=1000, warmup=500)
TRUE_MU, TRUE_AB = 0.8, (3.0, 5.0)
# Collapsed NUTS costs grow with the number of distinct per-user count patterns: equal vote counts
# give few patterns and keep the run affordable on a laptop (heavy-tailed counts: see notebook 01).
COUNTS = "fixed"
sim = simulate(USERS, VOTES, mu=TRUE_MU, eta_prior=TRUE_AB, vote_counts=COUNTS, seed=11)
votes, truth = sim.votes, sim.users
print(f"{len(votes):,} votes of {USERS:,} users ({COUNTS} counts, mean {VOTES}); true mu {TRUE_MU}, "
      f"eta ~ Beta{TRUE_AB}; sampler {SAMPLER}")

# %% [markdown]
# ## 1. Four fits
#
# The sampling methods need their modules (`heedful.inference.svi`, `heedful.inference.nuts`); a
# method this installation lacks is reported and skipped.

# %%
OPTIONS = {"em": {}, "marginal": {}, "svi": {"seed": 1}, "nuts": {**SAMPLER, "seed": 1, "form": "collapsed"}}
fits, elapsed = {}, {}
for method, opts in OPTIONS.items():
    t0 = time.perf_counter()
    try:
        fits[method] = Attentiveness(method=method, priors=Priors(), options=opts).fit(votes)
    except InputError as e:
        print(f"{method}: skipped ({e})")
        continue
    elapsed[method] = time.perf_counter() - t0
    print(f"{method:8s} {elapsed[method]:6.1f} s, converged: {fits[method].converged_}")

# %%
rows = []
for method, m in fits.items():
    u = m.users_.merge(truth, on="user_id")
    p = m.pairs_.iloc[0]
    rows.append({"method": method, "mu": p.mu, "mu interval": f"[{p.mu_lo:.3f}, {p.mu_hi:.3f}]",
                 "a": m.eta_prior_["a"], "b": m.eta_prior_["b"], "mean eta": m.eta_prior_["mean"],
                 "MAE eta_mean": float(np.mean(np.abs(u.eta_mean - u.true_eta))),
                 "90% coverage": float(np.mean((u.eta_lo <= u.true_eta) & (u.true_eta <= u.eta_hi))),
                 "mean width": float(np.mean(u.eta_hi - u.eta_lo)), "seconds": elapsed[method]})
compare = pd.DataFrame(rows).set_index("method")
print(f"truth: mu {TRUE_MU}, a {TRUE_AB[0]}, b {TRUE_AB[1]}, mean eta {TRUE_AB[0] / sum(TRUE_AB):.3f}")
compare.round(3)

# %% [markdown]
# `MAE eta_mean` is the mean absolute error of the users' posterior means against the true $\eta$;
# `90% coverage` the share of users whose 90% interval holds the truth (0.9 is the target).
#
# Where the rows differ, the ridge of notebook 02 is at work: with $\mu$ learned, $\mu$ and the scale
# of $\eta$ trade against each other, and each method settles somewhere different along it. EM fixes
# the population prior at Beta(1, 1) and maximises jointly over every $\eta_u$ and $\mu$; that joint
# maximum can run to the boundary $\mu = 1$. The marginal fit's interval for $\mu$ comes from the
# curvature at its maximum; NUTS's interval is the spread of its draws along the ridge, the honest
# one when the likelihood is flat. Compare their `mu interval`s.
#
# ## 2. Do the methods agree, user by user?

# %%
ref = fits["marginal"].users_.set_index("user_id")
others = [m for m in fits if m != "marginal"]
fig, axes = plt.subplots(1, len(others), figsize=(4.2 * len(others), 4), squeeze=False)
for ax, method in zip(axes[0], others, strict=True):
    u = fits[method].users_.set_index("user_id").loc[ref.index]
    ax.scatter(ref.eta_mean, u.eta_mean, s=6, alpha=0.5)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    mad = float(np.mean(np.abs(u.eta_mean - ref.eta_mean)))
    ax.set(xlabel="marginal: eta_mean", ylabel=f"{method}: eta_mean", title=f"{method}: mean |diff| {mad:.3f}")
plt.show()
widths = pd.DataFrame({m: (f.users_.eta_hi - f.users_.eta_lo).to_numpy() for m, f in fits.items()})
print("median width of users' 90% intervals:", widths.median().round(3).to_dict())

# %% [markdown]
# ## 3. ArviZ: the sampler's diagnostics
#
# The sampling methods keep their draws in an ArviZ `InferenceData` (`model.inference_data_`, saved
# as `posterior.nc` by `heedful fit`). It holds the posterior of the globals and of users' $\eta$,
# sample statistics (divergences), the observed per-user choice counts, the pointwise
# log-likelihood and posterior predictive replicates.

# %%
sampled = [m for m in ("nuts", "svi") if m in fits and fits[m].inference_data_ is not None]
idata = fits[sampled[0]].inference_data_ if sampled else None
if idata is None:
    print("no sampling method in this installation: the ArviZ sections below are skipped")
else:
    print(f"InferenceData of {sampled[0]}: groups {list(idata.groups())}")
    globals_ = [v for v in ("a", "b", "mu", "rho") if v in idata.posterior]
    summary = az.summary(idata, var_names=globals_, hdi_prob=0.9)
    display(summary)  # noqa: F821  (IPython's display)

# %% [markdown]
# `r_hat` compares the chains (above 1.01: they have not mixed); `ess_bulk`/`ess_tail` say how many
# independent draws the chains are worth for the centre and the tails of each posterior. The fit's
# own verdict, with the thresholds applied, is in `diagnostics_` (and in `params.json`):

# %%
if idata is not None:
    diag = fits[sampled[0]].diagnostics_
    print({k: diag.get(k) for k in ("max_r_hat", "min_ess_bulk", "min_ess_tail", "divergences")})
    for w in diag.get("warnings", []):
        print("warning:", w)

# %% [markdown]
# **Trace and rank plots.** The trace shows each chain's draws over time (they should look like
# overlapping, stationary noise) and the marginal density per chain; the rank plot histograms each
# chain's ranks among all draws (flat bars: the chains sample the same distribution).

# %%
if idata is not None and "chain" in idata.posterior.dims:
    az.plot_trace(idata, var_names=globals_, compact=True, figsize=(11, 2.2 * len(globals_)))
    plt.tight_layout()
    plt.show()
    if idata.posterior.sizes["chain"] > 1:
        az.plot_rank(idata, var_names=globals_, figsize=(11, 2.6))
        plt.show()

# %% [markdown]
# **Forest plot of users' $\eta$.** The ten most and the ten least attentive users by posterior mean,
# with 90% intervals per chain. Users with few votes have wide intervals even at the extremes.

# %%
if idata is not None and "eta" in idata.posterior:
    means = idata.posterior["eta"].mean(("chain", "draw")).to_series().sort_values()
    pick = list(means.index[-10:][::-1]) + list(means.index[:10][::-1])
    n_votes = fits[sampled[0]].users_.set_index("user_id").n_votes
    ax = az.plot_forest(idata, var_names=["eta"], coords={"user": pick}, hdi_prob=0.9, combined=False,
                        figsize=(7, 7))
    ax[0].set_title("eta: 10 most and 10 least attentive users (90% HDI per chain)")
    plt.show()
    print("their votes:", {u: int(n_votes[u]) for u in pick})

# %% [markdown]
# **Posterior predictive check.** For every draw, replicate each user's picks of the favoured model
# from the model and compare the distribution of per-user choice rates with the observed one. A
# model that missed the population's shape (say, a mixture of attentive and casual users fitted with
# one Beta) shows it here.

# %%
if idata is not None and "posterior_predictive" in idata.groups():
    az.plot_ppc(idata, var_names=["choice_rate"], num_pp_samples=100, figsize=(8, 4))
    plt.xlabel("per-user rate of picking the favoured model")
    plt.show()

# %% [markdown]
# ## 4. The same figures from the command line
#
# `heedful fit --method nuts` writes `posterior.nc` beside `users.parquet` and `params.json`;
# `heedful plot OUTDIR` writes these diagnostics as PNGs, and `heedful report OUTDIR` puts them, the
# summary tables and the sampler diagnostics into one offline HTML page. Here we save the NUTS fit
# from above the way `heedful fit` does and build its report.

# %%
import subprocess
import sys
import tempfile
from pathlib import Path

from heedful.outputs import write_fit, write_inference_data

if idata is not None:
    out = Path(os.environ.get("HEEDFUL_NB_OUT") or tempfile.mkdtemp(prefix="heedful-nb03-")) / "fit-sampled"
    model = fits[sampled[0]]
    write_inference_data(out / "posterior.nc", model.inference_data_)
    write_fit(out, model.users_, model.params())
    truth_path = out.parent / "truth.parquet"
    truth.to_parquet(truth_path)
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")}
    run = subprocess.run([str(Path(sys.executable).with_name("heedful")), "report", str(out), "--truth", str(truth_path)],
                         capture_output=True, text=True, check=True,
                         env=env | {"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "110"})
    print(run.stdout.replace(str(out.parent), "$OUT"))
