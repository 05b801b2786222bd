"""A comparison-mode log with real text: MT-bench questions and real answers, simulated users.

Text: the first turn of MT-bench's 80 questions and each model's real first-turn answer
(``../shared/data/mt-bench``). Truth: for a pair (A, B), t_n ~ Bernoulli(mu_AB) with
mu_AB = sigmoid(scale (s_A - s_B)), s the published MT-bench scores (scale 0.5 by default: gpt-4 vs
llama-13b 0.96, gpt-4 vs gpt-3.5-turbo 0.63). Users: a mixture, attentive with probability
``attentive_share`` (eta ~ Beta(8, 2)) or casual (eta ~ Beta(1, 5)); votes per user lognormal
(sigma 1, heavy-tailed); per vote z ~ Bernoulli(eta_u), y = t if attentive, else the first-shown
answer with probability rho (1/2: a coin; rho != 1/2: position bias). Ties at ``tie_rate``.
The truth stays beside the votes: ``true_better``, ``true_attentive``; per user ``true_eta``, ``true_type``.
Without the data folder, synthetic placeholder text is used (and said so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from heedful.errors import InputError
from heedful.simulate import Simulation

# Published MT-bench scores (first + second turn average; MT-bench paper / leaderboard)
SCORES = {
    "gpt-4": 8.99,
    "gpt-3.5-turbo": 7.94,
    "claude-v1": 7.90,
    "vicuna-13b-v1.3": 6.39,
    "alpaca-13b": 4.53,
    "llama-13b": 2.61,
}
PAIRS = (
    ("gpt-4", "llama-13b"),
    ("gpt-3.5-turbo", "alpaca-13b"),
    ("vicuna-13b-v1.3", "llama-13b"),
    ("claude-v1", "vicuna-13b-v1.3"),
    ("gpt-4", "gpt-3.5-turbo"),
)


def default_data_dir() -> Path | None:
    """``../shared/data/mt-bench`` beside the checkout (or the working folder), if present."""
    here = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt-bench"
    for p in (here, Path.cwd().parent / "shared" / "data" / "mt-bench", Path.cwd() / "shared" / "data" / "mt-bench"):
        if (p / "question.jsonl").exists():
            return p
    return None


@dataclass(frozen=True)
class Corpus:
    """First-turn questions and answers: ``questions`` (question_id, category, prompt), ``answers``
    (question_id, model, answer); ``real`` is False for the synthetic fallback."""

    questions: pd.DataFrame
    answers: pd.DataFrame
    real: bool


def load_corpus(data_dir: str | Path | None, models: list[str]) -> Corpus:
    """Read MT-bench's question.jsonl and model_answer/<model>.jsonl; synthetic text when data_dir is None."""
    if data_dir is None:
        q = pd.DataFrame(
            {
                "question_id": np.arange(80),
                "category": "synthetic",
                "prompt": [f"Synthetic question {i}" for i in range(80)],
            }
        )
        ans = pd.MultiIndex.from_product([q.question_id, models], names=["question_id", "model"]).to_frame(index=False)
        ans["answer"] = "Synthetic answer of " + ans.model + " to question " + ans.question_id.astype(str)
        return Corpus(q, ans, real=False)
    d = Path(data_dir)
    q = pd.read_json(d / "question.jsonl", lines=True)
    q = pd.DataFrame({"question_id": q.question_id, "category": q.category, "prompt": q.turns.str[0]})
    frames = []
    for m in models:
        f = d / "model_answer" / f"{m}.jsonl"
        if not f.exists():
            raise InputError(f"{f}: no answers for model {m!r}")
        a = pd.read_json(f, lines=True)
        frames.append(
            pd.DataFrame({"question_id": a.question_id, "model": m, "answer": a.choices.str[0].str["turns"].str[0]})
        )
    return Corpus(q, pd.concat(frames, ignore_index=True), real=True)


def pair_mu(pairs=PAIRS, scale: float = 0.5) -> list[tuple[str, str, float]]:
    """mu_AB = sigmoid(scale (s_A - s_B)) from the published scores."""
    return [(a, b, float(1 / (1 + np.exp(-scale * (SCORES[a] - SCORES[b]))))) for a, b in pairs]


def simulate_mtbench(
    users: int = 2000,
    votes_per_user: float = 12.0,
    *,
    data_dir: str | Path | None = None,
    pairs=PAIRS,
    scale: float = 0.5,
    attentive_share: float = 0.6,
    attentive: tuple[float, float] = (8.0, 2.0),
    casual: tuple[float, float] = (1.0, 5.0),
    rho: float = 0.5,
    tie_rate: float = 0.05,
    seed: int = 0,
) -> tuple[Simulation, Corpus]:
    """Simulate the log (see the module docstring); returns the simulation and the corpus used."""
    if not (0 <= attentive_share <= 1 and 0 < rho < 1 and 0 <= tie_rate < 1 and users >= 1 and votes_per_user >= 1):
        raise InputError(
            "need users >= 1, votes_per_user >= 1, attentive_share in [0, 1], rho in (0, 1), tie_rate in [0, 1)"
        )
    mus = pair_mu(pairs, scale)
    models = sorted({m for p in pairs for m in p})
    corpus = load_corpus(data_dir, models)
    rng = np.random.default_rng(seed)
    kind = rng.random(users) < attentive_share
    eta = np.where(kind, rng.beta(*attentive, size=users), rng.beta(*casual, size=users))
    counts = np.maximum(1, np.round(rng.lognormal(0.0, 1.0, users) * votes_per_user / np.exp(0.5))).astype(int)
    user = np.repeat(np.arange(users), counts)
    n = len(user)
    pair = rng.integers(0, len(mus), n)
    strong = np.array([p[0] for p in mus], dtype=object)[pair]
    weak = np.array([p[1] for p in mus], dtype=object)[pair]
    strong_better = rng.random(n) < np.array([p[2] for p in mus])[pair]
    swap = rng.random(n) < 0.5  # which model is listed (and shown) as a
    first_a = rng.random(n) < 0.5  # which side was shown first
    a_better = strong_better ^ swap
    attentive_vote = rng.random(n) < eta[user]
    casual_first = rng.random(n) < rho
    casual_a = casual_first == first_a  # picked a: first-shown and a first, or second and a second
    picked_a = np.where(attentive_vote, a_better, casual_a)
    tie = rng.random(n) < tie_rate
    model_a, model_b = np.where(swap, weak, strong), np.where(swap, strong, weak)
    qid = corpus.questions.question_id.to_numpy()[rng.integers(0, len(corpus.questions), n)]
    answer = corpus.answers.set_index(["question_id", "model"]).answer
    uid = np.char.add("user", np.char.zfill(np.arange(users).astype(str), len(str(users - 1)))).astype(object)
    q = corpus.questions.set_index("question_id")
    votes = pd.DataFrame(
        {
            "vote_id": np.char.add("mt", np.arange(n).astype(str)).astype(object),
            "user_id": uid[user],
            "model_a": model_a,
            "model_b": model_b,
            "choice": np.where(tie, "tie", np.where(picked_a, "a", "b")).astype(object),
            "shown_first": np.where(first_a, "a", "b").astype(object),
            "prompt": q.prompt.reindex(qid).to_numpy(dtype=object),
            "response_a": answer.reindex(pd.MultiIndex.from_arrays([qid, model_a])).to_numpy(dtype=object),
            "response_b": answer.reindex(pd.MultiIndex.from_arrays([qid, model_b])).to_numpy(dtype=object),
            "question_id": qid,
            "category": q.category.reindex(qid).to_numpy(dtype=object),
            "true_attentive": attentive_vote,
            "true_better": np.where(a_better, "a", "b").astype(object),
        }
    )
    truth = pd.DataFrame(
        {"user_id": uid, "true_eta": eta, "true_type": np.where(kind, "attentive", "casual"), "n_rows": counts}
    )
    return Simulation(votes=votes, users=truth), corpus


def agreement(votes: pd.DataFrame, kept_rows: np.ndarray | None = None) -> tuple[int, float]:
    """(votes, share agreeing with ``true_better``) over non-tie votes, or over the given kept rows."""
    v = votes.iloc[kept_rows] if kept_rows is not None else votes[votes.choice != "tie"]
    return len(v), float((v.choice == v.true_better).mean()) if len(v) else float("nan")
