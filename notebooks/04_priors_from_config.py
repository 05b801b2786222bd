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
# # 04 · Priors from the config file, and what each one does
#
# Everything heedful assumes about a log lives in one TOML file, passed as `heedful fit --config
# priors.toml` or loaded with `heedful.config.load_priors`. Distribution strings such as
# `"Beta(3, 5)"` are parsed through an allow-list, never evaluated. The sections:
#
# * `[population] eta`: the prior of the attentiveness $\eta_u$: `"learn"` (the default: estimate
#   $a$ and $b$) or a fixed `"Beta(a, b)"`;
# * `[[pairs]] mu`: per pair, $\mu$ *known* (a number), given a *prior* (`"Beta(8, 2)"`), or learned
#   (pairs not listed);
# * `[behaviour] casual`: `"uniform"` (casual users flip a coin) or `"position"` (they pick the
#   first-shown answer with probability $\rho$, learned);
# * `[generators] mu`: `"pairs"` (one $\mu$ per pair) or `"strengths"` ($\mu_{AB} = \sigma(s_A - s_B)$).
#
# We simulate one log and fit it under each config, then compare the estimates with the truth.
# Set `HEEDFUL_NB_SMALL=1` for a small, fast run (the CI does).

# %%
import os
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm's notebook probe, via pyro

import heedful  # noqa: F401  (import before torch: sets OpenMP's passive wait policy)
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from heedful.config import load_priors
from heedful.inference import Attentiveness
from heedful.simulate import default_pairs, default_strengths, pairs_from_strengths, simulate

SMALL = os.environ.get("HEEDFUL_NB_SMALL", "0") == "1"
OUT = Path(os.environ.get("HEEDFUL_NB_OUT") or tempfile.mkdtemp(prefix="heedful-nb04-"))
OUT.mkdir(parents=True, exist_ok=True)
USERS, VOTES = (800, 15) if SMALL else (4000, 20)
TRUE_AB = (3.0, 5.0)
PAIRS = default_pairs(3, 0.8)            # model-00 vs model-01: mu 0.6; 02 vs 03: 0.75; 04 vs 05: 0.9
sim = simulate(USERS, VOTES, eta_prior=TRUE_AB, pairs=PAIRS, seed=4)
votes, truth = sim.votes, sim.users
TRUE_MU = {(a, b): m for a, b, m in PAIRS}
print(f"{len(votes):,} votes of {USERS:,} users on {len(PAIRS)} pairs; true mu {list(TRUE_MU.values())}; "
      f"eta ~ Beta{TRUE_AB}; casual users flip a coin")

# %% [markdown]
# ## The configs
#
# Each config is a few lines of TOML. `None` means no file at all: everything learned.

# %%
CONFIGS = {
    "defaults (all learned)": None,
    "eta fixed Beta(3, 5)": '[population]\neta = "Beta(3, 5)"\n',
    "one mu known (0.9)": '[[pairs]]\nmodel_a = "model-04"\nmodel_b = "model-05"\nmu = 0.9\n',
    "one mu known, wrong (0.7)": '[[pairs]]\nmodel_a = "model-04"\nmodel_b = "model-05"\nmu = 0.7\n',
    "every mu ~ Beta(8, 2)": "".join(
        f'[[pairs]]\nmodel_a = "{a}"\nmodel_b = "{b}"\nmu = "Beta(8, 2)"\n\n' for a, b, _ in PAIRS),
}


def priors_of(name: str):
    """Write the config to a file and load it the way `heedful fit --config` does."""
    text = CONFIGS[name]
    if text is None:
        return load_priors(None)
    path = OUT / (name.split(" (")[0].replace(" ", "_").replace(",", "") + ".toml")
    path.write_text(text, encoding="utf-8")
    return load_priors(path)


print(CONFIGS["one mu known (0.9)"])

# %%
fits, rows = {}, []
for name in CONFIGS:
    model = Attentiveness(priors=priors_of(name)).fit(votes)
    fits[name] = model
    u = model.users_.merge(truth, on="user_id")
    ep = model.eta_prior_
    row = {"config": name, "a": ep["a"], "b": ep["b"], "mean eta": ep["mean"]}
    for r in model.pairs_.itertuples():
        row[f"mu {r.model_a[-2:]}/{r.model_b[-2:]}"] = f"{r.mu:.3f} [{r.mu_lo:.2f}, {r.mu_hi:.2f}] {r.source}"
    row["MAE eta_u"] = float(np.mean(np.abs(u.eta_mean - u.true_eta)))
    row["90% coverage eta_u"] = float(np.mean((u.eta_lo <= u.true_eta) & (u.true_eta <= u.eta_hi)))
    row["warnings"] = len(model.warnings_)
    rows.append(row)
summary = pd.DataFrame(rows).set_index("config")
print(f"truth: a = {TRUE_AB[0]}, b = {TRUE_AB[1]}, mean eta = {TRUE_AB[0] / sum(TRUE_AB):.3f}")
summary.round(3)

# %% [markdown]
# How to read it (the truth: $\mu$ = 0.6, 0.75, 0.9; $E[\eta]$ = 0.375):
#
# * **defaults**: every $\mu$ and $(a, b)$ learned. $\mu$ and the scale of $\eta$ trade along the
#   ridge of notebook 02, so the intervals of the $\mu$'s are wide.
# * **eta fixed**: fixing the population prior fixes the scale of $\eta$, and with it every $\mu$.
# * **one $\mu$ known**: all users share one $\eta_u$ across pairs, so knowing *one* pair's $\mu$ pins
#   the scale of every $\eta_u$, and through them the other pairs' $\mu$'s: their intervals shrink too.
# * **one $\mu$ known, but wrong**: the same mechanism in reverse. Fixing 0.7 for a true 0.9 tells
#   the model the gap $\mu - \frac12$ is half the truth, so every $\eta_u$ is pushed up to make up for it
#   (toward $2\eta_u$, capped at 1) and the other $\mu$'s shrink toward 1/2. No warning flags it (the
#   `warnings` column): a known $\mu$ must be known.
# * **every $\mu$ ~ Beta(8, 2)**: a prior, not a fixed value. It keeps each $\mu$ off the far ends of
#   the ridge, so its intervals are narrower than with everything learned, and wider than with a
#   known $\mu$ or a fixed $\eta$ prior.

# %%
names = list(CONFIGS)
fig, axes = plt.subplots(1, len(PAIRS), figsize=(13, 3.8), sharey=True)
for ax, (a, b, m_true) in zip(axes, PAIRS, strict=True):
    for i, name in enumerate(names):
        p = fits[name].pairs_.set_index(["model_a", "model_b"]).loc[(a, b)]
        known = p.source == "known"
        ax.plot([p.mu_lo, p.mu_hi], [i, i], color="tab:blue", lw=2.5)
        ax.plot(p.mu, i, "D" if known else "o", color="tab:green" if known else "tab:blue")
    ax.axvline(m_true, color="red", ls="--", label="true mu")
    ax.set(title=f"{a} vs {b}", xlabel="mu with 90% interval", xlim=(0.45, 1.0))
axes[0].set_yticks(range(len(names)), names)
axes[0].invert_yaxis()
axes[-1].legend(loc="lower left", fontsize=8)
plt.show()

# %% [markdown]
# Per-user $\eta$: the posterior means against the truth, under the defaults, a correct known $\mu$,
# and a wrong one. The wrong $\mu$ bends the whole cloud upward.

# %%
show = ["defaults (all learned)", "one mu known (0.9)", "one mu known, wrong (0.7)"]
fig, axes = plt.subplots(1, len(show), figsize=(13, 4), sharey=True)
for ax, name in zip(axes, show, strict=True):
    u = fits[name].users_.merge(truth, on="user_id")
    ax.scatter(u.true_eta, u.eta_mean, s=5, alpha=0.4)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    mae = summary.loc[name, "MAE eta_u"]
    ax.set(title=f"{name}\nMAE {mae:.3f}", xlabel="true eta", xlim=(0, 1), ylim=(0, 1))
axes[0].set_ylabel("eta_mean")
plt.show()

# %% [markdown]
# ## Position bias: `[behaviour] casual = "position"`
#
# Real casual users often favour the answer shown first. When the votes say which side was shown
# first (`shown_first`), `casual = "position"` replaces the coin by $\rho$ = P(a casual pick goes to
# the first-shown answer), learned. Position is randomised independently of which model is stronger,
# so $\rho$ is identified from the casual users' position-correlated picks. A second log, in which
# every casual pick goes to the first-shown answer with probability 0.85, fitted with and without it:

# %%
sim_pos = simulate(USERS, VOTES, eta_prior=TRUE_AB, pairs=PAIRS, position_share=1.0, position_rho=0.85, seed=6)
CONFIGS |= {"coin (uniform)": None, "position": '[behaviour]\ncasual = "position"\n'}
rows = []
for name in ("coin (uniform)", "position"):
    model = Attentiveness(priors=priors_of(name)).fit(sim_pos.votes)
    u = model.users_.merge(sim_pos.users, on="user_id")
    rows.append({"config": name, "rho": model.rho_["rho"] if model.rho_ else np.nan,
                 "rho interval": f"[{model.rho_['lo']:.3f}, {model.rho_['hi']:.3f}]" if model.rho_ else "",
                 "mean eta": model.eta_prior_["mean"],
                 **{f"mu {r.model_a[-2:]}/{r.model_b[-2:]}": r.mu for r in model.pairs_.itertuples()},
                 "MAE eta_u": float(np.mean(np.abs(u.eta_mean - u.true_eta))),
                 "warnings": len(model.warnings_)})
print(f"truth: rho 0.85, mean eta {TRUE_AB[0] / sum(TRUE_AB):.3f}, mu {[m for *_, m in PAIRS]}")
pd.DataFrame(rows).set_index("config").round(3)

# %% [markdown]
# One $\rho$ assumes every casual user shares the same bias. When only some users are biased, that
# model is misspecified; the config offers `rho_per_user = "learn"` (a Beta distribution of per-user
# $\rho_u$). As with every prior here, check on a simulated log shaped like yours that it helps
# before trusting it.

# %% [markdown]
# ## Many models: `[generators] mu = "strengths"`
#
# With several generators compared in many pairs, one strength per model replaces one $\mu$ per pair:
# $\mu_{AB} = \sigma(s_A - s_B)$, with one reference model at 0. $P$ free asymmetries become $M - 1$
# strengths, so the pairs constrain each other. The overall scale of the strengths still trades
# against $\eta$ (a known pair cannot be combined with strengths; a fixed $\eta$ prior or gold votes
# pin the scale).

# %%
strengths = default_strengths(4)
sim4 = simulate(USERS, VOTES, eta_prior=TRUE_AB, pairs=pairs_from_strengths(strengths), seed=5)
CONFIGS |= {
    "pairs (one mu per pair)": None,
    "strengths": '[generators]\nmu = "strengths"\nreference = "gen-3"\n',
    "eta fixed + strengths": '[population]\neta = "Beta(3, 5)"\n\n[generators]\nmu = "strengths"\nreference = "gen-3"\n',
}
rows = []
for name in ("pairs (one mu per pair)", "strengths", "eta fixed + strengths"):
    model = Attentiveness(priors=priors_of(name)).fit(sim4.votes)
    truth_mu = {(a, b): m for a, b, m in pairs_from_strengths(strengths)}
    p = model.pairs_
    true = np.array([truth_mu.get((r.model_a, r.model_b), np.nan) for r in p.itertuples()])
    rows.append({"config": name, "MAE mu": float(np.mean(np.abs(p.mu - true))),
                 "mean width of mu intervals": float(np.mean(p.mu_hi - p.mu_lo)),
                 "mean eta": model.eta_prior_["mean"],
                 "strengths": ", ".join(f"{k} {v['strength']:.2f}" for k, v in (model.strengths_ or {}).items())})
print("true strengths:", ", ".join(f"{k} {v:.2f}" for k, v in strengths.items()))
pd.DataFrame(rows).set_index("config").round(3)
