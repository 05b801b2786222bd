"""Per-user posterior summaries against direct adaptive quadrature."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, optimize

from heedful.inference.posterior import user_posterior
from heedful.model.likelihood import build_plan
from heedful.suffstats import vote_stats

F64 = torch.float64


def _votes() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for u, n in enumerate([1, 3, 8, 25, 120]):
        rows += [{"user_id": f"u{u}", "model_a": "A", "model_b": "B", "choice": rng.choice(["a", "b"], p=[0.7, 0.3]),
                  "shown_first": rng.choice(["a", "b"])} for _ in range(n)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("a, b, rho", [(0.7, 1.5, None), (3.0, 5.0, 0.7), (0.4, 0.3, None)])
def test_mean_mode_interval_and_tail_match_quadrature(a, b, rho):
    df = _votes()
    st = vote_stats(df)
    plan = build_plan(st, torch.device("cpu"), F64)
    post = user_posterior(plan, st.tensors(torch.device("cpu"), F64), a, b, torch.tensor([0.8], dtype=F64), rho,
                          tau=0.6)
    for u in range(st.n_users):
        d = df[df.user_id == st.users[u]]
        y = (d.choice == "a").to_numpy()
        m = np.where(y, 0.8, 0.2)
        c = np.full(len(d), 0.5) if rho is None else np.where(y == (d.shown_first == "a").to_numpy(), rho, 1 - rho)

        def logdens(e, m=m, c=c):
            return (a - 1) * np.log(e) + (b - 1) * np.log1p(-e) + np.log(e * m + (1 - e) * c).sum()

        def lik(e, m=m, c=c):
            return np.exp(np.log(e * m + (1 - e) * c).sum())

        # the Beta factor as quad's algebraic weight, so the endpoint singularities are integrated exactly
        z = integrate.quad(lik, 0, 1, weight="alg", wvar=(a - 1, b - 1))[0]
        mean = integrate.quad(lambda e: e * lik(e), 0, 1, weight="alg", wvar=(a - 1, b - 1))[0] / z
        tail = integrate.quad(lambda e: lik(e) * e ** (a - 1), 0.6, 1, weight="alg", wvar=(0, b - 1))[0] / z

        def cdf(t, z=z, lik=lik):
            return integrate.quad(lambda e: lik(e) * (1 - e) ** (b - 1), 0, t, weight="alg", wvar=(a - 1, 0))[0] / z

        lo = optimize.brentq(lambda t: cdf(t) - 0.05, 1e-14, 1 - 1e-14)
        hi = optimize.brentq(lambda t: cdf(t) - 0.95, 1e-14, 1 - 1e-14)
        res = optimize.minimize_scalar(lambda e: -logdens(e), bounds=(1e-12, 1 - 1e-12), method="bounded",
                                       options={"xatol": 1e-10})
        assert post.mean[u] == pytest.approx(mean, abs=1e-8)
        assert post.prob_above[u] == pytest.approx(tail, abs=1e-4)
        assert post.lo[u] == pytest.approx(lo, abs=1e-4)
        assert post.hi[u] == pytest.approx(hi, abs=1e-4)
        if a >= 1 and b >= 1:
            assert post.mode[u] == pytest.approx(res.x, abs=1e-6)
        else:   # a < 1: the density is unbounded at 0 (or 1); the mode is there, or at the interior maximum
            assert post.mode[u] in (0.0, 1.0) or post.mode[u] == pytest.approx(res.x, abs=1e-6)
