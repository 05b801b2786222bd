"""Simulated comparison-mode users voting on real items, one vote per prompt pair.

Population (defaults: the issue's 60/40 mix):
- user type k_u ~ Bernoulli(p_att); eta_u ~ Beta(8, 2) if attentive-type else Beta(1, 5);
- votes per user: heavy tailed, n_u = max(1, round(L_u * m / e^{1/2})), L_u ~ LogNormal(0, 1), so the
  mean is about m; items are dealt out in random order until every item has exactly one vote;
- per vote: z_n ~ Bernoulli(eta_u) (attentive on this vote); the first-shown side s_n is a coin;
  attentive: pick the gold-better answer; casual: pick the first-shown answer with probability rho
  (position bias; rho = 1/2 is the coin of the plain model), else the other one.

A casual pick is independent of the truth (s_n is a coin), so a vote's label is wrong with probability
(1 - eta_u) / 2 whatever rho is: the flip rate robust losses take.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

CONTRACT = ["vote_id", "user_id", "model_a", "model_b", "choice", "shown_first", "prompt",
            "response_a", "response_b"]


@dataclass(frozen=True)
class Population:
    """The simulated user population (see the module docstring)."""

    p_attentive: float = 0.6
    attentive_beta: tuple[float, float] = (8.0, 2.0)
    casual_beta: tuple[float, float] = (1.0, 5.0)
    mean_votes: float = 10.0
    rho: float = 0.75          # P(casual pick = first-shown answer)


def vote_counts(rng: np.random.Generator, n_items: int, mean_votes: float) -> np.ndarray:
    """Heavy-tailed votes per user (log-normal, sigma 1, mean ~ mean_votes) summing to n_items."""
    counts: list[int] = []
    total = 0
    while total < n_items:
        draw = np.maximum(1, np.round(rng.lognormal(0.0, 1.0, 256) * mean_votes / np.exp(0.5))).astype(int)
        counts.extend(draw.tolist())
        total += int(draw.sum())
    c = np.array(counts)
    cum = np.cumsum(c)
    k = int(np.searchsorted(cum, n_items))        # first user whose count reaches n_items
    c = c[: k + 1].copy()
    c[-1] -= int(cum[k] - n_items)
    return c


def simulate_votes(items: pd.DataFrame, pop: Population, rng: np.random.Generator) -> pd.DataFrame:
    """One vote per item by a simulated user; the contract's columns plus the truth.

    Truth columns (never passed to heedful): ``item_id``, ``gold_truth`` (a|b), ``true_eta``,
    ``true_attentive_user`` (drawn from the attentive component), ``true_attentive_vote`` (z_n).
    """
    n = len(items)
    counts = vote_counts(rng, n, pop.mean_votes)
    n_users = len(counts)
    attentive_user = rng.random(n_users) < pop.p_attentive
    eta = np.where(attentive_user, rng.beta(*pop.attentive_beta, n_users), rng.beta(*pop.casual_beta, n_users))
    order = rng.permutation(n)
    user = np.repeat(np.arange(n_users), counts)          # user of the vote on item order[i]
    it = items.iloc[order].reset_index(drop=True)
    z = rng.random(n) < eta[user]
    first_a = rng.random(n) < 0.5
    first_pick = rng.random(n) < pop.rho
    casual_a = first_pick == first_a                      # picks a when it is first and she picks first, ...
    gold_a = (it.gold == "a").to_numpy()
    pick_a = np.where(z, gold_a, casual_a)
    uid = np.array([f"u{i:05d}" for i in range(n_users)], dtype=object)
    return pd.DataFrame({
        "vote_id": [f"v-{i}" for i in it.item_id],
        "user_id": uid[user],
        "model_a": it.model_a.to_numpy(),
        "model_b": it.model_b.to_numpy(),
        "choice": np.where(pick_a, "a", "b").astype(object),
        "shown_first": np.where(first_a, "a", "b").astype(object),
        "prompt": it.prompt.to_numpy(),
        "response_a": it.response_a.to_numpy(),
        "response_b": it.response_b.to_numpy(),
        "item_id": it.item_id.to_numpy(),
        "gold_truth": it.gold.to_numpy(),
        "true_eta": eta[user],
        "true_attentive_user": attentive_user[user],
        "true_attentive_vote": z,
    })
