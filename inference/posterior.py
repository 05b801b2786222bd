"""Each user's posterior over eta given the fitted globals (a, b, mu): mean, mode, interval, tail mass.

p(eta | y_u) is proportional to L_u(eta) Beta(eta; a, b). The mean is exact (Gauss-Jacobi, one node more
than the marginal likelihood's). Quantiles and P(eta > tau) come from the CDF on a grid in x = logit(eta),
where the density L_u(sigmoid x) sigmoid(x)^a sigmoid(-x)^b is smooth; the mass beyond the grid's ends
is added in closed form (the density continued as e^(a x) on the left, e^(-b x) on the right). The grid
spans |x| <= 20 at most, and for each bucket of users only the part outside which a bound on the
likelihood ratio leaves less than 1e-12 of any user's mass, or the closed-form tail errs by less than that
(``_grid_span``, ``_inner_end``). The CDF at
the grid points is Euler-Maclaurin to O(h^6) and, inside a cell, the integral of a quintic through the density,
its slope and its third derivative at the cell's ends (differences on 7 grid points): within about 1e-6 of exact
on a grid of 200 points or more (see ``_grid_size``).
The mode (``eta_hat``) is the grid maximum of the density in eta, refined by safeguarded Newton.

Without modes (EM, which has its eta_u), with integer a, b and no per-user rho, the grid narrows further, to the
span of the users' quantiles (``_narrow_span``, placed on a probe of the bucket's users): the masses beyond its
ends are then exact (Gauss-Jacobi on [0, sigmoid(x_0)] and [sigmoid(x_(M-1)), 1], ``_tail_rule``), and the
Euler-Maclaurin end terms take the log density's exact slopes there (``_slope_table``). A bucket with a user
whose quantile cell falls within EDGE_CELLS of an end is done again on the full grid. For EM's Beta(1, 1) at 10M
votes this keeps 71 of the 198 points. In that case (integer a, b, no modes, no rho_u) a bucket whose densities
are polynomials of degree at most 64 skips the grid: its summaries are exact
(:mod:`heedful.inference.polynomial_posterior`); the narrowed grid serves heavier buckets and the fallback.

Cost: per chunk of users one sparse product, a max (not without modes), an exp and a cumulative sum over the
[users, M] grid; the summaries read a few grid cells per user (gathered per chunk, computed per block of users).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special

from heedful.inference import polynomial_posterior as polynomial
from heedful.model.likelihood import (
    RHO_NODE_CAP,
    Bucket,
    QuadraturePlan,
    bucket_nodes,
    casual_prob,
    run_sum_matrix,
    vote_loglik,
)
from heedful.model.quadrature import gauss_jacobi

X_EDGE = 20.0
MAX_ELEMENTS = 500_000     # grid cells per chunk (4 MB: cache-sized): bounds memory whatever the number of users
BLOCK_ROWS = 1 << 16       # users per block of the per-user summaries and the mode refinement
GPU_ELEMENTS, GPU_BLOCK_ROWS = 1 << 25, 1 << 20   # on a GPU: fewer, larger kernels (results do not change)
# grid points: GRID_PER_ROOT sqrt(n + 1) for n votes' worth of nodes, at least GRID_PER_PRIOR_SD / (the prior's sd
# in x) and GRID_MIN (the quantiles and tail are then within about 1e-6 of exact; error O(h^6)); with a per-user rho
# the mode is the grid maximum, so that grid stays finer: RHO_GRID_PER_ROOT sqrt(n + 1), at least RHO_GRID_MIN
GRID_PER_ROOT, GRID_PER_PRIOR_SD, GRID_MIN, GRID_MAX = 50.0, 160.0, 200, 4000
RHO_GRID_PER_ROOT, RHO_GRID_MIN = 100.0, 400
TAIL_EPS = 1e-12           # the grid leaves out only points beyond which every user's posterior mass is below this
MIN_SPAN = 32              # grid cells kept at least
PAD = 8                    # cells of the continued density beyond each end of the grid
NEWTON_STEPS = 2           # Newton steps on the quintic inside the cell, from the linear-density quantile
STOP_STEP = 1e-14          # mode refinement stops once no user's eta moves more than this
START_STEPS = 3            # Newton steps on the quartic through the grid maximum's five points (mode start)
SAFE_SUM = (1e-150, 1e150)  # grid rows normalised by Z_u: sums in here have no overflow and no tail near underflow
COMPACT = 8                # mode refinement keeps only the active users' cells once under 1/COMPACT are active
# without modes, with integer a, b and no per-user rho, the grid narrows to where the quantiles lie: the masses
# beyond its ends are then exact (``_tail_rule``) instead of the density continued in closed form
EDGE_CELLS = 5             # a narrowed grid keeps every quantile's cell this far inside its ends, else the bucket is
                           # done again on the full grid (the cell's 9-point windows then stay on the grid)
PROBE_CHUNKS, PROBE_ROWS = 4, 1024   # chunks of users (and their rows), spread over the bucket, whose exact tail
                                     # masses place the narrowed ends
PROBE_STEP = 5             # grid cells between the probe's trial ends
NARROW_MARGIN = 5          # cells beyond the probe's ends
NARROW_MAX = 0.75          # narrowed only when that keeps at most this share of the span
TAIL_NODE_CAP = 64         # nodes of each exact tail rule at most (heavier buckets keep the full grid)


@dataclass
class UserPosterior:
    """Per-user summaries, numpy arrays of length U."""

    mean: np.ndarray
    mode: np.ndarray | None                # None when not asked for (``modes=False``)
    lo: np.ndarray
    hi: np.ndarray
    sd: np.ndarray
    prob_above: np.ndarray | None = None   # P(eta_u > tau) when a tau was given


def _grid_size(n_max: int, a: float, b: float, per_user_rho: bool = False) -> int:
    """Grid points for a bucket whose nodes integrate n_max votes exactly, under the prior Beta(a, b)."""
    if per_user_rho:
        return int(np.clip(RHO_GRID_PER_ROOT * math.sqrt(n_max + 1.0), RHO_GRID_MIN, GRID_MAX))
    prior_sd = math.sqrt(special.polygamma(1, a) + special.polygamma(1, b))   # of logit(eta) under Beta(a, b)
    return int(np.clip(max(GRID_PER_ROOT * math.sqrt(n_max + 1.0), GRID_PER_PRIOR_SD / prior_sd), GRID_MIN,
                       GRID_MAX))


def _pattern_probs(plan: QuadraturePlan, bk: Bucket, mu: torch.Tensor, rho: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(m_q, c_q) per pattern of the bucket: P(its pick | attentive), P(its pick | casual), [Q] each."""
    return (plan.kinds.attentive_prob(mu)[bk.pattern_kind],
            casual_prob(plan.kinds.first[bk.pattern_kind], rho).to(dtype))


def _grid_span(plan: QuadraturePlan, bk: Bucket, a: float, b: float, mu: torch.Tensor, rho: torch.Tensor | None,
               h: float, M: int, tau: float | None, modes: bool = True) -> tuple[int, int]:
    """First and last index of the M-point grid on [-X_EDGE, X_EDGE] beyond which every user of the bucket has
    posterior mass below TAIL_EPS (relative), or its closed-form tail errs by less than that (``_inner_end``),
    and whose inside holds every interior mode (when ``modes``).

    Each vote's factor f(eta) = c + eta (m - c) is linear, so for eta' in [0, 1/2] f(eta) / f(eta') <=
    max(c, m) / min(c, (c + m) / 2), and likewise on [1/2, 1] with min(m, (c + m) / 2). With R_u the sum of
    the logs of these ratios over the user's votes and F = the prior mass of that half, Z_u >= F e^(-R_u)
    max L_u, while the prior mass below x is at most 2 e^(a x) / (a B(a, b)) (above x: 2 e^(-b x) / (b B));
    so the ends x_lo = (log(TAIL_EPS F a B / 2) - R) / a and x_hi = -(log(TAIL_EPS F b B / 2) - R) / b leave
    less than TAIL_EPS Z_u beyond them (R: the bucket's largest R_u, the better half's bound). The tails are
    still added in closed form as before; only grid points that carry no mass are dropped. With a, b >= 1
    the density in eta is log-concave, so its mode lies inside the kept span when the slope of the log
    density is positive two cells inside the left end and negative two cells inside the right end for
    every user; an end whose check fails (or with a or b below 1) stays at -X_EDGE or X_EDGE. Without
    ``modes`` there is no check: the quantiles and tail need only the mass.
    """
    if TAIL_EPS <= 0:
        return 0, M - 1
    m, c = _pattern_probs(plan, bk, mu, rho, mu.dtype)
    cnt = bk.count.to(m.dtype)
    top = torch.log(torch.maximum(c, m))
    ratios = torch.stack([cnt * (top - torch.log(torch.minimum(c, 0.5 * (c + m)))),    # log 0: an infinite
                          cnt * (top - torch.log(torch.minimum(m, 0.5 * (c + m))))], 1)   # bound, never used
    r_lo, r_hi = (float(v) for v in (bk.incidence @ ratios.to(bk.incidence.dtype)).max(0).values)
    f_lo = float(special.betainc(a, b, 0.5))
    log_z = max(math.log(max(f_lo, 1e-300)) - r_lo, math.log(max(1.0 - f_lo, 1e-300)) - r_hi)   # log(F e^-R)
    log_beta = float(special.betaln(a, b))
    x_lo = min((math.log(TAIL_EPS / 2) + log_z + math.log(a) + log_beta) / a, -1.0) if a >= 1 else -X_EDGE
    x_hi = max(-(math.log(TAIL_EPS / 2) + log_z + math.log(b) + log_beta) / b, 1.0) if b >= 1 else X_EDGE
    if a >= 1 or b >= 1:                     # move the ends in while the closed-form tails beyond stay exact
        d = (m - c).abs()
        spread = torch.stack([torch.where(c > 0, d / c, math.inf), torch.where(m > 0, d / m, math.inf)], 1)
        s_lo, s_hi = (float(v) for v in (bk.incidence @ (cnt[:, None] * spread).to(bk.incidence.dtype)).max(0).values)
        q_lo, q_hi = (float(v) for v in spread.max(0).values)
        common = math.log(2.0) - log_beta - log_z              # log relative mass below x <= a x + common - log a
        if a >= 1:
            x_lo = _inner_end(max(x_lo, -X_EDGE), h, lambda x: a * x + common - math.log(a), s_lo, q_lo, a, b, -1)
        if b >= 1:
            x_hi = _inner_end(min(x_hi, X_EDGE), h, lambda x: -b * x + common - math.log(b), s_hi, q_hi, b, a, 1)
    if tau is not None:                                      # P(eta > tau) is read inside the grid
        xt = math.log(tau / (1 - tau))
        x_lo, x_hi = min(x_lo, xt - 2 * h), max(x_hi, xt + 2 * h)
    i0 = max(0, math.floor((x_lo + X_EDGE) / h))
    i1 = min(M - 1, math.ceil((x_hi + X_EDGE) / h))
    if i1 - i0 < MIN_SPAN:
        return 0, M - 1

    def slopes(j: int) -> torch.Tensor:                      # d/d eta of the log density at grid point j, per user
        e = float(special.expit(-X_EDGE + j * h))
        score = bk.incidence @ (cnt * (m - c) / (c + e * (m - c))).to(bk.incidence.dtype)
        return score + (a - 1) / e - (b - 1) / (1 - e)

    if modes and i0 > 0 and not bool((slopes(i0 + 2) > 0).all()):
        i0 = 0
    if modes and i1 < M - 1 and not bool((slopes(i1 - 2) < 0).all()):
        i1 = M - 1
    return i0, i1


def _inner_end(x_end: float, h: float, log_mass: Callable[[float], float], s: float, q: float, rate: float,
               other: float, side: int) -> float:
    """An end of the grid moved in by whole cells (to |x| >= 1 at most) while the closed-form tail beyond it is
    within TAIL_EPS Z_u of the true tail for every user of the bucket; side -1: the left end, +1: the right.

    Beyond the left end x_0 the density d(x) = L_u(eta) e^(a x) (1 + e^x)^-(a+b) is continued as d(x_0)
    e^(a (x - x_0)). With u = e^(x_0) > eta_0, each vote's factor changes by |log((c + eta d) / (c + eta_0 d))| <=
    u |d| / c / (1 - u |d| / c) there, and (1 + e^x)^-(a+b) by a factor within [1, e^((a+b) u)]; so d over its
    continuation lies within e^(+-y), y = u s / (1 - u q) + (a + b) u, with s the bucket's largest sum of
    n |d| / c over a user's cells and q the largest |d| / c (the right end: c -> m, u = e^(-x_1), rate b). The
    tail's error is then at most (e^y - 1) e^y times its mass, bounded by ``log_mass`` (x) as in ``_grid_span``;
    the Euler-Maclaurin end terms, which take the continuation's slopes a d_0 and a^3 d_0, add at most a factor
    1 + a h^2 / 12 + a^3 h^4 / 360. A factor c (or m) that vanishes makes s infinite: the end stays.
    """
    def log_error(x: float) -> float:
        u = math.exp(-abs(x))
        if not math.isfinite(s) or u * q >= 0.5:
            return math.inf
        y = u * s / (1 - u * q) + (rate + other) * u
        if y > 700:                                          # e^y overflows: the tail is nowhere near exact
            return math.inf
        return log_mass(x) + y + math.log(max(math.expm1(y), 1e-300)) + math.log1p(
            rate * h * h / 12 + rate ** 3 * h ** 4 / 360)

    limit = math.log(TAIL_EPS)
    x = x_end
    while abs(x - side * h) >= 1.0 and (nxt := x - side * h) * side > 0 and log_error(nxt) <= limit:
        x = nxt
    return x


def _table(plan: QuadraturePlan, bk: Bucket, eta: torch.Tensor, mu: torch.Tensor,
           rho: torch.Tensor | None) -> torch.Tensor:
    """count_q log(c_q + eta_g (m_q - c_q)) for the bucket's patterns q and points g, [Q, G] (once per bucket)."""
    m = plan.kinds.attentive_prob(mu)[bk.pattern_kind].unsqueeze(1)
    first = plan.kinds.first[bk.pattern_kind].unsqueeze(1)
    c = casual_prob(first, rho if rho is None or rho.dim() == 0 else rho.unsqueeze(0)).to(eta.dtype)
    return vote_loglik(eta.unsqueeze(0), m, c, bk.count.unsqueeze(1))


def _search_weights(h: float, ps: torch.Tensor) -> torch.Tensor:
    """W [P, 9]: ends W_p = the S-target T = t / h + d_0 / 2 - h d'_0 / 12 for t = p Z - A, with ``ends`` =
    (d_0, d_(M-1), S_(M-1), A, B, d'_0, d'''_0, d'_(M-1), d'''_(M-1)): A and B the masses below x_0 and above
    x_(M-1), Z = A + C_(M-1) + B (``_block_summaries``), all linear in the ends."""
    h2, h4 = h * h / 12.0, h ** 4 / 720.0
    total = torch.tensor([-h / 2, -h / 2, h, 1.0, 1.0, h2, -h4, -h2, h4], dtype=ps.dtype, device=ps.device)
    rest = torch.tensor([0.5, 0.0, 0.0, -1.0 / h, 0.0, -h / 12.0, 0.0, 0.0, 0.0], dtype=ps.dtype, device=ps.device)
    return ps[:, None] * total[None, :] / h + rest[None, :]


def _continued_ends(v: torch.Tensor, a: float, b: float, out: torch.Tensor) -> None:
    """``ends`` [R, 9] (``_search_weights``) from v = (d_0, d_(M-1), S_(M-1)) [R, 3], the density continued beyond
    the grid as d_0 e^(a (x - x_0)) and d_(M-1) e^(-b (x - x_(M-1))): A = d_0 / a, B = d_(M-1) / b, slopes
    d'_0 = a d_0, d'''_0 = a^3 d_0, d'_(M-1) = -b d_(M-1), d'''_(M-1) = -b^3 d_(M-1)."""
    out[:, :3] = v
    d0, dm1 = v[:, 0:1], v[:, 1:2]
    torch.mul(torch.cat([d0, dm1, d0, d0, dm1, dm1], 1),
              torch.tensor([1 / a, 1 / b, a, a ** 3, -b, -b ** 3], dtype=v.dtype, device=v.device), out=out[:, 3:])


def _tail_nodes(n_max: int, q: float) -> int:
    """Nodes of ``_tail_rule`` for degree n_max + q - 1 (q: b below, a above): (n_max + q - 1) // 2 + 1."""
    return max(n_max + int(q) - 1, 0) // 2 + 1


def _tail_rule(a: float, b: float, n_max: int, s: torch.Tensor, upper: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Points eta [S, N] and log-weights [S, N] of a rule with sum_i w_i L(eta_i) = the integral of L(eta)
    eta^(a-1) (1 - eta)^(b-1) below eta = s (above eta = 1 - s when ``upper``) for each s of ``s`` [S]: exact for
    every polynomial L of degree n_max when a and b are integers.

    Below s: eta = s t and int_0^s = (s^a / a) E_(t ~ Beta(a, 1))[(1 - s t)^(b-1) L(s t)], a polynomial of
    degree n_max + b - 1 in t, by Gauss-Jacobi on (n_max + b - 1) // 2 + 1 nodes. Above 1 - s: the same with a
    and b swapped and eta = 1 - s t.
    """
    p, q = (b, a) if upper else (a, b)
    n = _tail_nodes(n_max, q)
    t, lw = gauss_jacobi(torch.tensor(float(p), dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), n)
    t, lw = t.to(s), lw.to(s)                      # s's dtype and device
    st = s[:, None] * t[None, :]
    logw = p * torch.log(s)[:, None] - math.log(p) + lw[None, :] + (q - 1) * torch.log1p(-st)
    return (1 - st) if upper else st, logw


def _tail_table(plan: QuadraturePlan, bk: Bucket, a: float, b: float, mu: torch.Tensor, rho: torch.Tensor | None,
                x_lo: torch.Tensor, x_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact rules (``_tail_rule``) for the mass below each end of x_lo [S0] and above each of x_hi [S1]: the
    pattern table at their points [Q, S0 N0 + S1 N1] (the rules below first) and their log-weights [S0, N0] and
    [S1, N1]."""
    eta_lo, lw_lo = _tail_rule(a, b, bk.max_votes, torch.sigmoid(x_lo), upper=False)
    eta_hi, lw_hi = _tail_rule(a, b, bk.max_votes, torch.sigmoid(-x_hi), upper=True)
    return _table(plan, bk, torch.cat([eta_lo.reshape(-1), eta_hi.reshape(-1)]), mu, rho), lw_lo, lw_hi


def _slope_table(plan: QuadraturePlan, bk: Bucket, xs: torch.Tensor, mu: torch.Tensor,
                 rho: torch.Tensor | None) -> torch.Tensor:
    """[Q, 3 S]: count_q times the first three derivatives in x of log(c_q + eta (m_q - c_q)), eta = sigmoid(x),
    at the points xs [S] (the first derivatives at every point, then the second, then the third).

    With r = (m - c) / (c + eta (m - c)) and e_k the k-th derivative of sigmoid: r e_1, r e_2 - r^2 e_1^2 and
    r e_3 - 3 r^2 e_1 e_2 + 2 r^3 e_1^3.
    """
    m, c = _pattern_probs(plan, bk, mu, rho, xs.dtype)
    e = torch.sigmoid(xs)[None, :]
    e1 = e * (1 - e)
    e2, e3 = e1 * (1 - 2 * e), e1 * (1 - 6 * e1)
    r = (m - c)[:, None] / (c[:, None] + e * (m - c)[:, None])
    n = bk.count.to(xs.dtype)[:, None]
    return torch.cat([n * r * e1, n * (r * e2 - r * r * e1 * e1),
                      n * (r * e3 - 3 * r * r * e1 * e2 + 2 * r ** 3 * e1 ** 3)], 1)


def _prior_slopes(a: float, b: float, xs: torch.Tensor) -> torch.Tensor:
    """[3 S]: the first three derivatives in x of a log sigmoid(x) + b log sigmoid(-x) (the prior in x with its
    Jacobian) at xs [S], ordered as ``_slope_table``'s columns."""
    e = torch.sigmoid(xs)
    e1 = e * (1 - e)
    return torch.cat([a * (1 - e) - b * e, -(a + b) * e1, -(a + b) * e1 * (1 - 2 * e)])


def _continuation(M: int, h: float, a: float, b: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[M + 2 PAD]: d_j / d_(j clamped to the grid) for j = -PAD .. M - 1 + PAD, the density continued beyond the
    grid as it is there, d_0 e^(a (x - x_0)) on the left and d_(M-1) e^(-b (x - x_(M-1))) on the right."""
    j = torch.arange(-PAD, M + PAD, dtype=dtype, device=device)
    return torch.where(j < 0, torch.exp(a * h * j), torch.where(j > M - 1, torch.exp(-b * h * (j - (M - 1))), 1.0))


def _slopes(d: torch.Tensor, h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d' (error O(h^6)) and d''' (O(h^4)) by central differences on 7 points, at the inner points (dim 0)."""
    e1, e2, e3 = d[4:-2] - d[2:-4], d[5:-1] - d[1:-5], d[6:] - d[:-6]
    return (e3 - 9 * e2 + 45 * e1) / (60 * h), (8 * e2 - e3 - 13 * e1) / (8 * h ** 3)


def _cell_poly(dl, dr, pl, pr, fl, fr, h: float) -> list[torch.Tensor]:
    """Coefficients c_1 .. c_5 of the mass on [x_(j-1), x_(j-1) + s h], h s (c_1 + c_2 s + ... + c_5 s^4).

    From d, d' and d''' at both ends of the cell: the density is the cubic Hermite H through d and d' at the ends
    plus q 30 s^2 (1 - s)^2 (the shape of H's error, f''''/24 (s (1 - s) h)^2) with q h = h^4 / 720
    (d'''_j - d'''_(j-1)), which makes the cell's mass the Euler-Maclaurin C_j - C_(j-1) (error O(h^6)).
    """
    pl, pr, q, diff = h * pl, h * pr, h ** 3 / 720.0 * (fr - fl), dr - dl
    return [dl, 0.5 * pl, diff - (2 * pl + pr) / 3 + 10 * q, (pl + pr) / 4 - 0.5 * diff - 15 * q, 6 * q]


def _cell_mass(s: torch.Tensor, co: list[torch.Tensor], h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mass up to s (``_cell_poly``) and the density at s, by Horner's rule."""
    c1, c2, c3, c4, c5 = co
    mass = h * s * (c1 + s * (c2 + s * (c3 + s * (c4 + s * c5))))
    return mass, c1 + s * (2 * c2 + s * (3 * c3 + s * (4 * c4 + s * (5 * c5))))


def _block_summaries(ends: torch.Tensor, k: torch.Tensor, dw: torch.Tensor, sw: torch.Tensor, x: torch.Tensor,
                     h: float, a: float, b: float, ps: torch.Tensor, tau: tuple | None,
                     inside: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x-quantiles [B, P] at probabilities ps and F(x_tau) [B] from a few cells of each user's grid density d.

    With S_j = sum_(i<=j) d_i, d'_j and d'''_j by central differences on d_(j-3) .. d_(j+3) (the grid continued
    beyond its ends as the density is there, by ``_continuation``, where the grid is not narrowed) and the ends'
    d'_0, d'''_0, d'_(M-1), d'''_(M-1) from ``ends`` [B, 9] (``_search_weights``), Euler-Maclaurin (error O(h^6))
    gives

        C_j = h (S_j - (d_0 + d_j) / 2) - h^2 / 12 (d'_j - d'_0) + h^4 / 720 (d'''_j - d'''_0),

    and F_j = (A + C_j) / Z with A, B the masses below x_0 and above x_(M-1) (``ends``: in closed form for the
    continued density, exact on a narrowed grid) and Z = A + C_(M-1) + B. With k the first j with S_j >= T =
    t / h + d_0 / 2 - h d'_0 / 12 for t = p Z - A, C_j - t is h (S_j - T) - h d_j / 2 - h^2 d'_j / 12 + O(h^4), so
    C_(k-1) < t <= C_(k+1) while |h d'_j| < 6 d_j (d changes less than e^6-fold from one cell to the next): the
    first j with C_j >= t is k when C_k >= t, else k + 1. ``dw`` [9, B, P] holds d on cells k-4 .. k+4 (continued
    beyond the grid), ``sw`` [2, B, P] S_(k-1), S_k (clamped to the grid). Inside that cell [x_(j-1), x_j] the
    mass is the polynomial of ``_cell_poly``, equal to C_j - C_(j-1) over the cell; the quantile is the root of
    the linear-density quadratic refined by NEWTON_STEPS Newton steps on it. Below x_0 (above x_(M-1)) F ~ C
    e^(a x) (1 - F ~ C e^(-b x)) is inverted (not with ``inside``: a narrowed grid holds every quantile). ``tau`` =
    (s, td [8, B], ts [B]) for x_tau at x_(j-1) + s h: d on cells j-4 .. j+3, S_(j-1).
    """
    M = x.shape[0]
    d0, dm1, s_last, tail_lo, tail_hi, p0, f0, pm1, fm1 = ends.unbind(1)
    c_last = h * (s_last - 0.5 * (d0 + dm1)) - h * h / 12.0 * (pm1 - p0) + h ** 4 / 720.0 * (fm1 - f0)
    total = tail_lo + c_last + tail_hi
    t = ps * total[:, None] - tail_lo[:, None]                                     # [B, P]
    base = (h * h / 12.0) * p0 - (h ** 4 / 720.0) * f0 - 0.5 * h * d0               # C_j = h S_j + base + ...

    def c_at(s_j, d_j, p_j, f_j):                                                  # C_j
        return h * (s_j - 0.5 * d_j) - (h * h / 12.0) * p_j + (h ** 4 / 720.0) * f_j + base[:, None]

    p, f3 = _slopes(dw, h)                                                         # at k-1, k, k+1
    up = c_at(sw[1], dw[4], p[1], f3[1]) < t                                        # the cell is (k, k+1)
    jq = k + up
    dl, pl, fl = (torch.where(up, u[1], u[0]) for u in (dw[3:], p, f3))
    dr, pr, fr = (torch.where(up, u[2], u[1]) for u in (dw[3:], p, f3))
    co = _cell_poly(dl, dr, pl, pr, fl, fr, h)
    r = t - c_at(torch.where(up, sw[1], sw[0]), dl, pl, fl)                         # mass to find inside the cell
    disc = (h * dl) ** 2 + 2 * h * (dr - dl) * r.clamp_min(0)                      # linear density: a quadratic
    frac = (2 * r.clamp_min(0) / (h * dl + disc.clamp_min(0).sqrt()).clamp_min(1e-300)).clamp(0, 1)
    for _ in range(NEWTON_STEPS):
        mass, dens = _cell_mass(frac, co, h)
        frac = torch.where(dens > 0, frac - (mass - r) / (h * dens), frac).clamp(0, 1)
    xq = x[(jq - 1).clamp(0, M - 2)] + frac * h
    if not inside:
        low_tail = x[0] + torch.log(ps / (tail_lo / total).clamp_min(1e-300)[:, None]) / a
        high_tail = x[-1] - torch.log((1 - ps) / (1 - (tail_lo + c_last) / total).clamp_min(1e-300)[:, None]) / b
        xq = torch.where((jq > 0) & (jq < M), xq, torch.where(jq <= 0, low_tail, high_tail))
    if tau is None:
        return xq, None
    s, td, ts = tau
    pt, ft = _slopes(td, h)                                                        # at j-1, j
    mass, _ = _cell_mass(torch.full_like(d0, s), _cell_poly(td[3], td[4], pt[0], pt[1], ft[0], ft[1], h), h)
    return xq, (tail_lo + c_at(ts[:, None], td[3][:, None], pt[0][:, None], ft[0][:, None]).squeeze(1) + mass) / total


@torch.no_grad()
def user_posterior(plan: QuadraturePlan, cells: dict[str, torch.Tensor] | None, a: float, b: float,
                   mu: torch.Tensor, rho: float | None = None, *, level: float = 0.90,
                   tau: float | None = None, rho_prior: tuple[float, float] | None = None,
                   modes: bool = True) -> UserPosterior:
    """Posterior summaries of eta_u for every user under Beta(a, b), mu and rho (no gradients).

    ``modes=False`` leaves out the modes (``mode`` is None): the refinement is a fifth to a quarter of the
    cost, and a method that keeps eta_u (EM's joint MAP) has them already.

    With a per-user rho_u ~ Beta(rho_prior), rho_u is integrated out by Gauss-Jacobi at every grid point.
    ``cells`` is unused (each bucket's incidence holds the users' cells; None will do); it stays for the callers.
    Per chunk of users the [users, M] grid is read by one sparse product, a max, an exp and a cumulative sum;
    the cells each summary needs are gathered and the summaries computed per block of BLOCK_ROWS users.
    """
    dt, dev = torch.float64, plan.device
    mu = mu.to(dt)
    rho_t = None if rho is None else torch.tensor(float(rho), dtype=dt, device=dev)
    U = plan.n_users
    pa, pb = float(a), float(b)
    alpha = (1.0 - level) / 2.0
    ps = torch.tensor([alpha, 1 - alpha], dtype=dt, device=dev)

    def full(v: float) -> torch.Tensor:
        return torch.full((U,), float(v), dtype=dt, device=dev)

    # users without votes keep the prior Beta(a, b): its mean, sd, quantiles and tail
    prior_sd = math.sqrt(pa * pb / ((pa + pb) ** 2 * (pa + pb + 1)))
    out = _Summaries(mean=full(pa / (pa + pb)), sd=full(prior_sd), lo=full(special.betaincinv(pa, pb, alpha)),
                     hi=full(special.betaincinv(pa, pb, 1 - alpha)),
                     p_above=full(special.betainc(pb, pa, 1 - tau)) if tau is not None else None,
                     mode=full(((pa - 1) / (pa + pb - 2)) if (pa > 1 and pb > 1)
                               else (0.0 if pa <= pb or rho_prior is not None else 1.0)))
    at, bt = torch.tensor(pa, dtype=dt, device=dev), torch.tensor(pb, dtype=dt, device=dev)
    rp = None if rho_prior is None else tuple(torch.tensor(float(v), dtype=dt, device=dev) for v in rho_prior)
    # exact tails: the quantiles' span only (no modes, which need the grid maximum; no rho_u; polynomial weights)
    narrowable = not modes and rp is None and pa.is_integer() and pb.is_integer()
    for bk in plan.buckets:
        if narrowable and polynomial.eligible(bk, pa, pb):     # the density is a polynomial: exact summaries
            got = polynomial.polynomial_summaries(bk, lambda t, bk=bk: _table(plan, bk, t, mu, rho_t), pa, pb, ps, tau)
            if got is not None:
                out.mean[bk.users], out.sd[bk.users], out.lo[bk.users], out.hi[bk.users] = (got.mean, got.sd, got.lo,
                                                                                            got.hi)
                if tau is not None:
                    out.p_above[bk.users] = got.p_above
                continue
        xq, rq, logw = bucket_nodes(at, bt, bk.moment_nodes, rp, dt)   # exact for E[eta], E[eta^2]
        nodes = _Nodes(logw, _table(plan, bk, xq, mu, rho_t if rq is None else rq), torch.stack([xq, xq * xq]))
        M = _grid_size(2 * bk.moment_nodes, pa, pb, rp is not None)
        x = torch.linspace(-X_EDGE, X_EDGE, M, dtype=dt, device=dev)
        h = 2 * X_EDGE / (M - 1)
        i0, i1 = (0, M - 1) if rp is not None else _grid_span(plan, bk, pa, pb, mu, rho_t, h, M, tau, modes)
        narrow = None
        if narrowable and _tail_nodes(bk.max_votes, max(pa, pb)) <= TAIL_NODE_CAP:
            narrow = _narrow_span(plan, bk, pa, pb, mu, rho_t, x, i0, i1, ps, tau, nodes)
        if narrow is None or not _bucket_pass(plan, bk, out, x[narrow[0]:narrow[1] + 1], h, pa, pb, mu, rho_t, rp,
                                              ps, tau, nodes, modes, exact=True):
            _bucket_pass(plan, bk, out, x[i0:i1 + 1], h, pa, pb, mu, rho_t, rp, ps, tau, nodes, modes, exact=False)
    return UserPosterior(mean=out.mean.cpu().numpy(), mode=out.mode.cpu().numpy() if modes else None,
                         lo=torch.minimum(out.lo, out.mean).cpu().numpy(),
                         hi=torch.maximum(out.hi, out.mean).cpu().numpy(), sd=out.sd.cpu().numpy(),
                         prob_above=None if out.p_above is None else out.p_above.cpu().numpy())


@dataclass
class _Summaries:
    """The per-user summaries being filled, tensors [U]."""

    mean: torch.Tensor
    sd: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    p_above: torch.Tensor | None
    mode: torch.Tensor


@dataclass
class _Nodes:
    """A bucket's Gauss-Jacobi rule for its users' moments and Z_u: log-weights [G], the pattern table [Q, G] and
    (eta_g, eta_g^2) [2, G]."""

    logw: torch.Tensor
    table: torch.Tensor
    moments: torch.Tensor


def _narrow_span(plan: QuadraturePlan, bk: Bucket, a: float, b: float, mu: torch.Tensor, rho: torch.Tensor | None,
                 x: torch.Tensor, i0: int, i1: int, ps: torch.Tensor, tau: float | None,
                 nodes: _Nodes) -> tuple[int, int] | None:
    """Ends j0 < j1 inside [i0, i1] of a grid that should hold every quantile of the bucket's users (and x_tau),
    EDGE_CELLS and more inside its ends; None when it would keep more than NARROW_MAX of the span, or when x_tau's
    cells do not fit inside [i0, i1] with that margin.

    On PROBE_CHUNKS chunks of PROBE_ROWS users spread over the bucket, the exact masses (``_tail_rule``) below and
    above trial ends every PROBE_STEP cells: j0 is the last trial end below which every probed user has at most half
    of the lower probability, j1 likewise from above, each moved NARROW_MARGIN cells out. Users the probe missed are
    caught by the pass on the narrowed grid (``_bucket_pass``), which then gives way to the full grid.
    """
    dt, dev = x.dtype, x.device
    trial = torch.arange(i0, i1 + 1, PROBE_STEP, device=dev)
    xs = x[trial]
    tab, lw_lo, lw_hi = _tail_table(plan, bk, a, b, mu, rho, xs, xs)
    S, n_lo, n_hi = xs.shape[0], lw_lo.shape[1], lw_hi.shape[1]
    n = len(bk.users)
    starts = sorted({min(n - 1, i * n // PROBE_CHUNKS) for i in range(PROBE_CHUNKS)})
    probe = [(s, bk.rows(s, min(s + PROBE_ROWS, n))) for s in starts]
    worst_lo = torch.full((S,), -math.inf, dtype=dt, device=dev)
    worst_hi = worst_lo.clone()
    log_beta = float(special.betaln(a, b))
    for _, inc in probe:
        inc = inc.to(dt)
        R = inc.shape[0]
        log_z = torch.logsumexp(nodes.logw.expand(R, -1).clone().addmm_(inc, nodes.table), dim=1)
        ell = (inc @ tab) - (log_z[:, None] + log_beta)                      # log L_u - log(B(a, b) Z_u)
        below = torch.logsumexp(ell[:, :S * n_lo].view(R, S, n_lo) + lw_lo, dim=2)    # [R, S]: log mass below
        above = torch.logsumexp(ell[:, S * n_lo:].view(R, S, n_hi) + lw_hi, dim=2)
        worst_lo = torch.maximum(worst_lo, below.max(0).values)
        worst_hi = torch.maximum(worst_hi, above.max(0).values)
    ok_lo = (worst_lo <= math.log(0.5 * float(ps[0]))).nonzero()
    ok_hi = (worst_hi <= math.log(0.5 * (1 - float(ps[-1])))).nonzero()
    j0 = int(trial[int(ok_lo[-1])]) if len(ok_lo) else i0          # the masses grow with the end: a prefix holds
    j1 = int(trial[int(ok_hi[0])]) if len(ok_hi) else i1
    j0, j1 = j0 - NARROW_MARGIN, j1 + NARROW_MARGIN
    if tau is not None:   # x_tau's cells inside too (else the full grid, which continues the density beyond it)
        jt = int(torch.searchsorted(x, torch.tensor(math.log(tau / (1 - tau)), dtype=dt, device=dev)))
        j0, j1 = min(j0, jt - EDGE_CELLS - 2), max(j1, jt + EDGE_CELLS + 1)
        if j0 < i0 or j1 > i1:
            return None
    if j1 - j0 < MIN_SPAN:                                  # a narrow posterior: a span of at least MIN_SPAN cells
        j0, j1 = (j0 + j1 - MIN_SPAN) // 2, (j0 + j1 + MIN_SPAN) // 2
    j0, j1 = max(j0, i0), min(j1, i1)
    return (j0, j1) if j1 - j0 <= NARROW_MAX * (i1 - i0) else None


def _bucket_pass(plan: QuadraturePlan, bk: Bucket, out: _Summaries, x: torch.Tensor, h: float, pa: float, pb: float,
                 mu: torch.Tensor, rho_t: torch.Tensor | None, rp: tuple | None, ps: torch.Tensor,
                 tau: float | None, nodes: _Nodes, modes: bool, exact: bool) -> bool:
    """The bucket's summaries on the grid x (step h) into ``out``; False (``out`` partly written) when ``exact``
    (the masses beyond the grid's ends exact, ``_tail_rule``, and no density continued) and some user's quantile
    cell lies within EDGE_CELLS of an end, or a chunk's rows do not sum to within SAFE_SUM."""
    dt, dev, M = x.dtype, x.device, x.shape[0]
    P = ps.shape[0]
    log_eta, log_1m = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
    prior_eta = (pa - 1) * log_eta + (pb - 1) * log_1m      # log density in eta, up to a constant
    jacobian = log_eta + log_1m                              # log d eta / d x
    log_beta = float(special.betaln(pa, pb))
    # without modes (and rho_u): d = L_u(eta) eta^a (1 - eta)^b / (B(a, b) Z_u) straight from the prior in x,
    # with log Z_u = logsumexp_g (log w_g + log L_u(eta_g)) of the nodes: d integrates to about 1 over x, and
    # no row maximum (nor its shift) is needed. A chunk whose rows do not sum to within SAFE_SUM (Z_u off
    # by e^300 or more: billions of votes, beyond the nodes' resolution) is done again with the maximum
    by_z = not modes and rp is None
    prior_x = prior_eta + jacobian - log_beta if by_z else None
    if rp is None:
        tab, grid_lw, n_rho = _table(plan, bk, torch.sigmoid(x), mu, rho_t), None, 1
    else:
        xr, grid_lw = gauss_jacobi(rp[0], rp[1], min(bk.moment_nodes, RHO_NODE_CAP))
        n_rho = xr.shape[0]
        tab = _table(plan, bk, torch.sigmoid(x).repeat_interleave(n_rho), mu, xr.repeat(M))
    if exact:   # the exact masses below x_0 and above x_(M-1) and the log density's slopes there, per user
        ends_x = x[[0, -1]]
        tab_t, lw_lo, lw_hi = _tail_table(plan, bk, pa, pb, mu, rho_t, ends_x[:1], ends_x[1:])
        n_lo, n_hi = lw_lo.shape[1], lw_hi.shape[1]
        tab_e = torch.cat([tab_t, _slope_table(plan, bk, ends_x, mu, rho_t)], 1)
        bias_e = torch.cat([lw_lo[0], lw_hi[0], _prior_slopes(pa, pb, ends_x)])
        sides = torch.zeros(n_lo + n_hi, 2, dtype=dt, device=dev)
        sides[:n_lo, 0], sides[n_lo:, 1] = 1.0, 1.0
    search = _search_weights(h, ps)                             # [P, 9]: a small mv beats a [R, 9] @ [9, P] mm
    grid_ends = torch.tensor([0, M - 1], device=dev)
    ext = _continuation(M, h, pa, pb, dt, dev)
    win, dwin = torch.arange(-2, 3, device=dev), torch.arange(-4, 5, device=dev)
    if tau is not None:
        xt = math.log(tau / (1 - tau))
        jt = int(torch.searchsorted(x, torch.tensor(xt, dtype=dt, device=dev)).clamp(1, M - 1))
        tau_cells = torch.arange(jt - 4, jt + 4, device=dev)
        tau_fac = ext[tau_cells + PAD]
        tau_cells = tau_cells.clamp(0, M - 1)
        s_tau = (xt - float(x[jt - 1])) / h
    max_elements, block_rows = (GPU_ELEMENTS, GPU_BLOCK_ROWS) if dev.type == "cuda" else (MAX_ELEMENTS, BLOCK_ROWS)
    rows = max(1, max_elements // (M * n_rho))
    chunks = bk.row_chunks(rows)
    if exact:   # one sparse product reads the grid and the tail columns
        tab, prior_x = torch.cat([tab, tab_e], 1), torch.cat([prior_x, bias_e])
    g_buf = torch.empty(min(rows, len(bk.users)), tab.shape[1], dtype=dt, device=dev)
    c_buf = torch.empty(min(rows, len(bk.users)), M, dtype=dt, device=dev)
    per_block = max(1, block_rows // rows)
    for c0 in range(0, len(chunks), per_block):
        group = chunks[c0:c0 + per_block]
        first = group[0][0]
        B = group[-1][0] + group[-1][1].shape[0] - first
        ends = torch.empty(B, 9, dtype=dt, device=dev)
        k = torch.empty(B, P, dtype=torch.long, device=dev)
        dw, sw = torch.empty(9, B, P, dtype=dt, device=dev), torch.empty(2, B, P, dtype=dt, device=dev)
        lq_t = torch.empty(nodes.logw.shape[0], B, dtype=dt, device=dev)   # [G, B]: softmax over G is 10x faster
        jmax = torch.empty(B, dtype=torch.long, device=dev)
        g5 = torch.empty(B, 5, dtype=dt, device=dev)
        td = torch.empty(8, B, dtype=dt, device=dev) if tau is not None else None
        ts = torch.empty(B, dtype=dt, device=dev) if tau is not None else None
        for start, inc in group:
            inc = inc.to(dt)
            R = inc.shape[0]
            r0, r1 = start - first, start - first + R
            lq_t[:, r0:r1].t().copy_(nodes.logw.expand(R, -1)).addmm_(inc, nodes.table)   # CSR addmm_: no zero fill
            d = None
            if by_z:
                log_z = torch.logsumexp(lq_t[:, r0:r1], dim=0)
                full = g_buf[:R].copy_(prior_x.expand(R, -1)).addmm_(inc, tab)   # exact: the tail columns beside
                d = full[:, :M].sub_(log_z[:, None]).exp_()
                cum = torch.cumsum(d, 1, out=c_buf[:R])
                if not bool(((cum[:, -1] > SAFE_SUM[0]) & (cum[:, -1] < SAFE_SUM[1])).all()):
                    if exact:
                        return False
                    d = None       # Z_u from the nodes is off (a posterior far narrower than they resolve)
            if d is None:
                if grid_lw is None:                                  # log L_u + (a-1) log eta + (b-1) log(1-eta)
                    g = g_buf[:R].copy_(prior_eta.expand(R, -1)).addmm_(inc, tab)
                else:                                                # integrate rho_u out at every eta of the grid
                    ell = torch.addmm(g_buf[:R], inc, tab, beta=0, out=g_buf[:R])
                    g = torch.logsumexp(ell.view(R, M, n_rho) + grid_lw, dim=2).add_(prior_eta)
                top, jm = g.max(dim=1)
                jmax[r0:r1] = jm
                torch.gather(g, 1, (jm[:, None] + win).clamp_(0, M - 1), out=g5[r0:r1])
                d = g.add_(jacobian).sub_(top[:, None]).exp_()       # density in x, max in [e^-20.7, 1/4]
                cum = torch.cumsum(d, 1, out=c_buf[:R])
            e_r = ends[r0:r1]
            if exact:
                e_r[:, :2] = d.index_select(1, grid_ends)
                e_r[:, 2] = cum[:, -1]
                ell = full[:, M:]
                # each node's share of a tail mass (at most 1: no overflow), summed per side
                torch.mm(ell[:, :n_lo + n_hi].sub_((log_z + log_beta)[:, None]).exp_(), sides, out=e_r[:, 3:5])
                l1, l2, l3 = ell[:, n_lo + n_hi:].view(R, 3, 2).unbind(1)        # [R, 2] each: at x_0, x_(M-1)
                dens = e_r[:, :2]
                slope, third = dens * l1, dens * (l3 + l1 * (3 * l2 + l1 * l1))    # d' = d l', d''' = d (l''' + ..)
                e_r[:, 5], e_r[:, 6], e_r[:, 7], e_r[:, 8] = slope[:, 0], third[:, 0], slope[:, 1], third[:, 1]
            else:
                _continued_ends(torch.cat([d.index_select(1, grid_ends), cum[:, -1:]], 1), pa, pb, e_r)
            kk = torch.searchsorted(cum, torch.stack([torch.mv(e_r, w) for w in search], 1))
            if exact and not bool(((kk >= EDGE_CELLS) & (kk <= M - 1 - EDGE_CELLS)).all()):
                return False
            k[r0:r1] = kk
            idx = (kk[:, None, :] + dwin[:, None]).view(R, 9 * P)          # cells k-4 .. k+4, window-major
            if exact:                                                       # the windows lie inside the grid
                win_d = torch.gather(d, 1, idx)
            else:
                fac = ext.take(idx + PAD)                                   # continued beyond the grid
                idx.clamp_(0, M - 1)
                win_d = torch.gather(d, 1, idx).mul_(fac)
            dw[:, r0:r1].copy_(win_d.view(R, 9, P).transpose(0, 1))
            sw[:, r0:r1].copy_(torch.gather(cum, 1, idx[:, 3 * P:5 * P]).view(R, 2, P).transpose(0, 1))
            if tau is not None:
                td[:, r0:r1].copy_(d.index_select(1, tau_cells).t())
                ts[r0:r1] = cum[:, jt - 1]
        users = bk.users[first:first + B]
        m1, m2 = nodes.moments @ torch.softmax(lq_t, dim=0)
        out.mean[users], out.sd[users] = m1, (m2 - m1 * m1).clamp_min(0).sqrt()
        tau_at = None if tau is None else (s_tau, td.mul_(tau_fac[:, None]), ts)
        xs, f_tau = _block_summaries(ends, k, dw, sw, x, h, pa, pb, ps, tau_at, inside=exact)
        eta_q = torch.sigmoid(xs)
        out.lo[users], out.hi[users] = eta_q[:, 0], eta_q[:, 1]
        if f_tau is not None:
            out.p_above[users] = (1 - f_tau).clamp(0, 1)
        if modes:
            out.mode[users] = torch.where(jmax == 0, 0.0, torch.where(jmax == M - 1, 1.0, torch.sigmoid(x[jmax])))
            if rp is None:
                _refine_modes(plan, bk, first, pa, pb, mu, rho_t, x, jmax, g5, out.mode)
    return True


def _start_shift(g5: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Where the log density peaks, in grid cells from its grid maximum x_j, from g5 = g_(j-2) .. g_(j+2) [B, 5].

    The vertex of the parabola through g_(j-1), g_j, g_(j+1) (error O(h^2)); where ``inner`` (both ends of the
    window on the grid), the stationary point of the quartic through all five, p'(s) = D1 + D2 s + D3 s^2 / 2 +
    D4 s^3 / 6 with the central differences D1 = (g_(j-2) - 8 g_(j-1) + 8 g_(j+1) - g_(j+2)) / 12, D2 = (16
    (g_(j-1) + g_(j+1)) - 30 g_j - g_(j-2) - g_(j+2)) / 12, D3 = (g_(j+2) - g_(j-2)) / 2 - (g_(j+1) - g_(j-1)),
    D4 = g_(j-2) - 4 g_(j-1) + 6 g_j - 4 g_(j+1) + g_(j+2), by START_STEPS Newton steps from the vertex inside
    [-1, 1] (error O(h^4): at 10M votes Newton then stops after two passes over the cells instead of three).
    """
    gmm, gm, g0, gp, gpp = g5.unbind(1)
    curv = gm - 2 * g0 + gp
    shift = torch.where(curv < 0, 0.5 * (gm - gp) / curv, 0.0).nan_to_num(0.0).clamp(-0.5, 0.5)
    d1 = (gmm - 8 * gm + 8 * gp - gpp) / 12
    d2 = (16 * (gm + gp) - 30 * g0 - gmm - gpp) / 12
    d3 = 0.5 * (gpp - gmm) - (gp - gm)
    d4 = gmm + gpp - 4 * (gm + gp) + 6 * g0
    s = shift
    for _ in range(START_STEPS):
        slope = d1 + s * (d2 + s * (0.5 * d3 + s * d4 / 6))
        bend = d2 + s * (d3 + 0.5 * s * d4)
        s = torch.where(bend < 0, s - slope / bend, s).nan_to_num(0.0).clamp(-1.0, 1.0)
    return torch.where(inner, s, shift)


def _refine_modes(plan: QuadraturePlan, bk: Bucket, first: int, a: float, b: float, mu: torch.Tensor,
                  rho: torch.Tensor | None, x: torch.Tensor, jmax: torch.Tensor, g5: torch.Tensor,
                  mode: torch.Tensor, iters: int = 30) -> None:
    """Safeguarded Newton on d/d eta [log L_u(eta) + (a-1) log eta + (b-1) log(1-eta)] inside the grid bracket.

    For the bucket's users first .. first + len(jmax) with grid maxima at x_j (j = jmax) and the log density in
    eta g5 = (g_(j-2), .., g_(j+2)) there: start where the polynomial through them peaks (``_start_shift``),
    bracketed by sigmoid(x_(j-1)), sigmoid(x_(j+1)). Each user stops
    once its own step is at most STOP_STEP, or once quadratic convergence puts the next step below it.
    A maximum at the grid's edge stays 0 or 1 (set by the caller). Writes their entries of ``mode``.
    """
    dt, dev, M = x.dtype, x.device, x.shape[0]
    j = jmax
    active = (j > 0) & (j < M - 1)
    if not bool(active.any()):
        return
    m, c_q = _pattern_probs(plan, bk, mu, rho, dt)
    d_q, cnt_q = m - c_q, bk.count.to(dt)
    n_rows = j.shape[0]
    cr = bk.incidence.crow_indices()[first:first + n_rows + 1].long()
    q = bk.incidence.col_indices()[cr[0]:cr[-1]].long()
    lengths = cr.diff()
    row = torch.repeat_interleave(torch.arange(n_rows, device=dev), lengths, output_size=q.shape[0])
    sums = run_sum_matrix(cr - cr[0], torch.ones(q.shape[0], dtype=dt, device=dev))
    c, d, cnt = c_q.index_select(0, q), d_q.index_select(0, q), cnt_q.index_select(0, q)
    lo = torch.sigmoid(x[(j - 1).clamp_min(0)])
    hi = torch.sigmoid(x[(j + 1).clamp_max(M - 1)])
    eta = torch.sigmoid(x[j] + _start_shift(g5, (j >= 2) & (j <= M - 3)) * (x[1] - x[0]))
    prev = torch.full_like(eta, math.inf)
    was_newton = torch.zeros_like(j, dtype=torch.bool)
    t, gc = torch.empty_like(c), torch.empty(c.shape[0], 2, dtype=dt, device=dev)
    out, sel = eta, None             # sel: which users the working arrays hold once compacted; out: all users
    for _ in range(iters):
        n_active = int(active.sum())
        if n_active == 0:
            break
        if n_active * COMPACT < eta.shape[0]:      # a few slow users left: iterate on their cells only
            keep = active.nonzero().squeeze(1)
            if sel is None:
                out = eta.clone()
            else:
                out[sel] = eta
            sel = keep if sel is None else sel[keep]
            on = active.index_select(0, row)
            row = (torch.cumsum(active, 0) - 1).index_select(0, row)[on]
            lengths = lengths[keep]
            c, d, cnt = c[on], d[on], cnt[on]
            sums = run_sum_matrix(torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]), torch.ones_like(c))
            eta, lo, hi, prev, was_newton = eta[keep], lo[keep], hi[keep], prev[keep], was_newton[keep]
            active = torch.ones_like(keep, dtype=torch.bool)
            t, gc = torch.empty_like(c), torch.empty(c.shape[0], 2, dtype=dt, device=dev)
        torch.index_select(eta, 0, row, out=t)
        torch.div(d, torch.addcmul(c, t, d, out=t), out=t)    # d log(c + eta d) / d eta per cell
        torch.mul(cnt, t, out=gc[:, 0])
        torch.mul(gc[:, 0], t, out=gc[:, 1])
        score, info = (sums @ gc).unbind(1)                    # per user: sum n t, sum n t^2
        g = score + (a - 1) / eta - (b - 1) / (1 - eta)
        h = -info - (a - 1) / eta ** 2 - (b - 1) / (1 - eta) ** 2
        lo = torch.where(g > 0, eta, lo)           # the derivative's sign keeps the root bracketed
        hi = torch.where(g > 0, hi, eta)
        step = eta - g / h
        ok = (h < 0) & (step >= lo) & (step <= hi)  # closed: the root may sit on a bracket end
        new = torch.where(active, torch.where(ok, step, 0.5 * (lo + hi)), eta)
        moved = (new - eta).abs()
        # a user stops once its step is at most STOP_STEP, or after two Newton steps in a row when the next one
        # would be below STOP_STEP / 100 (quadratic convergence: about moved^3 / prev^2)
        active &= (moved > STOP_STEP) & ~(ok & was_newton & (moved ** 3 <= 0.01 * STOP_STEP * prev * prev))
        prev, was_newton = moved, ok
        eta = new
    if sel is None:
        out = eta
    else:
        out[sel] = eta
    interior = (j > 0) & (j < M - 1)
    users = bk.users[first:first + n_rows]
    mode[users[interior]] = out[interior]
