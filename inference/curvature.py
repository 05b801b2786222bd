"""The exact gradient and Hessian of the marginal objective in theta, in one pass over the users.

With S_ug = sum_q I_uq T_qg + log w_g (see :func:`heedful.model.likelihood.bucket_table`), P_ug = softmax_g S_ug
and D_ugk = dS_ug / dtheta_k = sum_q I_uq dT_qg/dtheta_k + d log w_g/dtheta_k:

    f      = sum_u logsumexp_g S_ug + r(theta)                    (r: gold votes and log-priors)
    grad f = sum_u E_Pu[D_u] + grad r
    hess f = sum_{q,g} C_qg d2T_qg + sum_g s_g d2 log w_g + hess r + sum_u Cov_Pu(D_u)

with C = I^T P and s = sum_u P_u. T depends on theta only through the globals gamma = (a, b, mu, rho,
a_r, b_r) (:meth:`GlobalSpec.unpack`), and through them on what each cell sees: the node x_g (and rho_g)
of Beta(a, b) (and Beta(a_r, b_r)), m_q = m0_q + s_q mu_p(q) and c_qg = c0_q + r_q rho_g (s_q, r_q in
{-1, 0, 1}). With pr = c + x (m - c) and T = n log pr, the first and second derivatives of T in (x, mu, rho)
are closed forms; only the nodes need autograd, two passes per parameter of their Beta rules (not one per
theta_k through the eigendecomposition). In gamma the first three terms are

    H_gamma = J' (d2 F / d pi2) J + sum_i lambda_i d2 pi_i / d gamma2,      pi = (x, log w, rho_g, mu),

F = <C, T> + <s, log w>, lambda = dF/dpi, J = dpi/dgamma; theta follows by the chain rule through gamma(theta)
(autograd on that small graph). The covariance needs D: dT/dtheta [Q, G, K] from the same closed forms,
then one sparse product I @ dT in blocks of users. That is about four gradients' work, and exact.
"""

from __future__ import annotations

import numpy as np
import torch

from heedful.inference.globals import Globals, GlobalSpec
from heedful.model.likelihood import Bucket, QuadraturePlan, bucket_nodes, bucket_table, casual_prob, gold_loglik

# elements of D [rows, G, K] per block of users: 8 MB on a CPU, where a block that stays in cache makes the
# skinny product D'D four times faster (0.67 s against 1.2 s at 10M votes); 512 MB on a GPU
CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS = 1 << 20, 1 << 26


def _tables(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor, bucket: Bucket):
    g = spec.unpack(theta)
    return bucket_table(plan, bucket, g.a, g.b, g.mu, g.rho, g.rho_prior)


class _Layout:
    """gamma = (a, b, mu_1..mu_P, [rho], [a_r, b_r]) flattened: where each global sits."""

    def __init__(self, g: Globals):
        self.n_pairs = g.mu.numel()
        self.mu = slice(2, 2 + self.n_pairs)
        i = 2 + self.n_pairs
        self.rho = i if g.rho is not None else None
        i += g.rho is not None
        self.rho_prior = slice(i, i + 2) if g.rho_prior is not None else None
        self.size = i + 2 * (g.rho_prior is not None)

    @staticmethod
    def flat(g: Globals, dtype: torch.dtype) -> torch.Tensor:
        parts = [g.a.reshape(1), g.b.reshape(1), g.mu.reshape(-1)]
        parts += [g.rho.reshape(1)] if g.rho is not None else []
        parts += [g.rho_prior[0].reshape(1), g.rho_prior[1].reshape(1)] if g.rho_prior is not None else []
        return torch.cat([t.to(dtype) for t in parts])


def _node_derivatives(plan: QuadraturePlan, bucket: Bucket, g: Globals, lay: _Layout):
    """The bucket's nodes and their derivatives in gamma.

    Returns (x, rho_g or None, log w) [G] and their Jacobians Jx, Jr (or None), Jw [G, |gamma|], and
    hess(lam_x, lam_r, s) -> sum_g (lam_x x_g + lam_r rho_g + s_g log w_g)'' in gamma [|gamma|, |gamma|]
    (reverse mode twice over the rules' parameters a, b [, a_r, b_r] only).
    """
    dt = plan.dtype
    leaves = [g.a.detach().clone(), g.b.detach().clone()]
    if g.rho_prior is not None:
        leaves += [g.rho_prior[0].detach().clone(), g.rho_prior[1].detach().clone()]
    leaves = [t.requires_grad_(True) for t in leaves]
    cols = [0, 1] + ([lay.rho_prior.start, lay.rho_prior.start + 1] if g.rho_prior is not None else [])
    with torch.enable_grad():
        x, xr, logw = bucket_nodes(leaves[0], leaves[1], bucket.n_nodes,
                                   (leaves[2], leaves[3]) if g.rho_prior is not None else None, dt)
        G = x.shape[0]
        outs = [x, logw] + ([xr] if xr is not None else [])
        J = _jacobian_in(torch.cat(outs), leaves)                     # [len, L]

    def spread(block: torch.Tensor) -> torch.Tensor:               # [G, L] -> [G, |gamma|]
        full = block.new_zeros(G, lay.size)
        full[:, cols] = block
        return full

    Jx, Jw = spread(J[:G]), spread(J[G:2 * G])
    if xr is not None:
        rho, Jr = xr.detach(), spread(J[2 * G:])
    elif g.rho is not None:
        rho = g.rho.detach().to(dt).reshape(1).expand(G)
        Jr = x.new_zeros(G, lay.size).detach()
        Jr[:, lay.rho] = 1.0
    else:
        rho, Jr = None, None

    def hess(lam_x: torch.Tensor, lam_r: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            phi = (lam_x * x).sum() + (s * logw).sum()
            if xr is not None and lam_r is not None:
                phi = phi + (lam_r * xr).sum()
            grads = torch.autograd.grad(phi, leaves, create_graph=True, allow_unused=True)
            first = torch.stack([gr if gr is not None else torch.zeros((), dtype=dt, device=x.device) for gr in grads])
            Hl = torch.stack([torch.stack([torch.zeros((), dtype=dt, device=x.device) if d is None else d for d in
                                           torch.autograd.grad(first[k], leaves, retain_graph=True,
                                                               allow_unused=True)])
                              if first[k].requires_grad else torch.zeros(len(leaves), dtype=dt, device=x.device)
                              for k in range(len(leaves))]).detach()  # [L, L]
        H = Hl.new_zeros(lay.size, lay.size)
        H[np.ix_(cols, cols)] = Hl
        return H

    return x.detach(), rho, logw.detach(), Jx, Jr, Jw, hess


def _jacobian_in(out: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
    """d out / d leaves [len(out), len(leaves)] for scalar leaves, by reverse mode twice: v(u) = J' u is
    linear in u, so d v_l / d u = J[:, l]; one pass per leaf (forward-mode AD would do, but its first use
    imports torch._dynamo, about a second)."""
    u = torch.zeros_like(out, requires_grad=True)
    # <out, u> rather than grad_outputs=u: grad_outputs load sympy on first use
    vs = torch.autograd.grad((out * u).sum(), leaves, create_graph=True, allow_unused=True)
    cols = []
    for v in vs:
        r = torch.autograd.grad(v, u, retain_graph=True, allow_unused=True)[0] if v is not None and v.requires_grad \
            else None
        cols.append(torch.zeros_like(out) if r is None else r)
    return torch.stack(cols, 1).detach()


def _cell_terms(plan: QuadraturePlan, bucket: Bucket, x: torch.Tensor, rho: torch.Tensor | None,
                mu: torch.Tensor) -> dict[str, torch.Tensor]:
    """First and second derivatives [Q, G] of T_qg = n_q log pr_qg in x_g, mu_p(q) and rho_g.

    pr = c + x (m - c), dpr/dx = m - c, dpr/dmu = s x, dpr/drho = r (1 - x), d2pr/dx dmu = s,
    d2pr/dx drho = -r; d2T/dy dz = n (d2pr/dy dz / pr - dpr/dy dpr/dz / pr^2).
    """
    kinds, pk, dt = plan.kinds, bucket.pattern_kind, plan.dtype
    xg = x[None, :]
    m = kinds.attentive_prob(mu)[pk][:, None]
    first = kinds.first[pk][:, None]
    c = casual_prob(first, None if rho is None else rho[None, :]).to(dt)
    pr = c + xg * (m - c)
    n = bucket.count[:, None]
    w = torch.where(pr > 0, n / pr, torch.zeros_like(pr))            # n / pr
    w2 = torch.where(pr > 0, w / pr, torch.zeros_like(pr))           # n / pr^2
    one = torch.ones((), dtype=dt, device=pr.device)
    s = torch.where(kinds.gold[pk] == 0, torch.where(kinds.pick_a[pk], one, -one), 0 * one)[:, None]
    r = torch.where(first == 1, one, torch.where(first == 2, -one, 0 * one)) if rho is not None else 0 * one
    dx, dm, dr = m - c, s * xg, r * (1.0 - xg)
    return {"x": w * dx, "m": w * dm, "r": w * dr,
            "xx": -w2 * dx * dx, "mm": -w2 * dm * dm, "rr": -w2 * dr * dr,
            "xm": w * s - w2 * dx * dm, "xr": -w * r - w2 * dx * dr, "mr": -w2 * dm * dr}


def _bucket_terms(plan: QuadraturePlan, bk: Bucket, g: Globals, lay: _Layout, C: torch.Tensor,
                  s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For F = <C, T> + <s, log w> of one bucket: dF/dgamma, d2F/dgamma2, and dT/dgamma [Q, G, |gamma|],
    d log w/dgamma [G, |gamma|] (closed forms in x, mu, rho; the nodes by :func:`_node_derivatives`)."""
    dt, dev, P = plan.dtype, plan.device, lay.n_pairs
    x, rho, _, Jx, Jr, Jw, node_hess = _node_derivatives(plan, bk, g, lay)
    t = _cell_terms(plan, bk, x, rho, g.mu)
    Q = C.shape[0]
    onehot = torch.zeros(Q, P, dtype=dt, device=dev)        # pattern q's pair
    onehot[torch.arange(Q, device=dev), plan.kinds.pair[bk.pattern_kind]] = 1.0
    Jm = torch.zeros(P, lay.size, dtype=dt, device=dev)     # d mu / d gamma
    Jm[:, lay.mu] = torch.eye(P, dtype=dt, device=dev)
    csum = {k: (C * v).sum(0) for k, v in t.items()}                          # [G]: sum_q C_qg t_qg
    cpair = {k: (C * t[k]).T @ onehot for k in ("m", "mm", "xm", "mr")}     # [G, P]: ... over pair p's q

    lam_x, lam_m = csum["x"], cpair["m"].sum(0)
    grad = Jx.T @ lam_x + Jw.T @ s + Jm.T @ lam_m
    hess = Jx.T @ (csum["xx"][:, None] * Jx) + Jm.T @ (cpair["mm"].sum(0)[:, None] * Jm)
    cross = Jx.T @ cpair["xm"] @ Jm
    jt = t["x"][:, :, None] * Jx[None] + t["m"][:, :, None] * (onehot @ Jm)[:, None, :]
    lam_r = None
    if Jr is not None:
        lam_r = csum["r"]
        grad = grad + Jr.T @ lam_r
        hess = hess + Jr.T @ (csum["rr"][:, None] * Jr)
        cross = cross + Jx.T @ (csum["xr"][:, None] * Jr) + Jr.T @ cpair["mr"] @ Jm
        jt = jt + t["r"][:, :, None] * Jr[None]
    hess = hess + cross + cross.T + node_hess(lam_x, lam_r, s)
    return grad, hess, jt, Jw


def marginal_derivatives(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor,
                         ) -> tuple[float, np.ndarray, np.ndarray]:
    """(f, grad f, hess f) of f(theta) = log p(votes, gold | theta) + log-priors, exactly (float64 numpy)."""
    theta = theta.detach()
    K, dt = theta.numel(), plan.dtype
    th = theta.clone().requires_grad_(True)
    with torch.enable_grad():
        g_th = spec.unpack(th)
        gamma = _Layout.flat(g_th, dt)
        Jg = jacobian_rows(gamma, th)                                   # d gamma / d theta [|gamma|, K]
    with torch.no_grad():
        g = spec.unpack(theta)
    lay = _Layout(g)
    grad_gamma = torch.zeros(lay.size, dtype=dt, device=plan.device)
    hess_gamma = torch.zeros(lay.size, lay.size, dtype=dt, device=plan.device)
    cov = torch.zeros(K, K, dtype=dt, device=plan.device)
    total = 0.0
    with torch.no_grad():
        for bk in plan.buckets:
            table, logw = bucket_table(plan, bk, g.a, g.b, g.mu, g.rho, g.rho_prior)
            S = bk.incidence @ table
            S += logw
            lse = torch.logsumexp(S, dim=1)
            total += float(lse.sum())
            p = S.sub_(lse[:, None]).exp_()
            C, s = bk.incidence_t @ p, p.sum(0)
            del S, table
            grad_b, hess_b, jt, jw = _bucket_terms(plan, bk, g, lay, C, s)
            grad_gamma += grad_b
            hess_gamma += hess_b
            Q, G = C.shape
            jt = (jt.reshape(Q * G, lay.size) @ Jg).view(Q, G, K)          # dT/dtheta [Q, G, K]
            jw = jw @ Jg                                                   # d log w/dtheta [G, K]
            with_w = bool(jw.any())         # 0 when (a, b) are held fixed (em): no pass adds it
            rows = max(1, (GPU_CHUNK_ELEMENTS if plan.device.type == "cuda" else CHUNK_ELEMENTS) // max(G * K, 1))
            for start, inc in bk.row_chunks(rows):
                n = inc.shape[0]
                d = (inc @ jt.reshape(Q, G * K)).view(n, G, K)
                if with_w:
                    d += jw
                pc = p[start:start + n]
                d -= torch.einsum("ug,ugk->uk", pc, d)[:, None, :]     # D - E_P[D]
                d *= pc.sqrt()[:, :, None]
                flat = d.view(n * G, K)
                cov += flat.T @ flat

    def outer(th: torch.Tensor) -> torch.Tensor:        # r(theta) + <grad_gamma, gamma(theta)>
        gg = spec.unpack(th)
        return gold_loglik(plan, gg.mu) + spec.log_prior(th, gg) + (grad_gamma * _Layout.flat(gg, dt)).sum()

    _, grad, second = value_grad_hessian(outer, theta)
    with torch.no_grad():
        extra = float(gold_loglik(plan, g.mu) + spec.log_prior(theta, g))
    H = (second + Jg.T @ hess_gamma @ Jg + cov).cpu().numpy().astype(np.float64)
    return total + extra, grad.cpu().numpy().astype(np.float64), 0.5 * (H + H.T)


def value_grad_hessian(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fn(x), its gradient and Hessian by reverse mode twice, for a scalar fn of a small vector x (detached).

    Plain ``torch.autograd.grad`` calls: torch.autograd.functional would do, but grad_outputs and some
    double-backward formulas load sympy or torch._dynamo on first use (about a second each).
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = fn(x)
        (grad,) = torch.autograd.grad(value, x, create_graph=True, allow_unused=True)
        if grad is None:
            return value.detach(), torch.zeros_like(x).detach(), x.new_zeros(x.numel(), x.numel())
        hess = jacobian_rows(grad, x)
    return value.detach(), grad.detach(), hess


def jacobian_rows(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d out_k / d x for every k of a small vector ``out`` still in x's graph: [len(out), len(x)], detached
    (one backward pass per k; zeros where out_k does not depend on x)."""
    if not out.requires_grad:
        return x.new_zeros(out.numel(), x.numel())
    rows = [torch.autograd.grad(out[k], x, retain_graph=True, allow_unused=True)[0] for k in range(out.numel())]
    return torch.stack([torch.zeros_like(x) if r is None else r for r in rows]).detach() if rows \
        else x.new_zeros(0, x.numel())
