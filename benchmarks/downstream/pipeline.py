"""One seed of the downstream benchmark: split, simulate users, fit heedful, select, train, evaluate.

Per seed s: the items are split (``test_frac`` held out, scored against gold only); one simulated
user votes on each training item; heedful is fitted to those votes (contract columns only: no truth,
no gold); the training sets below are built from the same votes; one reward head is trained on each
and its pairwise accuracy on the held-out gold pairs recorded.

Training sets (labels are the users' picks unless said otherwise):
- ``gold``: every training item with its gold label (a ceiling, not available in practice);
- ``all``: every vote;
- ``oracle``: the votes of users drawn from the attentive component (the truth, not available);
- ``heedful@tau``: the votes of users with posterior mean eta >= tau;
- ``random@tau``: a uniformly random subset of the votes, of the same size as ``heedful@tau``;
- ``agreement@tau``: the votes of the users who most often picked the pair's vote-majority model
  (raw agreement rate, ties broken by more votes first), cut to the same size as ``heedful@tau``;
- ``rbt`` / ``cbt``: every vote with the robust / conservative loss and per-vote flip rate
  eps_n = (1 - eta_mean_u) / 2 (rBT's clipped at ``eps_max``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from benchmarks.downstream.data import gold_mu, ordered_pair
from benchmarks.downstream.reward import train_reward
from benchmarks.downstream.users import CONTRACT, Population, simulate_votes
from heedful.config import PairPrior, Priors
from heedful.errors import ConfigError
from heedful.inference import Attentiveness


@dataclass(frozen=True)
class Settings:
    """Everything one run of the benchmark depends on (defaults: the README's table)."""

    test_frac: float = 0.25
    taus: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    population: Population = field(default_factory=Population)
    mu: str = "known"             # "known": gold pair win rates; "learn": one mu per pair; "strengths": BT
    gold_fraction: float = 0.0    # share of training votes whose gold label heedful sees (``gold`` column)
    casual: str = "auto"          # "auto": "position" when this heedful supports it, else "uniform"
    head: str = "linear"
    l2: float = 1e-3
    eps_max: float = 0.45
    min_train: int = 20


@dataclass(frozen=True)
class Selection:
    """One training set: rows of the vote table, their labels' source, loss and flip rates."""

    method: str
    tau: float
    rows: np.ndarray
    loss: str = "bt"
    eps: np.ndarray | None = None
    gold_labels: bool = False


def casual_mode(requested: str) -> str:
    """``position`` when asked (or ``auto``) and this heedful's config accepts it, else ``uniform``."""
    if requested == "uniform":
        return "uniform"
    try:
        Priors(casual="position")
    except ConfigError:
        if requested == "position":
            raise
        return "uniform"
    return "position"


def heedful_priors(items: pd.DataFrame, settings: Settings) -> Priors:
    """Priors for the fit: eta prior learned; mu per pair fixed to the gold pair win rates of all items
    (``known``: what a leaderboard gives), learned per pair (``learn``), or learned as Bradley-Terry
    generator strengths mu_AB = sigmoid(s_A - s_B) (``strengths``)."""
    pairs: tuple[PairPrior, ...] = ()
    mu_model = "pairs"
    if settings.mu == "known":
        g = gold_mu(items)
        pairs = tuple(PairPrior(r.model_a, r.model_b, mu=float(np.clip(r.mu, 0.02, 0.98))) for r in g.itertuples())
    elif settings.mu == "strengths":
        mu_model = "strengths"
    elif settings.mu != "learn":
        raise ValueError(f"mu must be 'known', 'learn' or 'strengths', not {settings.mu!r}")
    return Priors(casual=casual_mode(settings.casual), pairs=pairs, mu_model=mu_model)


def agreement_score(votes: pd.DataFrame) -> pd.Series:
    """Per vote, its user's raw rate of picking the pair's vote-majority model (no model, no gold)."""
    picked = np.where(votes.choice == "a", votes.model_a, votes.model_b)
    lo, hi = ordered_pair(votes.model_a, votes.model_b)
    pair = pd.Series(lo + "|" + hi, index=votes.index)
    picked_lo = pd.Series(picked == lo, index=votes.index)
    majority_lo = picked_lo.groupby(pair).transform("mean") >= 0.5
    agree = picked_lo == majority_lo
    return agree.groupby(votes.user_id).transform("mean")


def user_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUC of ``score`` for telling ``positive`` users apart (Mann-Whitney, ties count 1/2)."""
    from scipy.stats import rankdata

    pos = positive.astype(bool)
    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def selections(votes: pd.DataFrame, users: pd.DataFrame, settings: Settings,
               rng: np.random.Generator) -> list[Selection]:
    """The training sets of the module docstring, as rows of ``votes``."""
    n = len(votes)
    everything = np.arange(n)
    eta_mean = votes.user_id.map(users.set_index("user_id").eta_mean).to_numpy()
    n_user = votes.groupby("user_id").user_id.transform("size").to_numpy()
    agree = agreement_score(votes).to_numpy()
    # agreement order: higher rate first, then more votes, then random
    agree_order = np.lexsort((rng.random(n), -n_user, -agree))
    eps = (1.0 - eta_mean) / 2.0
    out = [Selection("gold", np.nan, everything, gold_labels=True), Selection("all", np.nan, everything),
           Selection("oracle", np.nan, np.flatnonzero(votes.true_attentive_user.to_numpy()))]
    for tau in settings.taus:
        keep = np.flatnonzero(eta_mean >= tau)
        k = len(keep)
        out += [Selection("heedful", tau, keep),
                Selection("random", tau, np.sort(rng.choice(n, size=k, replace=False))),
                Selection("agreement", tau, np.sort(agree_order[:k]))]
    out += [Selection("rbt", np.nan, everything, loss="rbt", eps=np.minimum(eps, settings.eps_max)),
            Selection("cbt", np.nan, everything, loss="cbt", eps=eps)]
    return out


def run_seed(items: pd.DataFrame, phi_a: np.ndarray, phi_b: np.ndarray, seed: int,
             settings: Settings) -> tuple[list[dict], dict]:
    """Run one seed; returns one record per training set and the seed's diagnostics."""
    rng = np.random.default_rng(seed)
    n = len(items)
    perm = rng.permutation(n)
    n_test = int(round(settings.test_frac * n))
    test, train = perm[:n_test], perm[n_test:]
    votes = simulate_votes(items.iloc[train], settings.population, rng)
    row_of = pd.Series(np.arange(n), index=items.item_id)
    vrow = row_of.loc[votes.item_id].to_numpy()
    priors = heedful_priors(items, settings)
    shown = votes[CONTRACT].copy()
    if settings.gold_fraction > 0:        # a small expert-labelled subset, seen by heedful only
        has_gold = np.random.default_rng([seed, 1]).random(len(votes)) < settings.gold_fraction
        shown["gold"] = pd.Series(np.where(has_gold, votes.gold_truth, None), dtype=object)
    fit = Attentiveness(priors=priors).fit(shown)
    users = fit.users_
    picked_a = (votes.choice == "a").to_numpy()
    gold_a = (votes.gold_truth == "a").to_numpy()
    test_gold_a = (items.gold.iloc[test] == "a").to_numpy()
    records = []
    for sel in selections(votes, users, settings, rng):
        rows = sel.rows
        label_a = gold_a[rows] if sel.gold_labels else picked_a[rows]
        rec = {"seed": seed, "method": sel.method, "tau": sel.tau, "n_train": len(rows),
               "wrong_labels": float(np.mean(label_a != gold_a[rows])) if len(rows) else np.nan,
               "accuracy": np.nan}
        if len(rows) >= settings.min_train:
            ia = vrow[rows]
            ch = np.where(label_a[:, None], phi_a[ia], phi_b[ia])
            rj = np.where(label_a[:, None], phi_b[ia], phi_a[ia])
            head = train_reward(ch, rj, eps=sel.eps, loss=sel.loss, head=settings.head, l2=settings.l2, seed=seed)
            rec["accuracy"] = head.accuracy(phi_a[test], phi_b[test], test_gold_a)
        records.append(rec)
    truth = votes.groupby("user_id").agg(att=("true_attentive_user", "first"), agree=("user_id", "size"))
    agree_user = agreement_score(votes).groupby(votes.user_id).first()
    u = users.set_index("user_id").loc[truth.index]
    diag = {"seed": seed, "n_train_votes": len(votes), "n_test": len(test), "n_users": len(users),
            "casual": priors.casual, "mu_fit": users_mu(fit),
            "auc_heedful": user_auc(u.eta_mean.to_numpy(), truth.att.to_numpy()),
            "auc_agreement": user_auc(agree_user.loc[truth.index].to_numpy(), truth.att.to_numpy()),
            "eta_prior_a": fit.eta_prior_["a"], "eta_prior_b": fit.eta_prior_["b"],
            "fit_seconds": fit.elapsed_}
    return records, diag


def users_mu(fit: Attentiveness) -> dict[str, float]:
    """The fitted mu per pair, keyed ``model_a|model_b``."""
    return {f"{r.model_a}|{r.model_b}": round(float(r.mu), 4) for r in fit.pairs_.itertuples()}
