"""Per-user posterior summaries against direct adaptive quadrature."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, optimize, special

from heedful.inference import polynomial_posterior, posterior
from heedful.inference.posterior import X_EDGE, _grid_size, user_posterior
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
        assert post.prob_above[u] == pytest.approx(tail, abs=1e-6)
        assert post.lo[u] == pytest.approx(lo, abs=1e-6)
        assert post.hi[u] == pytest.approx(hi, abs=1e-6)
        if a >= 1 and b >= 1:
            assert post.mode[u] == pytest.approx(res.x, abs=1e-6)
        else:   # a < 1: the density is unbounded at 0 (or 1); the mode is there, or at the interior maximum
            assert post.mode[u] in (0.0, 1.0) or post.mode[u] == pytest.approx(res.x, abs=1e-6)


def _spread_votes(counts: list[int], seed: int) -> pd.DataFrame:
    """Users with the given vote counts over two pairs (mu 0.8 and 0.65), the shown order recorded."""
    rng = np.random.default_rng(seed)
    rows = []
    for u, n in enumerate(counts):
        for _ in range(n):
            pair = rng.integers(2)
            rows.append({"user_id": f"u{u}", "model_a": "AC"[pair], "model_b": "BD"[pair],
                         "choice": rng.choice(["a", "b"], p=[0.7, 0.3]), "shown_first": rng.choice(["a", "b"])})
    return pd.DataFrame(rows)


def _with_gold(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The votes with a gold label (a or b at random) on about a fifth of them."""
    rng = np.random.default_rng(seed)
    return df.assign(gold=np.where(rng.random(len(df)) < 0.2, rng.choice(["a", "b"], len(df)), None))


def _reference(lik, a: float, b: float, tau: float, score=None) -> dict[str, float]:
    """Mean, 5% and 95% quantiles, P(eta > tau) and mode of lik(eta) Beta(eta; a, b) by adaptive quadrature.

    The mode is the root of ``score`` (d/d eta log lik) + (a-1)/eta - (b-1)/(1-eta) when given and bracketed,
    else the bounded minimum of minus the log density (good to about 1e-8).
    """
    def quad(f, lo, hi, wvar):
        return integrate.quad(f, lo, hi, weight="alg", wvar=wvar, limit=200, epsabs=1e-14, epsrel=1e-12)[0]

    z = quad(lik, 0, 1, (a - 1, b - 1))

    def cdf(t):   # each endpoint's singularity in the weight: integrate from the nearer end
        if t <= 0.5:
            return quad(lambda e: lik(e) * (1 - e) ** (b - 1), 0, t, (a - 1, 0)) / z
        return 1 - quad(lambda e: lik(e) * e ** (a - 1), t, 1, (0, b - 1)) / z

    res = optimize.minimize_scalar(lambda e: -(np.log(lik(e)) + (a - 1) * np.log(e) + (b - 1) * np.log1p(-e)),
                                   bounds=(1e-12, 1 - 1e-12), method="bounded", options={"xatol": 1e-11})
    mode = res.x
    if score is not None:
        def grad(e):
            return score(e) + (a - 1) / e - (b - 1) / (1 - e)

        if grad(1e-12) > 0 > grad(1 - 1e-12):
            mode = optimize.brentq(grad, 1e-12, 1 - 1e-12, xtol=1e-15, rtol=1e-15)
    return {"mean": quad(lambda e: e * lik(e), 0, 1, (a - 1, b - 1)) / z,
            "lo": optimize.brentq(lambda t: cdf(t) - 0.05, 1e-14, 1 - 1e-14, xtol=1e-13),
            "hi": optimize.brentq(lambda t: cdf(t) - 0.95, 1e-14, 1 - 1e-14, xtol=1e-13),
            "tail": quad(lambda e: lik(e) * e ** (a - 1), tau, 1, (0, b - 1)) / z, "mode": mode}


@pytest.mark.parametrize("a, b, rho, rho_prior", [(0.6, 0.8, 0.75, None), (2.0, 1.5, None, None),
                                                  (1.5, 0.4, None, None), (2.5, 3.0, None, (4.0, 2.0)),
                                                  (3.0, 5.0, 0.7, None), (15.0, 20.0, None, None)])
def test_summaries_match_quadrature_over_a_spread_of_users(a, b, rho, rho_prior):
    """1 to 300 votes (to 90 with a per-user rho), a and b below 1, a narrow prior, two pairs, against adaptive
    quadrature: the interval and tail to 1e-6 (the grid's CDF is O(h^6), the quintic inside a cell O(h^6))."""
    counts = [1, 2, 4, 9, 20, 45, 90] + ([] if rho_prior else [300])
    df = _spread_votes(counts, seed=7)
    st = vote_stats(df)
    mu = {("A", "B"): 0.8, ("C", "D"): 0.65}
    plan = build_plan(st, torch.device("cpu"), F64)
    tau = 0.55
    post = user_posterior(plan, st.tensors(torch.device("cpu"), F64), a, b,
                          torch.tensor([mu[p] for p in st.pairs], dtype=F64), rho, tau=tau, rho_prior=rho_prior)
    steps = {}
    for bk in plan.buckets:
        for u in bk.users.tolist():
            steps[u] = 2 * X_EDGE / (_grid_size(2 * bk.moment_nodes, a, b, True) - 1)
    for u in range(st.n_users):
        d = df[df.user_id == st.users[u]]
        y = (d.choice == "a").to_numpy()
        pm = np.array([mu[(ma, mb)] for ma, mb in zip(d.model_a, d.model_b, strict=True)])
        m = np.where(y, pm, 1 - pm)
        first = (y == (d.shown_first == "a").to_numpy())   # picked the first-shown answer

        if rho_prior is None:
            c = np.full(len(d), 0.5) if rho is None else np.where(first, rho, 1 - rho)

            def lik(e, m=m, c=c):
                return np.exp(np.log(np.multiply.outer(e, m - c) + c).sum(-1))

            def score(e, m=m, c=c):
                return ((m - c) / (c + e * (m - c))).sum()
        else:   # rho_u ~ Beta(rho_prior) integrated out exactly: L is a polynomial of degree n in rho
            t, w = special.roots_jacobi(len(d) // 2 + 2, rho_prior[1] - 1, rho_prior[0] - 1)
            r, w = (1 + t) / 2, w / w.sum()
            c = np.where(first[None, :], r[:, None], 1 - r[:, None])          # [nodes, votes]

            def lik(e, m=m, c=c, w=w):
                return np.exp(np.log(np.multiply.outer(e, m - c) + c).sum(-1)) @ w

            score = None
        ref = _reference(lik, a, b, tau, score)
        assert post.mean[u] == pytest.approx(ref["mean"], abs=1e-8)
        assert post.lo[u] == pytest.approx(ref["lo"], abs=1e-6)
        assert post.hi[u] == pytest.approx(ref["hi"], abs=1e-6)
        assert post.prob_above[u] == pytest.approx(ref["tail"], abs=1e-6)
        if rho_prior is not None:   # the rho-marginal mode is the grid maximum: within half a step in logit
            assert abs(special.logit(post.mode[u]) - special.logit(ref["mode"])) <= steps[u] / 2 + 1e-9
        elif a >= 1 and b >= 1:
            assert post.mode[u] == pytest.approx(ref["mode"], abs=1e-10)
        else:   # the density is unbounded at 0 (or 1): the mode is there, or at the interior maximum
            assert post.mode[u] in (0.0, 1.0) or post.mode[u] == pytest.approx(ref["mode"], abs=1e-10)


def test_summaries_do_not_depend_on_chunks_and_blocks(monkeypatch):
    df = _spread_votes([1, 3, 3, 5, 8, 8, 8, 13, 30, 30, 70], seed=3)
    st = vote_stats(df)
    plan = build_plan(st, torch.device("cpu"), F64)
    args = (plan, st.tensors(torch.device("cpu"), F64), 1.7, 2.2, torch.tensor([0.8, 0.65], dtype=F64), 0.7)
    whole = user_posterior(*args, tau=0.5)
    monkeypatch.setattr(posterior, "MAX_ELEMENTS", 900)    # two or three users per chunk
    monkeypatch.setattr(posterior, "BLOCK_ROWS", 4)        # a block or two of chunks
    pieces = user_posterior(*args, tau=0.5)
    for f in ("mean", "sd", "lo", "hi", "prob_above", "mode"):
        np.testing.assert_array_equal(getattr(whole, f), getattr(pieces, f), err_msg=f)


def test_the_mode_starts_at_the_peak_of_the_quartic_through_five_grid_points():
    """g(x) = A log sigmoid(x) + B log sigmoid(-x) peaks at x* = log(A / B): from five points 0.2 apart the
    quartic's peak is within 1e-3 cells of it and at least 10x closer than the parabola's vertex; with an end
    of the window off the grid the vertex is kept."""
    h = 0.2
    for A, B in [(3.0, 5.0), (12.0, 4.0), (40.0, 45.0)]:
        peak = np.log(A / B)
        j0 = np.round(peak / h)
        xs = torch.tensor((j0 + np.arange(-2, 3)) * h, dtype=F64)
        g5 = (A * torch.nn.functional.logsigmoid(xs) + B * torch.nn.functional.logsigmoid(-xs)).reshape(1, 5)
        target = peak / h - j0
        quartic = float(posterior._start_shift(g5, torch.tensor([True])))
        vertex = float(posterior._start_shift(g5, torch.tensor([False])))
        assert abs(quartic - target) < 1e-3 and abs(quartic - target) * 10 < abs(vertex - target)


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (1.7, 2.2)])
def test_modes_do_not_depend_on_when_the_slow_users_are_compacted(monkeypatch, a, b):
    """Mode refinement iterates on the still-active users' cells only once few are left; never compacting,
    compacting as soon as one user stops, and the default must give the same modes."""
    df = _spread_votes([1, 2, 3, 5, 8, 8, 13, 30, 70, 150] * 20, seed=5)
    st = vote_stats(df)
    plan = build_plan(st, torch.device("cpu"), F64)
    args = (plan, st.tensors(torch.device("cpu"), F64), a, b, torch.tensor([0.8, 0.65], dtype=F64), 0.7)
    default = user_posterior(*args).mode
    monkeypatch.setattr(posterior, "COMPACT", 0)             # never
    never = user_posterior(*args).mode
    monkeypatch.setattr(posterior, "COMPACT", 1.0 + 1e-9)    # whenever any user has stopped
    always = user_posterior(*args).mode
    assert np.isfinite(never).all() and len(np.unique(never)) > 50
    np.testing.assert_allclose(default, never, rtol=0, atol=1e-12)
    np.testing.assert_allclose(always, never, rtol=0, atol=1e-12)


@pytest.mark.parametrize("a, b, past_mass_rule", [(3.0, 5.0, True), (1.0, 1.0, True), (8.0, 2.5, False)])
def test_an_end_moves_in_only_as_far_as_the_closed_form_tail_stays_within_tail_eps(a, b, past_mass_rule):
    """One user (7 votes at m = 0.8, 4 at m = 0.2, c = 1/2): beyond the end that ``_inner_end`` picks, the true
    left tail and its continuation d(x_0) / a differ by at most TAIL_EPS Z, and the end moved in from -X_EDGE,
    for a small a past where the mass alone would have put it (more than TAIL_EPS Z beyond)."""
    votes = [(0.8, 7), (0.2, 4)]
    c = 0.5

    def dens(x):                       # L(eta) e^(a x) (1 + e^x)^-(a+b): the posterior density in x, unnormalised
        eta = special.expit(x)
        return np.prod([(c + eta * (m - c)) ** n for m, n in votes]) * np.exp(a * x - (a + b) * np.logaddexp(0, x))

    z = integrate.quad(dens, -np.inf, np.inf, epsabs=0, epsrel=1e-13, limit=400)[0]

    def log_mass(x):                   # the exact log relative mass below x: a valid bound
        return np.log(integrate.quad(dens, -np.inf, x, epsabs=0, epsrel=1e-13, limit=400)[0] / z)

    s = sum(n * abs(m - c) / c for m, n in votes)
    q = max(abs(m - c) / c for m, _ in votes)
    h = 2 * X_EDGE / 199
    end = posterior._inner_end(-X_EDGE, h, log_mass, s, q, a, b, -1)
    assert end > -X_EDGE + 10 * h
    true_tail = integrate.quad(dens, -np.inf, end, epsabs=0, epsrel=1e-13, limit=400)[0]
    assert abs(true_tail - dens(end) / a) <= posterior.TAIL_EPS * z
    assert (true_tail > posterior.TAIL_EPS * z) == past_mass_rule
    assert posterior._inner_end(-X_EDGE, h, log_mass, np.inf, q, a, b, -1) == -X_EDGE   # a vanishing factor
    # a concentrated prior (a + b = 1e4) whose mass bound allows any end: the end stops where e^y would overflow
    assert -X_EDGE < posterior._inner_end(-X_EDGE, h, lambda x: -1e9, s, q, 5e3, 5e3, -1) <= np.log(700 / 1e4)


@pytest.mark.parametrize("a, b, rho, gold", [(3.0, 5.0, None, False), (15.0, 20.0, 0.7, True), (4.0, 1.5, 0.9, True)])
def test_the_grid_keeps_only_the_span_that_holds_mass(monkeypatch, a, b, rho, gold):
    """Dropping the grid's points beyond the likelihood-ratio bound (TAIL_EPS) changes no summary beyond rounding,
    with gold labels (factors that vanish at an end) and a position bias; and it does drop points."""
    df = _spread_votes([1, 2, 4, 9, 20, 45] * 30, seed=11)
    st = vote_stats(_with_gold(df, seed=2) if gold else df)
    plan = build_plan(st, torch.device("cpu"), F64)
    args = (plan, st.tensors(torch.device("cpu"), F64), a, b, torch.tensor([0.8, 0.65], dtype=F64), rho)
    spans = []
    real_span = posterior._grid_span
    monkeypatch.setattr(posterior, "_grid_span", lambda *x: spans.append((real_span(*x), x[7])) or spans[-1][0])
    narrow = user_posterior(*args, tau=0.55)
    assert any(i1 - i0 + 1 < m for (i0, i1), m in spans), spans
    monkeypatch.setattr(posterior, "TAIL_EPS", 0.0)          # the whole grid on [-X_EDGE, X_EDGE]
    whole = user_posterior(*args, tau=0.55)
    for f in ("mean", "sd", "lo", "hi", "prob_above", "mode"):
        np.testing.assert_allclose(getattr(narrow, f), getattr(whole, f), rtol=0, atol=1e-10, err_msg=f)


def _spy_passes(monkeypatch) -> list[tuple[int, bool, bool]]:
    """Record (grid points, exact, finished) of each bucket pass; the exact polynomial summaries (integer a, b,
    no modes: tests/test_polynomial_posterior.py) turned off, so that every bucket goes to the grid."""
    monkeypatch.setattr(polynomial_posterior, "MAX_DEGREE", -1)
    passes = []
    real = posterior._bucket_pass

    def spy(*args, **kw):
        done = real(*args, **kw)
        passes.append((args[3].shape[0], kw["exact"], done))
        return done

    monkeypatch.setattr(posterior, "_bucket_pass", spy)
    return passes


@pytest.mark.parametrize("a, b, rho, tau", [(1.0, 1.0, None, None), (2.0, 3.0, 0.7, 0.55), (1.0, 4.0, None, 0.3),
                                            (1.0, 1.0, None, 1e-7)])
def test_without_modes_the_grid_narrows_to_the_quantiles_and_its_exact_tails_match_quadrature(monkeypatch, a, b,
                                                                                              rho, tau):
    """Integer a, b and no modes (EM's posterior): the grid keeps only the span of the quantiles (and x_tau), the
    masses beyond it by exact Gauss-Jacobi rules; against adaptive quadrature to 1e-6 and against the full grid."""
    counts = [1, 2, 4, 9, 20, 45, 90, 300] * 4
    df = _spread_votes(counts, seed=5)
    st = vote_stats(df)
    mu = {("A", "B"): 0.8, ("C", "D"): 0.65}
    plan = build_plan(st, torch.device("cpu"), F64)
    args = (plan, None, a, b, torch.tensor([mu[p] for p in st.pairs], dtype=F64), rho)
    passes = _spy_passes(monkeypatch)
    post = user_posterior(*args, tau=tau, modes=False)
    assert any(exact and done for _, exact, done in passes), passes
    assert all(done for _, exact, done in passes if exact), passes   # every user's quantiles on the narrowed grid
    for u in range(st.n_users):
        d = df[df.user_id == st.users[u]]
        y = (d.choice == "a").to_numpy()
        pm = np.array([mu[(ma, mb)] for ma, mb in zip(d.model_a, d.model_b, strict=True)])
        m = np.where(y, pm, 1 - pm)
        first = (y == (d.shown_first == "a").to_numpy())
        c = np.full(len(d), 0.5) if rho is None else np.where(first, rho, 1 - rho)

        def lik(e, m=m, c=c):
            return np.exp(np.log(np.multiply.outer(e, m - c) + c).sum(-1))

        ref = _reference(lik, a, b, 0.5 if tau is None else tau)
        assert post.mean[u] == pytest.approx(ref["mean"], abs=1e-8)
        assert post.lo[u] == pytest.approx(ref["lo"], abs=1e-6)
        assert post.hi[u] == pytest.approx(ref["hi"], abs=1e-6)
        if tau is not None:
            assert post.prob_above[u] == pytest.approx(ref["tail"], abs=1e-6)
    monkeypatch.setattr(posterior, "NARROW_MAX", -1.0)      # never narrowed: the grid of the continued tails
    whole = user_posterior(*args, tau=tau, modes=False)
    assert not any(exact for _, exact, _ in passes[-len(plan.buckets):])
    for f in ("mean", "sd", "lo", "hi") + (("prob_above",) if tau is not None else ()):   # the continued tails
        np.testing.assert_allclose(getattr(post, f), getattr(whole, f), rtol=0, atol=1e-8, err_msg=f)  # err ~e^-20


@pytest.mark.parametrize("gold", [False, True])
def test_a_narrowed_grid_that_misses_a_quantile_gives_way_to_the_full_grid(monkeypatch, gold):
    """Ends placed inside some users' quantiles (a negative margin): the narrowed pass stops and the bucket is done
    on the full grid, with the summaries of a run that never narrows, gold labels (factors vanishing at an end)
    included."""
    df = _spread_votes([1, 2, 4, 9, 20, 45] * 20, seed=13)
    st = vote_stats(_with_gold(df, seed=4) if gold else df)
    plan = build_plan(st, torch.device("cpu"), F64)
    args = (plan, None, 1.0, 2.0, torch.tensor([0.8, 0.65], dtype=F64), None)
    passes = _spy_passes(monkeypatch)
    monkeypatch.setattr(posterior, "NARROW_MARGIN", -25)
    missed = user_posterior(*args, tau=0.5, modes=False)
    assert any(exact and not done for _, exact, done in passes), passes
    monkeypatch.setattr(posterior, "NARROW_MAX", -1.0)
    whole = user_posterior(*args, tau=0.5, modes=False)
    for f in ("mean", "sd", "lo", "hi", "prob_above"):
        np.testing.assert_allclose(getattr(missed, f), getattr(whole, f), rtol=0, atol=1e-9, err_msg=f)


def test_a_tau_beyond_the_grid_keeps_the_full_grid(monkeypatch):
    """P(eta > tau) for a tau whose cells lie beyond x = -20 is read from the continued density: no bucket
    narrows, and the result is that of a run that never narrows."""
    st = vote_stats(_spread_votes([1, 3, 9, 20] * 10, seed=2))
    plan = build_plan(st, torch.device("cpu"), F64)
    args = (plan, None, 1.0, 1.0, torch.tensor([0.8, 0.65], dtype=F64), None)
    passes = _spy_passes(monkeypatch)
    post = user_posterior(*args, tau=1e-12, modes=False)
    assert passes and not any(exact for _, exact, _ in passes), passes
    monkeypatch.setattr(posterior, "NARROW_MAX", -1.0)
    whole = user_posterior(*args, tau=1e-12, modes=False)
    for f in ("mean", "sd", "lo", "hi", "prob_above"):
        np.testing.assert_array_equal(getattr(post, f), getattr(whole, f), err_msg=f)
