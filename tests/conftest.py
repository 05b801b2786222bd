# ruff: noqa: I001  (heedful first: it sets the OpenMP wait policy before torch loads)
import heedful  # noqa: F401  (sets OpenMP's wait policy before torch loads)
import numpy as np
import pandas as pd
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def small_votes() -> pd.DataFrame:
    """60 random votes of 6 users over three pairs listed in both orders, with ties."""
    rng = np.random.default_rng(0)
    n = 60
    a = rng.choice(["m1", "m2", "m3"], n)
    b = np.where(a == "m1", "m2", np.where(a == "m2", "m3", "m1"))
    return pd.DataFrame({"user_id": rng.integers(0, 6, n).astype(str), "model_a": a, "model_b": b,
                         "choice": rng.choice(["a", "b", "tie"], n, p=[0.5, 0.4, 0.1])})
