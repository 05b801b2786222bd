"""Simulated comparison-mode logs from the behaviour model, with the truth kept beside them.

Per user eta_u ~ Beta(a, b) (or a mixture of Betas); per vote z ~ Bernoulli(eta_u) (attentive),
t ~ Bernoulli(mu_p) (the first-listed model's answer is truly better), y = t if attentive, else a
casual pick: a coin, or, for users with a position bias, the first-shown answer with probability
rho_u. Pairs come from a list with their mu, or from model strengths: mu_AB = sigmoid(s_A - s_B).
A share of votes are ties; a share carry a gold label (the truth t).
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
    users: pd.DataFrame      # user_id, true_eta, true_rho (casual P(first-shown)), n_rows


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


def pairs_from_strengths(strengths: dict[str, float]) -> list[tuple[str, str, float]]:
    """Every pair of the models with mu_AB = sigmoid(s_A - s_B)."""
    names = list(strengths)
    return [(a, b, float(1 / (1 + np.exp(-(strengths[a] - strengths[b])))))
            for i, a in enumerate(names) for b in names[i + 1:]]


def default_strengths(n_models: int, spread: float = 2.0) -> dict[str, float]:
    """n_models models with strengths evenly spread over [0, spread], named so the strongest sorts first."""
    return {f"gen-{i}": float(spread * (n_models - 1 - i) / max(n_models - 1, 1)) for i in range(n_models)}


def simulate(users: int, votes_per_user: float, *, mu: float = 0.8, eta_prior: tuple[float, float] = (3.0, 5.0),
             eta_mixture: list[tuple[float, float, float]] | None = None,
             pairs: list[tuple[str, str, float]] | None = None, vote_counts: str = "fixed",
             tie_rate: float = 0.0, position_share: float = 0.0, position_rho: float = 0.85,
             gold_rate: float = 0.0, seed: int = 0) -> Simulation:
    """Simulate ``users`` users with ``votes_per_user`` votes each (fixed, or the mean of a heavy tail).

    ``eta_mixture``: [(weight, a, b), ...] instead of one Beta; ``position_share`` of users pick the
    first-shown answer with probability ``position_rho`` when casual; ``gold_rate`` of votes carry the truth.
    """
    if users < 1 or votes_per_user < 1:
        raise InputError("--users and --votes-per-user must be at least 1")
    if not 0 < mu < 1:
        raise InputError(f"--mu must lie strictly between 0 and 1, got {mu}")
    if not 0 <= tie_rate < 1:
        raise InputError(f"--tie-rate must lie in [0, 1), got {tie_rate}")
    for name, v in (("--position-share", position_share), ("--gold-rate", gold_rate)):
        if not 0 <= v <= 1:
            raise InputError(f"{name} must lie in [0, 1], got {v}")
    if not 0 <= position_rho <= 1:
        raise InputError(f"--position-rho must lie in [0, 1], got {position_rho}")
    pairs = pairs or default_pairs(1, mu)
    rng = np.random.default_rng(seed)
    if eta_mixture:
        w = np.array([m[0] for m in eta_mixture], dtype=float)
        comp = rng.choice(len(eta_mixture), size=users, p=w / w.sum())
        ab = np.array([m[1:] for m in eta_mixture], dtype=float)[comp]
        eta = rng.beta(ab[:, 0], ab[:, 1])
    else:
        eta = rng.beta(*eta_prior, size=users)
    rho = np.where(rng.random(users) < position_share, position_rho, 0.5)
    counts = _vote_counts(rng, users, votes_per_user, vote_counts)
    user = np.repeat(np.arange(users), counts)
    n = len(user)
    pair = rng.integers(0, len(pairs), size=n)
    pair_mu = np.array([p[2] for p in pairs])[pair]
    attentive = rng.random(n) < eta[user]
    truth_a = rng.random(n) < pair_mu
    a_first = rng.random(n) < 0.5
    casual_first = rng.random(n) < rho[user]
    picked_a = np.where(attentive, truth_a, casual_first == a_first)
    tie = rng.random(n) < tie_rate
    has_gold = rng.random(n) < gold_rate
    # half the votes list the pair the other way round: storage order carries no meaning
    swap = rng.random(n) < 0.5
    ma = np.array([p[0] for p in pairs], dtype=object)[pair]
    mb = np.array([p[1] for p in pairs], dtype=object)[pair]
    width = len(str(users - 1))
    uid = np.char.add("u", np.char.zfill(np.arange(users).astype(str), width)).astype(object)
    side = np.array(["b", "a"], dtype=object)
    votes = pd.DataFrame({
        "vote_id": np.char.add("v", np.arange(n).astype(str)).astype(object),
        "user_id": uid[user],
        "model_a": np.where(swap, mb, ma),
        "model_b": np.where(swap, ma, mb),
        "choice": np.where(tie, "tie", side[(picked_a ^ swap).astype(int)]).astype(object),
        "shown_first": side[(a_first ^ swap).astype(int)],
        "true_attentive": attentive,
        "true_better": side[(truth_a ^ swap).astype(int)],
    })
    if gold_rate > 0:
        votes["gold"] = np.where(has_gold, votes["true_better"], None)
    return Simulation(votes=votes, users=pd.DataFrame({"user_id": uid, "true_eta": eta, "true_rho": rho,
                                                      "n_rows": counts}))
