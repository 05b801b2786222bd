"""``--method nuts``: the full posterior of the globals and of every user's eta by NUTS (Pyro).

Two forms of the same joint posterior p(a, b, mu, rho, eta | votes), chosen by size (``form``):

* **collapsed** (``form="auto"`` picks it beyond ``FULL_MAX_USERS`` users): NUTS over the globals only, on the exact
  marginal likelihood with every eta_u (and z, t) integrated out,

      log p(votes | g) = sum_u log int L_u(eta) Beta(eta; a, b) d eta + gold term,

  then, for every global draw g_d, each user's eta drawn exactly from its one-dimensional conditional
  p(eta_u | y_u, g_d) ~ L_u(eta) Beta(eta; a, b) by inverse CDF. Users whose (kind, count) cells are
  identical share that conditional, so the integrals are computed once per *signature*, weighted by its
  multiplicity. The integral is the trapezoid rule in x = logit(eta) on [-20, 20] (spectrally accurate:
  the integrand is smooth and decays) with the tails beyond |x| = 20 in closed form (as in
  :mod:`heedful.inference.posterior`); tests hold it to the Gauss-Jacobi marginal.
* **full**: NUTS over every eta_u and the globals on the count likelihood (z, t summed out), with
  ``jit_compile=True``. Cost grows with users, and with a learned (a, b) the centred hierarchy has a
  funnel (a + b against the eta_u of users with few votes) that slows mixing; the collapsed form has
  neither problem, so "auto" uses the full form only for tiny data (<= 100 users); it stays as the
  check of the collapsed form (tests hold them to the same posterior).

Priors on the globals (the sampler needs proper ones; the point fits use none):

* a, b learned: a = m k, b = (1 - m) k with the population mean m ~ Beta(1, 1) and the concentration
  k = a + b ~ LogNormal(log 5, 1.5) (weakly informative: 95% in [0.26, 95]); fixed a, b: as given.
* mu_p: the config's Beta prior, Beta(1, 1) when learned, conditioned when known; strengths:
  Normal(0, strength_sd), Normal(0, 3) when the config gives none.
* rho (position bias): the config's Beta prior (default Beta(1, 1)).

Per-vote attentiveness P(z_n = 1 | votes) is recovered on request (``per_vote``) with
``infer_discrete`` on :func:`heedful.model.behaviour.vote_model`, one vote per (user, kind) cell (votes
of one cell share it), averaged over posterior draws.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, infer_discrete

from heedful.inference.globals import Globals, GlobalSpec, initial_mu
from heedful.inference.posterior import UserPosterior
from heedful.model.likelihood import Kinds, QuadraturePlan, build_plan, casual_prob, csr_tensor, log_marginal
from heedful.suffstats import N_GOLD, VoteStats

ETA_MEAN_PRIOR = (1.0, 1.0)              # Beta prior on m = a / (a + b)
ETA_CONC_PRIOR = (math.log(5.0), 1.5)    # LogNormal prior on k = a + b
STRENGTH_SD = 3.0                        # Normal(0, sd) on strengths when the config gives none
X_EDGE = 20.0                            # the logit grid spans [-X_EDGE, X_EDGE]
FULL_MAX_USERS = 100                     # "auto" picks the full form up to this many users
MAX_STORED_VALUES = 20_000_000           # per-user draws kept in the InferenceData (users x chains x draws)


# -- the data in the forms the samplers need ---------------------------------------------------------
@dataclass
class UserCells:
    """Non-tie vote counts per (user, kind), sorted by user, with kinds that the model cannot tell apart
    merged (the shown-first order when casual users are coin flips); ``start``/``length`` index each
    user's cells (CSR)."""

    n_users: int
    user: torch.Tensor      # long [C]
    kind: torch.Tensor      # long [C]
    count: torch.Tensor     # [C]
    start: torch.Tensor     # long [U]
    length: torch.Tensor    # long [U]
    kinds: Kinds
    gold_a: torch.Tensor
    gold_n: torch.Tensor

    def subset(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cells of ``users`` (long [B]): (cell index [C_B], position of the cell's user in ``users``)."""
        n = self.length[users]
        local = torch.repeat_interleave(torch.arange(users.shape[0], device=users.device), n)
        first = torch.repeat_interleave(self.start[users] - torch.cumsum(n, 0) + n, n)
        return first + torch.arange(local.shape[0], device=users.device), local

    def loglik(self, eta: torch.Tensor, g: Globals, cells: torch.Tensor | None = None,
               local: torch.Tensor | None = None) -> torch.Tensor:
        """log L_u(eta_u) per user [len(eta)]: sum over the user's cells of count log(c + eta (m - c))."""
        kind = self.kind if cells is None else self.kind[cells]
        cnt = self.count if cells is None else self.count[cells]
        owner = self.user if local is None else local
        m = self.kinds.attentive_prob(g.mu)[kind]
        c = casual_prob(self.kinds.first[kind], g.rho).to(eta.dtype)
        ll = torch.xlogy(cnt, c + eta[owner] * (m - c))
        return torch.zeros(eta.shape[0], dtype=eta.dtype, device=eta.device).index_add(0, owner, ll)


def user_cells(stats: VoteStats, spec: GlobalSpec, device: torch.device, dtype: torch.dtype,
               kinds: Kinds) -> UserCells:
    """Build :class:`UserCells`; the order a pair was shown in is dropped unless the model uses it."""
    user, kind, count = stats.cell_user, stats.cell_kind, stats.cell_count
    if not spec.position:
        kind = kind - stats.kinds()["first"][kind] * N_GOLD
        key, inv = np.unique(user * stats.n_kinds + kind, return_inverse=True)
        count = np.bincount(inv.reshape(-1), weights=count).astype(np.int64)
        user, kind = key // stats.n_kinds, key % stats.n_kinds
    length = np.bincount(user, minlength=stats.n_users)
    start = np.cumsum(length) - length
    t = lambda v, d=None: torch.as_tensor(v, device=device, dtype=d)  # noqa: E731
    return UserCells(stats.n_users, t(user), t(kind), t(count, dtype), t(start), t(length), kinds,
                     t(stats.gold_a, dtype), t(stats.gold_n, dtype))


@dataclass
class SignatureGrid:
    """Users grouped by identical cells (signature), and the logit grid for their one-dimensional integrals."""

    user_sig: torch.Tensor   # long [U]: each user's signature; users without votes have an empty one
    mult: torch.Tensor       # [R] users per signature
    sig_cells: UserCells     # the cells of one representative per signature (R "users")
    x: torch.Tensor          # [G] grid in logit(eta)
    log_trap: torch.Tensor   # [G] log trapezoid weights
    h: float
    pattern_kind: torch.Tensor   # long [Q]: the distinct (kind, count) of the signatures' cells
    pattern_count: torch.Tensor  # [Q]
    incidence: torch.Tensor      # CSR [R, Q]: 1 where signature r has a cell with pattern q

    @property
    def n_sig(self) -> int:
        return int(self.mult.shape[0])

    def log_parts(self, g: Globals) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """log L_r(sigmoid x_g) [R, G]; log node weights w_g sigmoid(x_g)^a sigmoid(-x_g)^b / B(a, b) [G];
        log tail masses (lower, upper) over B(a, b).

        Beyond x < -X the prior density in x is e^(a x) / B(a, b) to relative 1e-9 and L_r is flat, so the
        lower tail adds L_r(sigmoid(-X)) e^(-a X) / (a B(a, b)); likewise the upper with b.
        """
        x = self.x
        lbeta = torch.lgamma(g.a) + torch.lgamma(g.b) - torch.lgamma(g.a + g.b)
        lw = self.log_trap + g.a * torch.nn.functional.logsigmoid(x) + g.b * torch.nn.functional.logsigmoid(-x)
        t_lo = -X_EDGE * g.a - torch.log(g.a) - lbeta
        t_hi = -X_EDGE * g.b - torch.log(g.b) - lbeta
        c = self.sig_cells
        m = c.kinds.attentive_prob(g.mu)[c.kind].unsqueeze(1)
        cc = casual_prob(c.kinds.first[c.kind], g.rho).to(x.dtype).unsqueeze(1)
        table = torch.xlogy(c.count.unsqueeze(1), cc + torch.sigmoid(x).unsqueeze(0) * (m - cc))
        ll = torch.zeros(self.n_sig, x.shape[0], dtype=x.dtype, device=x.device).index_add(0, c.user, table)
        return ll, lw - lbeta, t_lo, t_hi

    def log_bins(self, g: Globals) -> torch.Tensor:
        """[R, G + 2] log joint mass of (lower tail, each node, upper tail): the integrand of m_r, binned."""
        ll, lw, t_lo, t_hi = self.log_parts(g)
        return torch.cat([ll[:, :1] + t_lo, ll + lw, ll[:, -1:] + t_hi], 1)

    def log_marginal(self, g: Globals) -> torch.Tensor:
        """log p(votes, gold | g) = sum_r mult_r log m_r + gold term."""
        lm = torch.logsumexp(self.log_bins(g), dim=1)
        return (lm * self.mult).sum() + gold_loglik_cells(self.sig_cells, g.mu)


def gold_loglik_cells(c: UserCells, mu: torch.Tensor) -> torch.Tensor:
    return (torch.xlogy(c.gold_a, mu) + torch.xlogy(c.gold_n - c.gold_a, 1.0 - mu)).sum()


def signature_grid(cells: UserCells, n_grid: int | None = None, seed: int = 12345) -> SignatureGrid:
    """Group users by their set of (kind, count) cells: two random 64-bit float hashes summed per user."""
    user, kind, count = (t.cpu().numpy() for t in (cells.user, cells.kind, cells.count))
    count = count.astype(np.int64)
    code = kind * (int(count.max(initial=0)) + 1) + count
    uniq, ci = np.unique(code, return_inverse=True)
    h = np.random.default_rng(seed).random((len(uniq), 2))
    sig = np.zeros((cells.n_users, 2))
    np.add.at(sig, user, h[ci.reshape(-1)])
    _, rep, inv, mult = np.unique(sig, axis=0, return_index=True, return_inverse=True, return_counts=True)
    remap = np.full(cells.n_users, -1)
    remap[rep] = np.arange(len(rep))
    keep = np.flatnonzero(remap[user] >= 0)
    keep = keep[np.argsort(remap[user[keep]], kind="stable")]      # sorted by signature (CSR)
    dev, dt = cells.count.device, cells.count.dtype
    ru = remap[user[keep]]
    length = np.bincount(ru, minlength=len(rep))
    t = lambda v, d=None: torch.as_tensor(v, device=dev, dtype=d)  # noqa: E731
    sc = UserCells(len(rep), t(ru), t(kind[keep]), t(count[keep], dt), t(np.cumsum(length) - length), t(length),
                   cells.kinds, cells.gold_a, cells.gold_n)
    n_max = int(np.bincount(user, weights=count, minlength=cells.n_users).max(initial=0))
    G = n_grid or int(np.clip(100.0 * math.sqrt(n_max + 1.0), 400, 4000)) | 1
    x = torch.linspace(-X_EDGE, X_EDGE, G, dtype=dt, device=dev)
    step = 2 * X_EDGE / (G - 1)
    w = torch.full((G,), step, dtype=dt, device=dev)
    w[0] = w[-1] = step / 2
    width = int(count.max(initial=0)) + 1
    pat, pinv = np.unique(kind[keep] * width + count[keep], return_inverse=True)
    crow = np.concatenate([[0], np.cumsum(length)])
    ones = torch.ones(len(keep), dtype=dt, device=dev)
    incidence = csr_tensor(t(crow), t(pinv.reshape(-1)), ones, (len(rep), len(pat)))
    return SignatureGrid(t(inv.reshape(-1)), t(mult, dt), sc, x, torch.log(w), step, t(pat // width),
                         t(pat % width, dt), incidence)


# -- the Pyro programs -------------------------------------------------------------------------------
def sample_globals(spec: GlobalSpec, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu") -> Globals:
    """Sample sites for the free globals under the priors above; returns (a, b, mu, rho)."""
    t = lambda v: torch.as_tensor(v, dtype=dtype, device=device)  # noqa: E731
    if spec.eta_fixed is None:
        m = pyro.sample("eta_mean", dist.Beta(t(ETA_MEAN_PRIOR[0]), t(ETA_MEAN_PRIOR[1])))
        k = pyro.sample("eta_conc", dist.LogNormal(t(ETA_CONC_PRIOR[0]), t(ETA_CONC_PRIOR[1])))
        a, b = m * k, (1.0 - m) * k
    else:
        a, b = t(spec.eta_fixed[0]), t(spec.eta_fixed[1])
    rho = None
    if spec.learn_rho:
        rho = pyro.sample("rho", dist.Beta(t(spec.rho_prior[0]), t(spec.rho_prior[1])))
    elif spec.position:
        rho = t(spec.rho_fixed)
    if spec.strengths:
        M = len(spec.models)
        sd = spec.strength_sd or STRENGTH_SD
        s = pyro.sample("strength", dist.Normal(t(0.0), t(sd)).expand([M - 1]).to_event(1))
        s = torch.cat([s[: spec.reference], s.new_zeros(1), s[spec.reference:]])
        pm = torch.as_tensor(spec.pair_models, device=device)
        mu = torch.sigmoid(s[pm[:, 0]] - s[pm[:, 1]])
    else:
        mu = t(np.nan_to_num(spec.mu_known, nan=0.5))
        free = spec.free_mu
        if free.any():
            with pyro.plate("free_pairs", int(free.sum())):
                mf = pyro.sample("mu_free", dist.Beta(t(spec.mu_alpha[free]), t(spec.mu_beta[free])))
            mu = mu.masked_scatter(torch.as_tensor(free, device=device), mf)
    return Globals(a, b, mu, rho)


def collapsed_model(grid: SignatureGrid, spec: GlobalSpec, plan: QuadraturePlan | None = None) -> None:
    """The globals only: every eta_u, z_n and t_n integrated out into one factor (by Gauss-Jacobi through
    ``plan`` when given, as the marginal fit does, else on the signature grid)."""
    g = sample_globals(spec, grid.x.dtype, grid.x.device)
    pyro.factor("marginal", grid.log_marginal(g) if plan is None else log_marginal(plan, g.a, g.b, g.mu, g.rho))


class CollapsedPotential:
    """-log p(globals, votes) in NUTS's unconstrained coordinates, written out for speed (no Pyro trace).

    The same density as :func:`collapsed_model` under Pyro's transforms (logit for Beta sites, log for
    LogNormal ones), including their log-Jacobians; ``tests/test_nuts.py`` holds the two equal. Constant
    pieces of the grid (sigmoid and log-sigmoid of the nodes, casual probabilities without position
    bias) are computed once. With ``plan`` the marginal is the fast path's exact Gauss-Jacobi sum
    (:func:`heedful.model.likelihood.log_marginal`): at 5k users about 100 times cheaper than the grid.
    """

    def __init__(self, grid: SignatureGrid, spec: GlobalSpec, plan: QuadraturePlan | None = None) -> None:
        self.grid, self.spec, self.plan = grid, spec, plan
        x = grid.x
        self.sx = torch.sigmoid(x)
        self.lw0 = grid.log_trap
        self.ls_p, self.ls_m = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
        c = grid.sig_cells
        self.first = c.kinds.first[c.kind]
        self.c_half = torch.full(self.first.shape, 0.5, dtype=x.dtype)
        self.pair = c.kinds.pair[c.kind]
        self.pick_a = c.kinds.pick_a[c.kind]
        self.gold = c.kinds.gold[c.kind]
        dt = x.dtype
        self.known = torch.as_tensor(np.nan_to_num(spec.mu_known, nan=0.5), dtype=dt)
        self.free = torch.as_tensor(spec.free_mu)
        self.mu_al = torch.as_tensor(spec.mu_alpha[spec.free_mu], dtype=dt)
        self.mu_be = torch.as_tensor(spec.mu_beta[spec.free_mu], dtype=dt)
        self.lb_mu = torch.lgamma(self.mu_al) + torch.lgamma(self.mu_be) - torch.lgamma(self.mu_al + self.mu_be)
        if spec.strengths:
            self.pm = torch.as_tensor(spec.pair_models)

    def globals(self, z: dict[str, torch.Tensor]) -> tuple[Globals, torch.Tensor]:
        """(a, b, mu, rho) from unconstrained z, and log prior + log Jacobian."""
        spec, dt = self.spec, self.grid.x.dtype
        lp = torch.zeros((), dtype=dt)
        if spec.eta_fixed is None:
            u, v = z["eta_mean"], z["eta_conc"]
            m, k = torch.sigmoid(u), torch.exp(v)
            al, be = ETA_MEAN_PRIOR
            lp = lp + al * torch.nn.functional.logsigmoid(u) + be * torch.nn.functional.logsigmoid(-u) \
                - (math.lgamma(al) + math.lgamma(be) - math.lgamma(al + be))
            mu0, sd = ETA_CONC_PRIOR
            lp = lp - 0.5 * ((v - mu0) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)
            a, b = m * k, (1.0 - m) * k
        else:
            a, b = torch.tensor(spec.eta_fixed[0], dtype=dt), torch.tensor(spec.eta_fixed[1], dtype=dt)
        rho = None
        if spec.learn_rho:
            u = z["rho"]
            rho = torch.sigmoid(u)
            ra, rb = spec.rho_prior
            lp = lp + ra * torch.nn.functional.logsigmoid(u) + rb * torch.nn.functional.logsigmoid(-u) \
                - (math.lgamma(ra) + math.lgamma(rb) - math.lgamma(ra + rb))
        elif spec.position:
            rho = torch.tensor(spec.rho_fixed, dtype=dt)
        if spec.strengths:
            s = z["strength"]
            sd = spec.strength_sd or STRENGTH_SD
            lp = lp - 0.5 * (s * s).sum() / sd ** 2 - s.shape[-1] * (math.log(sd) + 0.5 * math.log(2 * math.pi))
            s = torch.cat([s[: spec.reference], s.new_zeros(1), s[spec.reference:]])
            mu = torch.sigmoid(s[self.pm[:, 0]] - s[self.pm[:, 1]])
        elif spec.free_mu.any():
            u = z["mu_free"]
            lp = lp + (self.mu_al * torch.nn.functional.logsigmoid(u) + self.mu_be * torch.nn.functional.logsigmoid(-u)
                       - self.lb_mu).sum()
            mu = self.known.masked_scatter(self.free, torch.sigmoid(u))
        else:
            mu = self.known
        return Globals(a, b, mu, rho), lp

    def log_marginal(self, g: Globals) -> torch.Tensor:
        """Same value as :meth:`SignatureGrid.log_marginal`, fewer operations (or the plan's exact sum)."""
        if self.plan is not None:
            return log_marginal(self.plan, g.a, g.b, g.mu, g.rho)
        mu_k = g.mu[self.pair]
        m = torch.where(self.pick_a, mu_k, 1.0 - mu_k)
        m = torch.where(self.gold == 1, torch.ones_like(m), torch.where(self.gold == 2, torch.zeros_like(m), m))
        c = self.c_half if g.rho is None else torch.where(
            self.first == 1, g.rho, torch.where(self.first == 2, 1.0 - g.rho, self.c_half))
        sc = self.grid.sig_cells
        table = torch.xlogy(sc.count[:, None], c[:, None] + self.sx * (m - c)[:, None])
        ll = torch.zeros(self.grid.n_sig, self.sx.shape[0], dtype=table.dtype).index_add(0, sc.user, table)
        lbeta = torch.lgamma(g.a) + torch.lgamma(g.b) - torch.lgamma(g.a + g.b)
        lw = self.lw0 + g.a * self.ls_p + g.b * self.ls_m
        t_lo = (-X_EDGE * g.a - torch.log(g.a)).reshape(1)
        t_hi = (-X_EDGE * g.b - torch.log(g.b)).reshape(1)
        lm = torch.logsumexp(torch.cat([ll[:, :1] + t_lo, ll + lw, ll[:, -1:] + t_hi], 1), 1) - lbeta
        return (lm * self.grid.mult).sum() + gold_loglik_cells(sc, g.mu)

    def __call__(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        g, lp = self.globals(z)
        return -(self.log_marginal(g) + lp)


def full_model(cells: UserCells, spec: GlobalSpec) -> None:
    """Every eta_u kept; z and t summed out per (user, kind) cell."""
    dt, dev = cells.count.dtype, cells.count.device
    g = sample_globals(spec, dt, dev)
    pyro.factor("gold", gold_loglik_cells(cells, g.mu))
    with pyro.plate("users", cells.n_users):
        eta = pyro.sample("eta", dist.Beta(g.a, g.b))
        pyro.factor("votes", cells.loglik(eta, g))


def _globals_batched(spec: GlobalSpec, flat: dict[str, torch.Tensor]) -> Globals:
    """The deterministic part of ``sample_globals`` on columns of draws (no Pyro sites)."""
    n = next(iter(flat.values())).shape[0]
    dt = next(iter(flat.values())).dtype
    if spec.eta_fixed is None:
        m, k = flat["eta_mean"], flat["eta_conc"]
        a, b = m * k, (1.0 - m) * k
    else:
        a, b = torch.full((n,), spec.eta_fixed[0], dtype=dt), torch.full((n,), spec.eta_fixed[1], dtype=dt)
    rho = flat["rho"] if spec.learn_rho else (torch.full((n,), spec.rho_fixed, dtype=dt) if spec.position else None)
    if spec.strengths:
        s = flat["strength"]
        s = torch.cat([s[:, : spec.reference], s.new_zeros(n, 1), s[:, spec.reference:]], 1)
        pm = torch.as_tensor(spec.pair_models)
        mu = torch.sigmoid(s[:, pm[:, 0]] - s[:, pm[:, 1]])
    else:
        mu = torch.as_tensor(np.nan_to_num(spec.mu_known, nan=0.5), dtype=dt).expand(n, spec.n_pairs).clone()
        if spec.free_mu.any():
            mu[:, torch.as_tensor(spec.free_mu)] = flat["mu_free"].reshape(n, -1)
    return Globals(a, b, mu, rho)


def draw_globals(spec: GlobalSpec, samples: dict[str, torch.Tensor], lead: tuple[int, int] | None = None,
                 dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """a, b, mu [.., P] and rho from latent draws with leading dims [chains, draws] (``lead`` when there are
    no latent globals: everything known)."""
    if samples:
        lead = next(iter(samples.values())).shape[:2]
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in samples.items()}
        g = _globals_batched(spec, flat)
        out = {"a": g.a, "b": g.b, "mu": g.mu}
        if g.rho is not None:
            out["rho"] = g.rho
        return {k: v.reshape(*lead, *v.shape[1:]) for k, v in out.items()}
    g = spec.unpack(torch.zeros(0, dtype=dtype))
    out = {"a": g.a.expand(*lead), "b": g.b.expand(*lead), "mu": g.mu.expand(*lead, spec.n_pairs)}
    if g.rho is not None:
        out["rho"] = g.rho.expand(*lead)
    return {k: v.clone() for k, v in out.items()}


# -- exact conditional draws of eta given the globals --------------------------------------------------
def batched_bins(grid: SignatureGrid, a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor,
                 rho: torch.Tensor | None) -> torch.Tensor:
    """[n, R, G + 2] normalised masses of (lower tail, one bin per node, upper tail) for n global draws.

    Node g's bin is [x_g - h/2, x_g + h/2] clipped to [-X, X], with a constant density in x inside; the
    tails are as in :meth:`SignatureGrid.log_parts`. a, b: [n]; mu: [n, P]; rho: [n] or None.
    """
    x = grid.x
    pk, k = grid.pattern_kind, grid.sig_cells.kinds
    mu_k = mu[:, k.pair[pk]]
    m = torch.where(k.pick_a[pk], mu_k, 1.0 - mu_k)
    gold = k.gold[pk]
    m = torch.where(gold == 1, torch.ones_like(m), torch.where(gold == 2, torch.zeros_like(m), m))
    first = k.first[pk]
    half = torch.full_like(m, 0.5)
    cc = half if rho is None else torch.where(first == 1, rho[:, None], torch.where(first == 2, 1 - rho[:, None], half))
    # per (kind, count) pattern [n, Q, G], then summed per signature through the incidence: [n, R, G]
    table = torch.xlogy(grid.pattern_count[None, :, None], cc[..., None] + torch.sigmoid(x) * (m - cc)[..., None])
    n, Q, G = table.shape
    ll = (grid.incidence @ table.transpose(0, 1).reshape(Q, n * G)).reshape(grid.n_sig, n, G).transpose(0, 1)
    a_, b_ = a[:, None], b[:, None]
    lw = grid.log_trap + a_ * torch.nn.functional.logsigmoid(x) + b_ * torch.nn.functional.logsigmoid(-x)
    t_lo, t_hi = -X_EDGE * a_ - torch.log(a_), -X_EDGE * b_ - torch.log(b_)
    logm = torch.cat([ll[..., :1] + t_lo[..., None], ll + lw[:, None, :], ll[..., -1:] + t_hi[..., None]], 2)
    return torch.softmax(logm, dim=2)


def _invert(cdf: torch.Tensor, row: torch.Tensor, v: torch.Tensor, grid: SignatureGrid, a: torch.Tensor,
            b: torch.Tensor) -> torch.Tensor:
    """x with CDF_row(x) = v for each (row, v) pair; cdf: [rows, G + 2] cumulative bin masses (last = 1);
    a, b: the prior's parameters per pair (for the closed-form tails)."""
    R, nb = cdf.shape
    off = torch.arange(R, dtype=cdf.dtype, device=cdf.device)[:, None]
    flat = (cdf + off).reshape(-1)
    rf = row.to(cdf.dtype)
    j = torch.searchsorted(flat, rf + v).clamp(max=R * nb - 1)
    j = torch.maximum(j, row * nb)
    k = j - row * nb                                   # bin index within the row
    hi_c = flat[j] - rf
    lo_c = torch.where(k > 0, flat[(j - 1).clamp_min(0)] - rf, torch.zeros_like(hi_c))
    frac = ((v - lo_c) / (hi_c - lo_c).clamp_min(1e-300)).clamp(1e-12, 1.0)
    G, h, X = grid.x.shape[0], grid.h, X_EDGE
    node = (k - 1).clamp(0, G - 1)
    left = (grid.x[node] - h / 2).clamp_min(-X)
    right = (grid.x[node] + h / 2).clamp_max(X)
    x = left + frac * (right - left)
    x = torch.where(k == 0, -X + torch.log(frac) / a, x)
    return torch.where(k == G + 1, X - torch.log1p(-frac.clamp_max(1 - 1e-12)) / b, x)


@torch.no_grad()
def conditional_eta(grid: SignatureGrid, draws: dict[str, torch.Tensor], spec: GlobalSpec, users: torch.Tensor,
                    level: float, seed: int, chunk_elements: int = 4_000_000) -> tuple[torch.Tensor, UserPosterior]:
    """For each global draw, every user's eta from p(eta_u | y_u, g_d) by inverse CDF.

    Returns the draws for ``users`` ([chains, draws, len(users)], float32) and every user's summaries of
    the mixture over draws (mean from the exact rule, interval and median from the averaged CDF).
    """
    C, D = draws["a"].shape[:2]
    N = C * D
    flat = {k: v.reshape(N, *v.shape[2:]) for k, v in draws.items()}
    R, G = grid.n_sig, grid.x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(N, users.shape[0], dtype=torch.float32)
    mix = torch.zeros(R, G + 2, dtype=grid.x.dtype)
    eta_nodes = torch.cat([grid.x.new_zeros(1), torch.sigmoid(grid.x), grid.x.new_ones(1)])
    mean = torch.zeros(R, dtype=grid.x.dtype)
    row = grid.user_sig[users]
    step = max(1, chunk_elements // max(R * (G + 2), users.shape[0]))
    for s in range(0, N, step):   # chunks of global draws
        sl = slice(s, min(s + step, N))
        n = sl.stop - sl.start
        p = batched_bins(grid, flat["a"][sl], flat["b"][sl], flat["mu"][sl], flat["rho"][sl] if "rho" in flat else None)
        mix += p.sum(0)
        mean += (p * eta_nodes).sum((0, 2))
        v = torch.rand(n, users.shape[0], generator=gen, dtype=grid.x.dtype)
        rows = (torch.arange(n)[:, None] * R + row[None, :]).reshape(-1)
        ab = (flat["a"][sl][:, None].expand(n, users.shape[0]).reshape(-1),
              flat["b"][sl][:, None].expand(n, users.shape[0]).reshape(-1))
        x = _invert(torch.cumsum(p, 2).reshape(n * R, G + 2), rows, v.reshape(-1), grid, *ab)
        out[sl] = torch.sigmoid(x).reshape(n, -1).float()
    mix /= N
    mean /= N
    cdf = torch.cumsum(mix, 1)
    a_bar, b_bar = flat["a"].mean(), flat["b"].mean()
    q = {}
    rr = torch.arange(R)
    for name, lev in (("lo", (1 - level) / 2), ("med", 0.5), ("hi", (1 + level) / 2)):
        q[name] = torch.sigmoid(_invert(cdf, rr, torch.full((R,), lev, dtype=cdf.dtype), grid, a_bar, b_bar))
    sd = ((mix * eta_nodes ** 2).sum(1) - mean ** 2).clamp_min(0).sqrt()
    sig = grid.user_sig
    np_ = lambda t: t[sig].cpu().numpy()  # noqa: E731
    post = UserPosterior(mean=np_(mean), mode=np_(q["med"]), lo=np.minimum(np_(q["lo"]), np_(mean)),
                         hi=np.maximum(np_(q["hi"]), np_(mean)), sd=np_(sd))
    return out.reshape(C, D, -1), post


def draw_summaries(eta: torch.Tensor, level: float) -> UserPosterior:
    """Per-user mean, median (as the point estimate), central interval and sd from draws [chains, draws, U]."""
    e = eta.reshape(-1, eta.shape[-1]).to(torch.float64)
    q = torch.quantile(e, torch.tensor([(1 - level) / 2, 0.5, (1 + level) / 2], dtype=e.dtype), dim=0)
    return UserPosterior(mean=e.mean(0).numpy(), mode=q[1].numpy(), lo=q[0].numpy(), hi=q[2].numpy(),
                         sd=e.std(0).numpy())


# -- per-vote attentiveness ----------------------------------------------------------------------------
@torch.no_grad()
def attentive_probability(cells: UserCells, eta: torch.Tensor, draws: dict[str, torch.Tensor],
                          n_draws: int = 100, seed: int = 0) -> torch.Tensor:
    """P(z = 1 | votes) for a vote of each (user, kind) cell, by ``infer_discrete`` on ``vote_model``.

    ``eta``: [chains, draws, U] posterior draws of every user; the mean of sampled z over ``n_draws``
    evenly spaced draws (the discrete sites are sampled at temperature 1 given eta and the globals).
    """
    from heedful.model.behaviour import vote_model

    C, D = eta.shape[:2]
    idx = torch.linspace(0, C * D - 1, min(n_draws, C * D)).long()
    e = eta.reshape(C * D, -1)[idx].to(cells.count.dtype)
    flat = {k: v.reshape(C * D, *v.shape[2:])[idx] for k, v in draws.items()}
    k = cells.kinds
    pick = k.pick_a[cells.kind].to(cells.count.dtype)
    gold_k = k.gold[cells.kind]
    gold = torch.where(gold_k == 1, pick, torch.where(gold_k == 2, 1 - pick, -torch.ones_like(pick)))
    # vote_model's order code: 1 canonical model_a shown first, 2 model_b first (kinds say: picked first / second)
    kf = k.first[cells.kind]
    first = torch.where(kf == 0, 0, torch.where((kf == 1) == k.pick_a[cells.kind], 1, 2))
    n_pairs = int(draws["mu"].shape[-1])
    pyro.set_rng_seed(seed)
    total = torch.zeros(cells.user.shape[0], dtype=cells.count.dtype)
    for i in range(len(idx)):
        data = {"eta": e[i], "mu": flat["mu"][i]}
        rho = flat["rho"][i] if "rho" in flat else 0.5
        model = poutine.condition(vote_model, data=data)
        sampler = infer_discrete(model, first_available_dim=-2, temperature=1)
        tr = poutine.trace(sampler).get_trace(
            cells.user, k.pair[cells.kind], pick, n_users=cells.n_users, n_pairs=n_pairs,
            a=flat["a"][i], b=flat["b"][i], mu_alpha=torch.ones(n_pairs, dtype=pick.dtype),
            mu_beta=torch.ones(n_pairs, dtype=pick.dtype), first=first,
            gold=gold if bool((gold >= 0).any()) else None, rho=rho)
        total += tr.nodes["z"]["value"].reshape(-1)
    return total / len(idx)


# -- running NUTS --------------------------------------------------------------------------------------
class _Recorder:
    """hook_fn for MCMC: per-draw divergence, step size and log density, by chain."""

    def __init__(self, chains: int, draws: int) -> None:
        self.diverging = np.zeros((chains, draws), dtype=bool)
        self.step_size = np.zeros((chains, draws))
        self.lp = np.zeros((chains, draws))
        self.chain, self._seen = -1, 0

    def __call__(self, kernel, params, stage: str, i: int) -> None:
        if stage != "Sample":
            return
        if i == 0:
            self.chain += 1
            self._seen = len(kernel._divergences)
        c = self.chain
        self.diverging[c, i] = len(kernel._divergences) > self._seen
        self._seen = len(kernel._divergences)
        self.step_size[c, i] = float(kernel.step_size)
        pe = kernel._potential_energy_last
        self.lp[c, i] = -float(pe) if pe is not None else np.nan


def run_nuts(model, model_args: tuple, *, chains: int, draws: int, warmup: int, seed: int, jit: bool,
             init: dict[str, torch.Tensor], target_accept: float = 0.8, max_tree_depth: int = 10,
             progress: bool = False, potential_fn=None) -> tuple[dict[str, torch.Tensor], _Recorder]:
    """NUTS chains drawn one after another in this process (Pyro runs them sequentially on few CPUs).

    With ``potential_fn`` (unconstrained coordinates) the draws are mapped back by :func:`constrain`.
    """
    pyro.set_rng_seed(seed)
    if potential_fn is not None:
        kernel = NUTS(potential_fn=potential_fn, target_accept_prob=target_accept, max_tree_depth=max_tree_depth)
    else:
        kernel = NUTS(model, jit_compile=jit, ignore_jit_warnings=True, target_accept_prob=target_accept,
                      max_tree_depth=max_tree_depth, full_mass=False)
    rec = _Recorder(chains, draws)
    g = torch.Generator().manual_seed(seed)
    inits = {k: torch.stack([_jitter(v, g) for _ in range(chains)]) for k, v in init.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains")
        mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, num_chains=chains,
                    initial_params=inits if chains > 1 else {k: v[0] for k, v in inits.items()},
                    disable_progbar=not progress, hook_fn=rec, mp_context=None)
        if chains > 1:
            mcmc.sampler = _sequential(mcmc, kernel, inits, rec, progress)
        mcmc.run(*model_args)
    samples = mcmc.get_samples(group_by_chain=True)
    return (constrain(samples) if potential_fn is not None else samples), rec


def constrain(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unconstrained draws of :class:`CollapsedPotential` -> the sites of :func:`sample_globals`."""
    f = {"eta_mean": torch.sigmoid, "eta_conc": torch.exp, "rho": torch.sigmoid, "mu_free": torch.sigmoid}
    return {k: f.get(k, lambda v: v)(v) for k, v in z.items()}


def _sequential(mcmc: MCMC, kernel, inits: dict, rec: _Recorder, progress: bool):
    """Force Pyro's in-process sampler (parallel processes gain nothing on a shared 2-core machine)."""
    from pyro.infer.mcmc.api import _UnarySampler

    if isinstance(mcmc.sampler, _UnarySampler):
        return mcmc.sampler
    return _UnarySampler(kernel, mcmc.num_samples, mcmc.warmup_steps, mcmc.num_chains, not progress,
                         initial_params=inits, hook=rec)


def _jitter(v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An overdispersed start in the unconstrained space."""
    return v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)


def _init_unconstrained(spec: GlobalSpec, stats: VoteStats, dt: torch.dtype) -> dict[str, torch.Tensor]:
    """Starting points (unconstrained, as NUTS's ``initial_params``) near a moment guess."""
    out: dict[str, torch.Tensor] = {}
    if spec.eta_fixed is None:
        out["eta_mean"] = torch.tensor(0.0, dtype=dt)           # logit 0.5
        out["eta_conc"] = torch.tensor(math.log(4.0), dtype=dt)
    if spec.learn_rho:
        out["rho"] = torch.tensor(0.0, dtype=dt)
    if spec.strengths:
        out["strength"] = torch.zeros(len(spec.models) - 1, dtype=dt)
    elif spec.free_mu.any():
        mu0 = np.clip(initial_mu(stats, spec)[spec.free_mu], 0.05, 0.95)
        out["mu_free"] = torch.as_tensor(np.log(mu0) - np.log1p(-mu0), dtype=dt)
    return out


def fit_nuts(ctx) -> object:
    """The registry entry for ``--method nuts`` (see :mod:`heedful.inference.estimator`)."""
    from heedful.inference.diagnostics import build_inference_data, summarize
    from heedful.inference.estimator import MethodResult
    from heedful.inference.marginal import objective
    from heedful.inference.result import GlobalFit

    opt = ctx.options
    chains, draws = int(opt.get("chains", 4)), int(opt.get("draws", 1000))
    warmup, seed = int(opt.get("warmup", draws)), int(opt.get("seed", 0))
    stats, spec, plan = ctx.stats, ctx.spec, ctx.plan
    dt = plan.dtype if plan.dtype == torch.float64 else torch.float64
    dev = torch.device("cpu")
    form = opt.get("form", "auto")
    if form == "auto":
        form = "full" if stats.n_users <= FULL_MAX_USERS and spec.n_free else "collapsed"
    cells = user_cells(stats, spec, dev, dt, _kinds_on(plan, dev))
    init = _init_unconstrained(spec, stats, dt)
    t0 = time.perf_counter()
    stored = _stored_users(stats.n_users, chains * draws, int(opt.get("max_stored_values", MAX_STORED_VALUES)), seed)
    if form == "full":
        init["eta"] = torch.zeros(stats.n_users, dtype=dt)
        samples, rec = run_nuts(full_model, (cells, spec), chains=chains, draws=draws, warmup=warmup, seed=seed,
                                jit=True, init=init, progress=bool(opt.get("progress_bar", False)))
        eta_all = samples.pop("eta")
        gd = draw_globals(spec, samples, (chains, draws))
        post = draw_summaries(eta_all, ctx.level)
        eta = eta_all[..., stored].float()
    elif form == "collapsed":
        grid = signature_grid(cells)
        exact = plan if plan.device.type == "cpu" and plan.dtype == dt else build_plan(stats, dev, dt)
        pot = CollapsedPotential(grid, spec, exact) if opt.get("potential", "direct") == "direct" else None
        if init:
            samples, rec = run_nuts(collapsed_model, (grid, spec, exact), chains=chains, draws=draws, warmup=warmup,
                                    seed=seed, jit=bool(opt.get("jit", False)), init=init,
                                    progress=bool(opt.get("progress_bar", False)), potential_fn=pot)
        else:       # every global known: the posterior of each eta_u is exact, nothing to sample
            samples, rec = {}, _Recorder(chains, draws)
        gd = draw_globals(spec, samples, (chains, draws))
        eta_all = None
        eta, post = conditional_eta(grid, gd, spec, stored, ctx.level, seed)
    else:
        from heedful.errors import InputError
        raise InputError(f"nuts form must be auto, full or collapsed, not {form!r}")
    wall = time.perf_counter() - t0
    idata = build_inference_data(stats, spec, cells, samples, gd, eta, stored, rec, seed=seed,
                                 method=f"nuts-{form}")
    diag = summarize(idata, method=f"nuts-{form}")
    diag.update({"form": form, "chains": chains, "draws": draws, "warmup": warmup, "seed": seed,
                 "sampling_s": round(wall, 2), "stored_users": int(stored.shape[0])})
    if form == "collapsed":
        diag["signatures"] = grid.n_sig
    if opt.get("per_vote"):
        src = eta_all if eta_all is not None else None
        if src is None:
            all_users = torch.arange(stats.n_users)
            src, _ = conditional_eta(grid, gd, spec, all_users, ctx.level, seed + 1)
        pz = attentive_probability(cells, src, gd, n_draws=int(opt.get("per_vote_draws", 100)), seed=seed)
        idata.add_groups({"predictions": {"attentive_prob": pz.numpy()[None, None, :]}},
                         dims={"attentive_prob": ["cell"]})
        diag["per_vote"] = "predictions/attentive_prob: P(z = 1 | votes) for one vote of each (user, kind) cell"
    # point summaries of the globals: posterior means, theta and its covariance from the draws
    mu_mean = gd["mu"].reshape(-1, spec.n_pairs).mean(0)
    a_m, b_m = float(gd["a"].mean()), float(gd["b"].mean())
    rho_m = float(gd["rho"].mean()) if "rho" in gd else None
    theta_draws = _theta_draws(spec, gd, samples, dt)
    theta = theta_draws.mean(0)
    cov = np.cov(theta_draws.numpy(), rowvar=False).reshape(spec.n_free, spec.n_free) if spec.n_free else \
        np.zeros((0, 0))
    with torch.no_grad():
        g = spec.unpack(theta)
        obj = float(objective(plan, spec, theta))
        ll = float(log_marginal(plan, *g))
    fit = GlobalFit(a=a_m, b=b_m, mu=mu_mean.numpy(), rho=rho_m, theta=theta.numpy(), cov=cov, objective=obj,
                    log_likelihood=ll, iterations=chains * (draws + warmup), converged=not diag["warnings"],
                    warnings=list(diag["warnings"]), spec=spec)
    return MethodResult(fit=fit, posterior=post, inference_data=idata, diagnostics=diag)


def _kinds_on(plan, dev: torch.device) -> Kinds:
    k = plan.kinds
    return Kinds(k.pair.to(dev), k.pick_a.to(dev), k.first.to(dev), k.gold.to(dev))


def _stored_users(n_users: int, n_draws: int, max_values: int, seed: int) -> torch.Tensor:
    """Users whose draws go into the InferenceData: all of them, or an evenly spread subset under the cap."""
    k = max(1, min(n_users, max_values // max(n_draws, 1)))
    if k >= n_users:
        return torch.arange(n_users)
    return torch.as_tensor(np.sort(np.random.default_rng(seed).choice(n_users, k, replace=False)))


def _theta_draws(spec: GlobalSpec, gd: dict[str, torch.Tensor], samples: dict[str, torch.Tensor],
                 dt: torch.dtype) -> torch.Tensor:
    """The draws in GlobalSpec's packing (log a, log b, logit rho, logit mu | strengths): [N, n_free]."""
    cols = []
    if spec.eta_fixed is None:
        cols += [gd["a"].reshape(-1).log(), gd["b"].reshape(-1).log()]
    if spec.learn_rho:
        r = gd["rho"].reshape(-1)
        cols.append(torch.log(r) - torch.log1p(-r))
    if spec.strengths:
        s = samples["strength"]
        cols += list(s.reshape(-1, s.shape[-1]).T)
    elif spec.free_mu.any():
        m = gd["mu"].reshape(-1, spec.n_pairs)[:, torch.as_tensor(spec.free_mu)]
        cols += list((torch.log(m) - torch.log1p(-m)).T)
    if not cols:
        return torch.zeros(gd["a"].numel(), 0, dtype=dt)
    return torch.stack(cols, 1).to(dt)
