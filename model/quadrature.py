"""Gauss-Jacobi quadrature against a Beta(a, b) density, differentiable in a and b; Chebyshev interpolation.

With G nodes, ``sum_g w_g f(x_g) = E_{x ~ Beta(a, b)}[f(x)]`` exactly for every polynomial f of degree
at most 2G - 1. Nodes and weights come from the eigen-decomposition of the Jacobi matrix of the
orthogonal polynomials for the weight x^(a-1) (1-x)^(b-1) on [0, 1] (Golub-Welsch), so autograd
carries gradients with respect to (a, b) through ``torch.linalg.eigh``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numpy.polynomial import chebyshev


def jacobi_matrix(a: torch.Tensor, b: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Symmetric tridiagonal Jacobi matrix on t = 2x - 1 for weight (1-t)^alpha (1+t)^beta.

    alpha = b - 1, beta = a - 1. Diagonal: (beta^2 - alpha^2) / (s (s + 2)), s = 2k + alpha + beta;
    squared off-diagonal: 4k (k+alpha)(k+beta)(k+alpha+beta) / (s^2 (s+1)(s-1)); k = 0 and k = 1 are
    written in their cancelled forms, which have no 0/0 at alpha + beta in {0, -1}.
    """
    al, be = b - 1.0, a - 1.0
    ab = al + be
    diag = [(be - al) / (ab + 2.0)]
    if n_nodes > 1:
        k = torch.arange(1, n_nodes, dtype=a.dtype, device=a.device)
        s = 2.0 * k + ab
        diag.append((be * be - al * al) / (s * (s + 2.0)))
    d = torch.cat([diag[0].reshape(1)] + ([diag[1]] if n_nodes > 1 else []))
    J = torch.diag(d)
    if n_nodes > 1:
        off = [4.0 * (1.0 + al) * (1.0 + be) / ((2.0 + ab) ** 2 * (3.0 + ab))]
        if n_nodes > 2:
            k = torch.arange(2, n_nodes, dtype=a.dtype, device=a.device)
            s = 2.0 * k + ab
            off.append(4.0 * k * (k + al) * (k + be) * (k + ab) / (s * s * (s + 1.0) * (s - 1.0)))
        e = torch.sqrt(torch.cat([off[0].reshape(1)] + ([off[1]] if n_nodes > 2 else [])))
        J = J + torch.diag(e, 1) + torch.diag(e, -1)
    return J


def gauss_jacobi(a: torch.Tensor, b: torch.Tensor, n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes x_g in (0, 1) and log-weights log w_g (sum_g w_g = 1) for the Beta(a, b) density.

    Computed in float64 whatever the input dtype (eigenvectors in float32 are too coarse for the
    small weights); cast back by the caller.
    """
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    t, vecs = torch.linalg.eigh(jacobi_matrix(a64, b64, n_nodes))
    x = (0.5 * (1.0 + t)).clamp(1e-300, 1.0 - 1e-16)
    logw = torch.log(vecs[0].square().clamp_min(1e-300))   # square, not abs: abs's double backward is slow to load
    logw = logw - torch.logsumexp(logw, 0)  # exact normalisation: the weights sum to one
    return x, logw


def nodes_for(max_votes: int, cap: int, moments: int = 0) -> int:
    """Nodes G (at least 2, at most ``cap``) exact for E[eta^moments L_u(eta)] for users with up to ``max_votes``
    votes: L_u has degree n_u, so 2G - 1 >= max_votes + moments. ``moments=0``: the marginal likelihood and its
    derivatives in the globals (polynomials of the same degree); 2: the posterior's mean and sd."""
    return int(min(max((max_votes + moments) // 2 + 1, 2), cap))


@functools.lru_cache(maxsize=64)
def chebyshev_operators(n: int) -> tuple[np.ndarray, np.ndarray]:
    """For a polynomial p of degree < n on [0, 1], known by its values v_j = p(t_j) at the n Chebyshev points
    t_j = (1 + cos(pi (j + 1/2) / n)) / 2: (t [n], W [2n + 5, n]) with W v = (Z, M1, M2, M3, c, a):
    Z = int_0^1 p, Mk = int_0^1 t^k p, a [n] the coefficients of p = sum_k a_k T_k(2t - 1)
    and c [n + 1] those of F(x) = int_0^x p (F(0) = 0). Exact in exact arithmetic (p is its own interpolant);
    float64 numpy, cached."""
    j = np.arange(n)
    y = np.cos(np.pi * (j + 0.5) / n)
    to_coef = 2.0 / n * np.cos(np.pi * np.outer(np.arange(n), j + 0.5) / n)   # discrete orthogonality of T_k
    to_coef[0] /= 2
    to_cdf = chebyshev.chebint(to_coef, lbnd=-1, scl=0.5, axis=0)              # dt = dy / 2; F(y = -1) = 0
    t1 = _times_t(n)                                                           # coefficients of t p, t^2 p
    t2 = _times_t(n + 1) @ t1
    t3 = _times_t(n + 2) @ t2
    moments = [chebyshev.chebint(m @ to_coef, lbnd=-1, scl=0.5, axis=0).sum(0)   # at y = 1: T_k(1) = 1
               for m in (np.eye(n), t1, t2, t3)]
    return (1.0 + y) / 2, np.vstack(moments + [to_cdf, to_coef])


def _times_t(m: int) -> np.ndarray:
    """[m + 1, m]: Chebyshev coefficients (in y = 2t - 1) of t p from those of p (degree < m), from
    y T_k = (T_(k+1) + T_|k-1|) / 2 and t = (1 + y) / 2."""
    y = np.zeros((m + 1, m))
    k = np.arange(m)
    y[k + 1, k] = 0.5
    y[np.abs(k - 1), k] += 0.5
    return 0.5 * (y + np.eye(m + 1, m))
