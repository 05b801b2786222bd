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
# # 01 · Quickstart: from comparison-mode votes to clean DPO data
#
# Chat products show two answers side by side and ask which one is better. When the two answers come
# from two *different* models, an attentive user's picks lean toward the stronger model; a casual
# user's picks do not. heedful fits a **user behaviour model** to such votes:
#
# * every user $u$ has an attentiveness $\eta_u \in [0, 1]$, drawn from a population prior
#   $\mathrm{Beta}(a, b)$;
# * on each vote the user is attentive with probability $\eta_u$ (a latent flag $z_n$, summed out
#   exactly, never sampled);
# * for a pair of models $(A, B)$, $\mu_{AB}$ is the probability that $A$'s answer is truly better;
# * attentive users pick the truly better answer, casual users flip a coin:
#
# $$P(y_n = A \mid \eta_u) = \eta_u\,\mu_{AB} + (1 - \eta_u)\,\tfrac12 .$$
#
# This notebook runs the whole pipeline on a log with **real text**: the first turns of MT-bench's
# 80 questions and the real answers of six models of very different strength. The users are simulated
# (no public comparison-mode log with user ids exists), so we can check every estimate against the
# truth: load votes → fit → look at users → filter → export DPO records → HTML report.
#
# Set `HEEDFUL_NB_SMALL=1` to run it at a small size (the CI does).

# %%
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import warnings

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm's notebook probe, via pyro

import heedful  # noqa: F401  (import before torch: sets OpenMP's passive wait policy)
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from heedful.dpo import dpo_records, write_dpo
from heedful.filtering import Rule, filter_votes, fit_of
from heedful.inference import Attentiveness
from heedful.mtbench import agreement, default_data_dir, pair_mu, simulate_mtbench
from heedful.outputs import write_fit, write_table

SMALL = os.environ.get("HEEDFUL_NB_SMALL", "0") == "1"
OUT = Path(os.environ.get("HEEDFUL_NB_OUT") or tempfile.mkdtemp(prefix="heedful-nb01-"))
OUT.mkdir(parents=True, exist_ok=True)
USERS, VOTES_PER_USER = (600, 10) if SMALL else (3000, 12)
pd.set_option("display.max_colwidth", 60)
print(f"small={SMALL}; {USERS} users, ~{VOTES_PER_USER} votes each; files under {OUT}")

# %% [markdown]
# ## 1. The votes
#
# `simulate_mtbench` picks a question, a pair of models, and a user; the user is attentive with
# probability $\eta_u$ (60% of users are of an "attentive" type with $\eta \sim \mathrm{Beta}(8, 2)$,
# the others "casual" with $\eta \sim \mathrm{Beta}(1, 5)$), and votes per user are heavy-tailed. The
# true $\mu$ of a pair comes from the published MT-bench scores. The vote table has the columns every
# heedful tool reads (`user_id`, `model_a`, `model_b`, `choice`) plus the text and the truth.

# %%
data_dir = default_data_dir()
sim, corpus = simulate_mtbench(USERS, VOTES_PER_USER, data_dir=data_dir, seed=0)
votes, truth = sim.votes, sim.users
print("text:", "real MT-bench answers from " + str(data_dir) if corpus.real else "synthetic placeholders")
print(f"{len(votes):,} rows, {votes.user_id.nunique():,} users, {(votes.choice == 'tie').sum():,} ties")
votes[["user_id", "model_a", "model_b", "choice", "shown_first", "prompt", "response_a"]].head(4)

# %%
votes_path = OUT / "votes.parquet"
write_table(votes_path, votes)
per_user = votes.groupby("user_id").size()
print("votes per user: " + ", ".join(f"{q:.0%} {per_user.quantile(q):.0f}" for q in (0.1, 0.5, 0.9, 0.99)))

# %% [markdown]
# ## 2. Fit
#
# The default method, `marginal`, integrates every $\eta_u$ and every $z_n$ out exactly and maximises
# the marginal likelihood over the $\mu$'s and the population prior $(a, b)$. Nothing is fixed here:
# every $\mu$ is learned. `fit` returns the estimator (crowd-kit style), with the results in
# attributes ending in `_`.

# %%
model = Attentiveness(method="marginal").fit(votes)
print(f"{model.n_iter_} iterations, converged: {model.converged_}, log-likelihood {model.log_likelihood_:,.1f}")
ep = model.eta_prior_
print(f"eta prior Beta({ep['a']:.2f}, {ep['b']:.2f}), mean {ep['mean']:.3f}")
for w in model.warnings_:
    print("warning:", w)

# %% [markdown]
# Pairs are reported in alphabetical order of the two model names, whatever order the votes list
# them in; `mu` is the probability that `model_a` (the first name) is truly better. Below, the true
# $\mu$ in the same orientation sits beside the estimate and its 90% interval.

# %%
true_mu = {}
for strong, weak, m in pair_mu():
    a, b = sorted((strong, weak))
    true_mu[(a, b)] = m if a == strong else 1 - m
pairs = model.pairs_.assign(true_mu=[true_mu[(r.model_a, r.model_b)] for r in model.pairs_.itertuples()])
pairs["covered"] = (pairs.mu_lo <= pairs.true_mu) & (pairs.true_mu <= pairs.mu_hi)
pairs[["model_a", "model_b", "n_votes", "a_rate", "mu", "mu_lo", "mu_hi", "true_mu", "covered"]].round(3)

# %% [markdown]
# `a_rate` is the raw share of votes for `model_a`: it is pulled toward 1/2 by the casual votes.
# The model undoes that pull: $\hat\mu$ lies further from 1/2 than the raw rate.
#
# ## 3. Users
#
# `users_` has one row per user: the posterior mode `eta_hat`, the posterior mean `eta_mean` and a
# central 90% interval. Users with few votes have wide intervals; that is the data speaking.

# %%
users = model.users_.merge(truth, on="user_id")
inside = ((users.true_eta >= users.eta_lo) & (users.true_eta <= users.eta_hi)).mean()
corr = np.corrcoef(users.eta_mean, users.true_eta)[0, 1]
print(f"correlation of eta_mean with the true eta: {corr:.3f}")
print(f"90% intervals that hold the true eta: {inside:.1%}")
users.sort_values("n_votes", ascending=False).head(5).round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
ax = axes[0]
MANY = 20   # intervals drawn for users with at least this many votes (the rest: posterior means only)
for kind, colour in (("attentive", "tab:blue"), ("casual", "tab:red")):
    u = users[users.true_type == kind]
    ax.scatter(u.true_eta, u.eta_mean, s=4, alpha=0.35, color=colour, label=f"{kind} type")
    v = u[u.n_votes >= MANY]
    ax.errorbar(v.true_eta, v.eta_mean, yerr=[v.eta_mean - v.eta_lo, v.eta_hi - v.eta_mean], fmt="o",
                ms=3, alpha=0.8, color=colour, lw=0.8)
ax.plot([0, 1], [0, 1], "k--", lw=1)
ax.set(xlabel="true eta", ylabel="posterior mean of eta",
       title=f"eta vs the truth (bars: 90% intervals, users with >= {MANY} votes)")
ax.legend()
ax = axes[1]
ax.scatter(users.n_votes, users.eta_hi - users.eta_lo, s=5, alpha=0.4)
ax.set(xscale="log", xlabel="votes of the user", ylabel="width of the 90% interval",
       title="intervals narrow as votes accumulate")
plt.show()

# %% [markdown]
# The true population is a *mixture* (attentive and casual types); the fit assumes one Beta prior, so
# it is misspecified on purpose, as real data will be. The per-user posteriors still separate the two
# types, because each user's own votes dominate once there are a handful of them.
#
# ## 4. Filter and export
#
# Filtering is per user. Three rules: a threshold on `eta_hat`, a posterior probability
# $P(\eta_u > \tau \mid \text{votes}) \ge p$, or "keep the most attentive users holding a fraction of
# the votes". Each kept vote carries $\epsilon_u = (1 - \eta_u)/2$, the probability that its label is
# flipped against the truth under the model (the flip rate that robust DPO takes). Because the truth
# is known here, we can score each rule by the share of kept labels that agree with it.

# %%
fit = fit_of(model)
n_all, agree_all = agreement(votes)
rows = [("all non-tie votes", n_all, agree_all)]
results = {}
for rule in (Rule(min_eta=0.5), Rule(min_prob=0.9, tau=0.5), Rule(keep_fraction=0.5)):
    res = filter_votes(votes, fit, rule)
    results[rule.describe()] = res
    n, agree = agreement(votes, res.kept.row.to_numpy())
    rows.append((rule.describe(), n, agree))
table = pd.DataFrame(rows, columns=["kept by", "votes kept", "labels agreeing with the truth"])
table["share kept"] = table["votes kept"] / n_all
table.round(3)

# %%
assert table["labels agreeing with the truth"].iloc[1:].min() > agree_all, "filtering should clean the labels"
res = results["P(eta > 0.5) >= 0.9"]
print("audit (every input row once):", {k: v for k, v in res.counts.items() if v})
records = dpo_records(res.kept)            # TRL's DPO format: prompt / chosen / rejected (+ user_id, epsilon)
write_dpo(OUT / "dpo.jsonl", records)
print(f"wrote {len(records):,} DPO records to {OUT / 'dpo.jsonl'}")
records.iloc[0].to_dict() | {k: records.iloc[0][k][:100] + "..." for k in ("prompt", "chosen", "rejected")}

# %% [markdown]
# ## 5. The same from the command line, and the HTML report
#
# `heedful fit` writes `users.parquet` and `params.json`; `heedful report` turns them into one
# self-contained HTML page (tables and figures embedded; it opens offline).

# %%
heedful_cli = str(Path(sys.executable).with_name("heedful"))
fit_dir = OUT / "fit"
for cmd in ([heedful_cli, "fit", str(votes_path), "-o", str(fit_dir)],
            [heedful_cli, "report", str(fit_dir), "-o", str(OUT / "report.html")]):
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")}
    run = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=env | {"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "110"})
    print("$", " ".join(Path(c).name if i == 0 else c.replace(str(OUT), "$OUT") for i, c in enumerate(cmd)))
    print(run.stdout.replace(str(OUT), "$OUT"))
write_fit(OUT / "fit-python", model.users_, model.params())   # the Python route writes the same files
print(f"report: {OUT / 'report.html'} ({(OUT / 'report.html').stat().st_size / 1024:.0f} KiB)")
