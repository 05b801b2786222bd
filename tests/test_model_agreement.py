"""One truth, two paths: the Pyro programs and the fast exact marginal give the same numbers."""

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from scipy.integrate import quad

from heedful.inference.globals import Globals
from heedful.model.behaviour import count_model, vote_model
from heedful.model.likelihood import build_plan, log_marginal, user_log_marginal
from heedful.suffstats import canonical_pairs, vote_stats

F64 = torch.float64


def _votes(seed: int, n: int = 80, users: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.choice(["m1", "m2", "m3"], n)
    b = np.where(a == "m1", "m2", np.where(a == "m2", "m3", "m1"))
    gold = rng.choice(["a", "b", None], n, p=[0.15, 0.1, 0.75])
    return pd.DataFrame({"user_id": rng.integers(0, users, n).astype(str), "model_a": a, "model_b": b,
                         "choice": rng.choice(["a", "b", "tie"], n, p=[0.5, 0.4, 0.1]),
                         "shown_first": rng.choice(["a", "b"], n), "gold": gold})


def _vote_tensors(df: pd.DataFrame, users: pd.Index):
    """Per-vote tensors in canonical orientation, straight from the rows (not from the statistics)."""
    pair, _, flipped = canonical_pairs(df.model_a, df.model_b)
    live = (df.choice != "tie").to_numpy()
    y = ((df.choice == "a").to_numpy() ^ flipped).astype(float)
    a_first = (df.shown_first == "a").to_numpy() ^ flipped
    gold = np.where(df.gold.isna(), -1.0, ((df.gold == "a").to_numpy() ^ flipped).astype(float))
    user = users.get_indexer(df.user_id)
    return user, pair, y, np.where(a_first, 1, 2), gold, live


def _pyro_user_marginal(u_mask, pair, y, first, gold, a, b, mu, rho, with_order):
    """log p(votes of one user) by Pyro's TraceEnum_ELBO at fixed eta, eta integrated by adaptive quadrature."""
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    n = int(u_mask.sum())
    kw = dict(n_users=1, n_pairs=3, a=a, b=b, mu_alpha=torch.ones(3, dtype=F64), mu_beta=torch.ones(3, dtype=F64),
              first=torch.as_tensor(first[u_mask]) if with_order else None,
              gold=torch.as_tensor(gold[u_mask], dtype=F64), rho=rho)
    args = (torch.zeros(n, dtype=torch.long), torch.as_tensor(pair[u_mask]), torch.as_tensor(y[u_mask], dtype=F64))

    def integrand(e: float) -> float:
        model = poutine.condition(vote_model, {"mu": mu, "eta": torch.tensor([e], dtype=F64)})
        return float(np.exp(-elbo.loss(model, lambda *_, **__: None, *args, **kw)))

    val, _ = quad(integrand, 0, 1, epsabs=0, epsrel=1e-11, limit=200)
    return np.log(val)


@pytest.mark.parametrize("with_order", [False, True])
def test_fast_path_equals_pyro_trace_enum(with_order):
    df = _votes(0)
    stats = vote_stats(df)
    a, b = torch.tensor(2.5, dtype=F64), torch.tensor(1.7, dtype=F64)
    mu = torch.tensor([0.8, 0.3, 0.65], dtype=F64)
    rho = torch.tensor(0.7, dtype=F64) if with_order else None
    plan = build_plan(stats, torch.device("cpu"), F64)
    user, pair, y, first, gold, live = _vote_tensors(df, stats.users)
    # gold labels on ties still inform mu: the Pyro program sees them through the votes they sit on
    tie_gold = (~live) & (gold >= 0)
    expected = sum(_pyro_user_marginal((user == u) & live, pair, y, first, gold, a, b, mu, rho if with_order else 0.5,
                                       with_order) for u in range(stats.n_users))
    g = gold[tie_gold]
    p = mu.numpy()[pair[tie_gold]]
    expected += float(np.sum(g * np.log(p) + (1 - g) * np.log(1 - p)))
    fast = float(log_marginal(plan, a, b, mu, rho))
    assert fast == pytest.approx(expected, abs=1e-6)


def test_gradients_match_finite_differences():
    df = _votes(1, n=120)
    stats = vote_stats(df)
    plan = build_plan(stats, torch.device("cpu"), F64)
    theta = torch.tensor([np.log(2.0), np.log(3.0), 0.4, 1.2, -0.8, 0.3], dtype=F64, requires_grad=True)

    def f(th):
        return log_marginal(plan, torch.exp(th[0]), torch.exp(th[1]), torch.sigmoid(th[2:5]), torch.sigmoid(th[5]))

    (grad,) = torch.autograd.grad(f(theta), theta)
    h = 1e-6
    for i in range(len(theta)):
        e = torch.zeros_like(theta)
        e[i] = h
        fd = (float(f(theta.detach() + e)) - float(f(theta.detach() - e))) / (2 * h)
        assert float(grad[i]) == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_count_model_equals_vote_model_at_fixed_eta():
    df = _votes(2)
    stats = vote_stats(df)
    plan = build_plan(stats, torch.device("cpu"), F64)
    cells = stats.tensors(torch.device("cpu"), F64)
    a, b = torch.tensor(2.0, dtype=F64), torch.tensor(2.0, dtype=F64)
    mu, rho = torch.tensor([0.8, 0.3, 0.65], dtype=F64), torch.tensor(0.6, dtype=F64)
    eta = torch.rand(stats.n_users, dtype=F64)
    user, pair, y, first, gold, live = _vote_tensors(df, stats.users)
    ones = torch.ones(3, dtype=F64)
    cond = {"mu": mu, "eta": eta}
    vote_ll = -TraceEnum_ELBO(max_plate_nesting=1).loss(
        poutine.condition(vote_model, cond), lambda *_, **__: None, torch.as_tensor(user[live]),
        torch.as_tensor(pair[live]), torch.as_tensor(y[live], dtype=F64), n_users=stats.n_users, n_pairs=3, a=a, b=b,
        mu_alpha=ones, mu_beta=ones, first=torch.as_tensor(first[live]), gold=torch.as_tensor(gold[live], dtype=F64),
        rho=rho)
    tie_gold = (~live) & (gold >= 0)
    g, p = gold[tie_gold], mu.numpy()[pair[tie_gold]]
    vote_ll += float(np.sum(g * np.log(p) + (1 - g) * np.log(1 - p)))
    tr = poutine.trace(poutine.condition(count_model, cond)).get_trace(plan, cells, a=a, b=b, mu_alpha=ones,
                                                                        mu_beta=ones, rho=rho)
    assert float(tr.log_prob_sum()) == pytest.approx(vote_ll, abs=1e-8)


def test_attentive_posterior_from_pyro_matches_closed_form():
    """TraceEnum_ELBO.compute_marginals gives P(z_n = 1 | y_n, eta) = eta m / (c + eta (m - c))."""
    pyro.clear_param_store()
    user = torch.tensor([0, 0, 1, 1])
    pair = torch.tensor([0, 0, 0, 0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    eta = torch.tensor([0.7, 0.2], dtype=F64)
    mu = torch.tensor([0.8], dtype=F64)
    ones = torch.ones(1, dtype=F64)
    model = poutine.condition(vote_model, {"mu": mu, "eta": eta})
    kw = dict(n_users=2, n_pairs=1, a=torch.tensor(2.0, dtype=F64), b=torch.tensor(2.0, dtype=F64),
              mu_alpha=ones, mu_beta=ones)
    marg = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(model, lambda *_, **__: None, user, pair, y, **kw)
    p_z = marg["z"].probs if hasattr(marg["z"], "probs") else marg["z"].log_prob(torch.ones(4, dtype=F64)).exp()
    e = eta[user]
    m = torch.where(y == 1, mu[pair], 1 - mu[pair])
    closed = e * m / (0.5 + e * (m - 0.5))
    assert torch.allclose(p_z.reshape(-1).to(F64), closed, atol=1e-9)
    # infer_discrete at temperature 0 gives the joint MAP of (z, t) per vote: z = 1 when e m beats the best
    # casual explanation (1 - e) max(mu, 1 - mu) / 2
    from pyro.infer import infer_discrete
    tr = poutine.trace(infer_discrete(model, first_available_dim=-2, temperature=0)).get_trace(user, pair, y, **kw)
    joint_map_z = e * m > (1 - e) * 0.5 * torch.maximum(mu[pair], 1 - mu[pair])
    assert torch.equal(tr.nodes["z"]["value"].reshape(-1).bool(), joint_map_z)


def test_user_marginals_sum_to_total_without_gold():
    df = _votes(3).drop(columns=["gold"])
    stats = vote_stats(df)
    plan = build_plan(stats, torch.device("cpu"), F64)
    g = Globals(torch.tensor(1.3, dtype=F64), torch.tensor(0.6, dtype=F64), torch.tensor([0.9, 0.2, 0.55], dtype=F64),
                None)
    assert float(user_log_marginal(plan, *g).sum()) == pytest.approx(float(log_marginal(plan, *g)), abs=1e-10)


def _assert_same_csr(x, y):
    """Two CSR matrices, or two blocked transposes, with the same blocks, row pointers and column indices."""
    xs = x.blocks if hasattr(x, "blocks") else [(0, x.shape[1], x)]
    ys = y.blocks if hasattr(y, "blocks") else [(0, y.shape[1], y)]
    assert [(u0, u1) for u0, u1, _ in xs] == [(u0, u1) for u0, u1, _ in ys]
    for (_, _, a), (_, _, b) in zip(xs, ys, strict=True):
        assert torch.equal(a.crow_indices(), b.crow_indices()) and torch.equal(a.col_indices(), b.col_indices())


@pytest.mark.parametrize("block", [1, 7, 64, 10**9])
def test_the_blocked_transpose_is_the_incidence_transposed(monkeypatch, block):
    """The transpose in CSR blocks of ``block`` users (uneven last block, one block, a block per user): the dense
    matrix is the incidence's transpose, and products with it (matrices and vectors) are the dense products; the
    marginal's gradient through it is that of one block."""
    import heedful.model.likelihood as L
    from heedful.simulate import default_pairs, simulate

    stats = vote_stats(simulate(300, 9, pairs=default_pairs(3, 0.8), vote_counts="geometric", seed=6).votes)
    one = build_plan(stats, torch.device("cpu"), F64)
    monkeypatch.setattr(L, "TRANSPOSE_BLOCK", block)
    plan = build_plan(stats, torch.device("cpu"), F64)
    gen = torch.Generator().manual_seed(0)
    for bk in plan.buckets:
        n = bk.incidence.shape[0]
        t = bk.incidence_t
        assert t.shape == (bk.incidence.shape[1], n) and len(t.blocks) == -(-n // min(block, n))
        assert torch.equal(t.to_dense(), bk.incidence.to_dense().T)
        for x in (torch.rand(n, 5, dtype=F64, generator=gen), torch.rand(n, dtype=F64, generator=gen)):
            torch.testing.assert_close(t @ x, bk.incidence.to_dense().T @ x, rtol=1e-13, atol=1e-13)
    grads = []
    for p in (one, plan):
        mu = torch.tensor([0.7, 0.8, 0.9], dtype=F64, requires_grad=True)
        log_marginal(p, torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64), mu).backward()
        grads.append(mu.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-10)


def test_buckets_and_transpose_built_in_the_background_are_the_same(monkeypatch):
    """On many cells the plan's buckets, and a large bucket's incidence transpose, come from background threads:
    the same CSRs as built inline, the same marginal and gradient through them; an error in either build is
    raised where the buckets or the transpose are used."""
    from concurrent.futures import Future

    import heedful.model.likelihood as L
    from heedful.simulate import default_pairs, simulate

    stats = vote_stats(simulate(800, 9, pairs=default_pairs(3, 0.8), seed=4).votes)
    inline = build_plan(stats, torch.device("cpu"), F64)
    monkeypatch.setattr(L, "BACKGROUND_CELLS", 0)
    deferred = build_plan(stats, torch.device("cpu"), F64)
    assert isinstance(inline.pending, list) and isinstance(deferred.pending, Future)
    deferred.wait()
    assert isinstance(deferred.pending, list)                   # resolved once, kept
    assert all(isinstance(bk.transpose, Future) for bk in deferred.buckets)
    grads = []
    for plan in (inline, deferred):
        mu = torch.tensor([0.7, 0.8, 0.9], dtype=F64, requires_grad=True)
        log_marginal(plan, torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64), mu).backward()
        grads.append(mu.grad)
    assert torch.equal(grads[0], grads[1])
    for x, y in zip(inline.buckets, deferred.buckets, strict=True):
        _assert_same_csr(x.incidence_t, y.incidence_t)
        assert isinstance(y.transpose, L.BlockedTranspose)    # resolved once, kept
        for bk in (x, y):                                      # one tensor of ones is the values of both
            assert bk.incidence.values().data_ptr() == bk.incidence_t.blocks[0][2].values().data_ptr()
            assert all(bool((m.values() == 1).all()) for _, _, m in bk.incidence_t.blocks)

    for x, y in zip(inline.buckets, deferred.buckets, strict=True):
        _assert_same_csr(x.incidence, y.incidence)
        assert torch.equal(x.users, y.users) and torch.equal(x.count, y.count) and x.n_nodes == y.n_nodes

    def broken(*args):
        raise MemoryError("no room for the transpose")

    monkeypatch.setattr(L, "_transpose", broken)
    plan = build_plan(stats, torch.device("cpu"), F64)
    with pytest.raises(MemoryError, match="no room"):
        _ = plan.buckets[0].incidence_t

    def no_buckets(*args):
        raise MemoryError("no room for the buckets")

    monkeypatch.setattr(L, "_buckets", no_buckets)
    plan = build_plan(stats, torch.device("cpu"), F64)
    assert plan.n_users == stats.n_users and plan.kinds.pair.shape[0] > 0   # the rest of the plan is there
    with pytest.raises(MemoryError, match="no room for the buckets"):
        _ = plan.buckets


@pytest.mark.parametrize("vote_counts", ["lognormal", "geometric"])
def test_plan_is_the_same_whichever_way_buckets_are_found(monkeypatch, vote_counts):
    """A bucket's cells by a mask per bucket (few buckets) or by one radix sort (many): the same plan,
    the same marginal; cells given out of order are sorted first."""
    import heedful.model.likelihood as L
    from heedful.simulate import default_pairs, simulate

    stats = vote_stats(simulate(1500, 12, vote_counts=vote_counts, pairs=default_pairs(3, 0.8), gold_rate=0.05,
                                seed=9).votes)
    monkeypatch.setattr(L, "FEW_BUCKETS", 0)
    by_sort = build_plan(stats, torch.device("cpu"), F64)
    monkeypatch.setattr(L, "FEW_BUCKETS", 100)
    perm = np.random.default_rng(1).permutation(len(stats.cell_user))
    from dataclasses import replace
    shuffled = replace(stats, cell_user=stats.cell_user[perm], cell_kind=stats.cell_kind[perm],
                       cell_count=stats.cell_count[perm])
    for other, exact in ((build_plan(stats, torch.device("cpu"), F64), True),
                         (build_plan(shuffled, torch.device("cpu"), F64), False)):   # columns in another order
        assert len(other.buckets) == len(by_sort.buckets) > 1
        for x, y in zip(other.buckets, by_sort.buckets, strict=True):
            assert x.n_nodes == y.n_nodes
            assert torch.equal(x.users, y.users) and torch.equal(x.pattern_kind, y.pattern_kind)
            for m in ("incidence", "incidence_t"):
                X, Y = getattr(x, m), getattr(y, m)
                assert torch.equal(X.to_dense(), Y.to_dense())
                if exact:
                    _assert_same_csr(X, Y)
        mu = torch.tensor([0.7, 0.8, 0.9], dtype=F64)
        a, b = torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64)
        assert float(log_marginal(other, a, b, mu)) == pytest.approx(float(log_marginal(by_sort, a, b, mu)), rel=1e-13)


def test_plan_patterns_with_counts_too_large_for_an_int32_key():
    """A bucket whose kind x (count + 1) range passes 2^31 forms its (kind, count) keys in int64: its patterns and
    incidence still list every cell's (kind, count), as in every other bucket."""
    from dataclasses import replace

    from heedful.simulate import default_pairs, simulate

    stats = vote_stats(simulate(200, 6, pairs=default_pairs(3, 0.8), seed=4).votes)
    count = stats.cell_count.copy()
    big = int(np.flatnonzero(stats.cell_kind == stats.cell_kind.max())[0])
    count[big] = 2**28                                   # 18 kinds x (2^28 + 1) > 2^31
    stats = replace(stats, cell_count=count)
    plan = build_plan(stats, torch.device("cpu"), F64)
    nu = np.bincount(stats.cell_user, weights=stats.cell_count, minlength=stats.n_users)
    assert nu.max() >= 2**28 and len(plan.buckets) > 1
    for b in plan.buckets:
        users = b.users.numpy()
        in_bucket = np.isin(stats.cell_user, users)
        dense = b.incidence.to_dense().numpy()
        got = {(int(b.pattern_kind[q]), int(b.count[q])) for q in range(len(b.pattern_kind))}
        assert got == set(zip(stats.cell_kind[in_bucket].tolist(), stats.cell_count[in_bucket].tolist(), strict=True))
        row = {u: r for r, u in enumerate(users)}
        for u, k, c in zip(stats.cell_user[in_bucket], stats.cell_kind[in_bucket], stats.cell_count[in_bucket],
                           strict=True):
            q = next(q for q in range(len(b.pattern_kind)) if (int(b.pattern_kind[q]), int(b.count[q])) == (k, c))
            assert dense[row[u], q] == 1
        assert dense.sum() == in_bucket.sum()


def test_work_beside_the_plans_build_leaves_it_a_core(monkeypatch):
    """While the buckets are still being built, ``beside_build`` runs torch on one intra-op thread fewer and
    restores the count after (also on an error); once they are built, it changes nothing."""
    import threading

    import heedful.model.likelihood as L
    from heedful.simulate import default_pairs, simulate

    stats = vote_stats(simulate(300, 6, pairs=default_pairs(2, 0.8), seed=5).votes)
    release = threading.Event()
    build = L._buckets

    def slow(*args):
        release.wait(10)
        return build(*args)

    monkeypatch.setattr(L, "BACKGROUND_CELLS", 0)
    monkeypatch.setattr(L, "_buckets", slow)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = build_plan(stats, torch.device("cpu"), F64)
        with plan.beside_build():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"), plan.beside_build():
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        release.set()
        plan.wait()
        with plan.beside_build():
            assert torch.get_num_threads() == 2
        assert plan.buckets[0].incidence.shape[0] == stats.n_users
    finally:
        release.set()
        torch.set_num_threads(before)


def test_a_lazy_plan_builds_its_buckets_when_first_asked_for(monkeypatch):
    """build_plan(lazy=True) holds the kinds and gold counts at once and builds the buckets, inline, only when
    they are first used (em's warm-start samples never ask): the same buckets as an eager plan's."""
    import heedful.model.likelihood as L
    from heedful.simulate import default_pairs, simulate

    stats = vote_stats(simulate(300, 9, pairs=default_pairs(3, 0.8), seed=4).votes)
    built = []
    build = L._buckets
    monkeypatch.setattr(L, "_buckets", lambda *a: built.append(1) or build(*a))
    eager = build_plan(stats, torch.device("cpu"), F64)
    lazy = build_plan(stats, torch.device("cpu"), F64, lazy=True)
    assert len(built) == 1 and lazy.n_users == stats.n_users and torch.equal(lazy.kinds.pair, eager.kinds.pair)
    for x, y in zip(eager.buckets, lazy.buckets, strict=True):
        _assert_same_csr(x.incidence, y.incidence)
        assert torch.equal(x.users, y.users) and torch.equal(x.count, y.count) and x.n_nodes == y.n_nodes
    assert len(built) == 2 and isinstance(lazy.pending, list)
    _ = lazy.buckets
    assert len(built) == 2                                   # built once, kept
