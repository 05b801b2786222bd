"""Simulated comparison-mode logs from the behaviour model, with the truth kept beside them.

Per user eta_u ~ Beta(a, b); per vote z ~ Bernoulli(eta_u) (attentive), t ~ Bernoulli(mu_p) (the
first-listed model's answer is truly better), y = t if attentive else a coin; a share of votes are ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from heedful.errors import InputError

VOTE_COUNTS = ("fixed", "geometric", "lognormal")


@dataclass(frozen=True)
class Simulation:
    votes: pd.DataFrame      # the contract's columns + true_attentive, true_better
    users: pd.DataFrame      # user_id, true_eta, n_rows


def _vote_counts(rng: np.random.Generator, users: int, mean: float, kind: str) -> np.ndarray:
    if kind == "fixed":
        return np.full(users, int(round(mean)), dtype=np.int64)
    if kind == "geometric":
        return rng.geometric(1.0 / mean, size=users).astype(np.int64)
    if kind == "lognormal":   # heavy tail: sigma 1, scaled to the asked mean, at least one vote
        raw = rng.lognormal(0.0, 1.0, size=users)
        return np.maximum(1, np.round(raw * mean / np.exp(0.5))).astype(np.int64)
    raise InputError(f"--vote-counts must be one of {', '.join(VOTE_COUNTS)}, not {kind!r}")


def default_pairs(n_pairs: int, mu: float) -> list[tuple[str, str, float]]:
    """One pair (strong-model vs weak-model, mu) or n_pairs pairs with mu spread over [0.6, 0.9]."""
    if n_pairs == 1:
        return [("strong-model", "weak-model", mu)]
    mus = np.linspace(0.6, 0.9, n_pairs)
    return [(f"model-{2 * i:02d}", f"model-{2 * i + 1:02d}", float(m)) for i, m in enumerate(mus)]


def simulate(users: int, votes_per_user: float, *, mu: float = 0.8, eta_prior: tuple[float, float] = (3.0, 5.0),
             pairs: list[tuple[str, str, float]] | None = None, vote_counts: str = "fixed",
             tie_rate: float = 0.0, seed: int = 0) -> Simulation:
    """Simulate ``users`` users with ``votes_per_user`` votes each (fixed, or the mean of a heavy tail)."""
    if users < 1 or votes_per_user < 1:
        raise InputError("--users and --votes-per-user must be at least 1")
    if not 0 < mu < 1:
        raise InputError(f"--mu must lie strictly between 0 and 1, got {mu}")
    if not 0 <= tie_rate < 1:
        raise InputError(f"--tie-rate must lie in [0, 1), got {tie_rate}")
    pairs = pairs or default_pairs(1, mu)
    rng = np.random.default_rng(seed)
    a, b = eta_prior
    eta = rng.beta(a, b, size=users)
    counts = _vote_counts(rng, users, votes_per_user, vote_counts)
    user = np.repeat(np.arange(users), counts)
    n = len(user)
    pair = rng.integers(0, len(pairs), size=n)
    pair_mu = np.array([p[2] for p in pairs])[pair]
    attentive = rng.random(n) < eta[user]
    truth_a = rng.random(n) < pair_mu
    coin = rng.random(n) < 0.5
    picked_a = np.where(attentive, truth_a, coin)
    tie = rng.random(n) < tie_rate
    # half the votes list the pair the other way round: storage order carries no meaning
    swap = rng.random(n) < 0.5
    ma = np.array([p[0] for p in pairs], dtype=object)[pair]
    mb = np.array([p[1] for p in pairs], dtype=object)[pair]
    width = len(str(users - 1))
    uid = np.char.add("u", np.char.zfill(np.arange(users).astype(str), width)).astype(object)
    votes = pd.DataFrame({
        "vote_id": np.char.add("v", np.arange(n).astype(str)).astype(object),
        "user_id": uid[user],
        "model_a": np.where(swap, mb, ma),
        "model_b": np.where(swap, ma, mb),
        "choice": np.where(tie, "tie", np.where(picked_a ^ swap, "a", "b")).astype(object),
        "shown_first": np.where(rng.random(n) < 0.5, "a", "b").astype(object),
        "true_attentive": attentive,
        "true_better": np.where(truth_a ^ swap, "a", "b").astype(object),
    })
    return Simulation(votes=votes, users=pd.DataFrame({"user_id": uid, "true_eta": eta, "n_rows": counts}))
