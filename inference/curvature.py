"""The exact gradient and Hessian of the marginal objective in theta, in one pass over the users.

With S_ug = sum_q I_uq T_qg(theta) + log w_g(theta) (see :func:`heedful.model.likelihood.bucket_table`),
P_ug = softmax_g S_ug and D_ugk = dS_ug / dtheta_k = sum_q I_uq dT_qg/dtheta_k + d log w_g/dtheta_k:

    f      = sum_u logsumexp_g S_ug + r(theta)                    (r: gold votes and log-priors)
    grad f = sum_u E_Pu[D_u] + grad r
    hess f = sum_{q,g} C_qg d2T_qg + sum_g s_g d2 log w_g + hess r + sum_u Cov_Pu(D_u)

with C = I^T P and s = sum_u P_u. The first three terms are second derivatives of a function of the
small tables only, h(theta) = <C, T(theta)> + <s, log w(theta)> + r(theta) with C and s held fixed
(autograd); the covariance needs D, one sparse product I @ dT [Q, G x K], in blocks of users. That is
about four gradients' work, against K + 1 gradients for forward differences, and exact.
"""

from __future__ import annotations

import numpy as np
import torch

from heedful.inference.globals import GlobalSpec
from heedful.model.likelihood import Bucket, QuadraturePlan, bucket_table, gold_loglik

# elements of D [rows, G, K] per block of users: 8 MB on a CPU, where a block that stays in cache makes the
# skinny product D'D four times faster (0.67 s against 1.2 s at 10M votes); 512 MB on a GPU
CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS = 1 << 20, 1 << 26


def _tables(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor, bucket: Bucket):
    g = spec.unpack(theta)
    return bucket_table(plan, bucket, g.a, g.b, g.mu, g.rho, g.rho_prior)


def _jacobian(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor,
              bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
    """dT/dtheta [Q, G, K] and d log w/dtheta [G, K] of the small tables.

    Reverse mode twice: v(u) = J^T u is linear in u, so d v_k / d u = J[:, k]; K backward passes over the
    small graph (forward-mode AD would do, but its first use imports torch._dynamo, about a second).
    """
    th = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        table, logw = _tables(plan, spec, th, bucket)
        out = torch.cat([table.reshape(-1), logw])
        u = torch.zeros_like(out, requires_grad=True)
        # <out, u> rather than grad_outputs=u: grad_outputs load sympy on first use
        (v,) = torch.autograd.grad((out * u).sum(), th, create_graph=True, allow_unused=True)
        J = jacobian_rows(v, u).T if v is not None else out.new_zeros(out.numel(), th.numel())
    Q, G = table.shape
    return J[: Q * G].reshape(Q, G, -1).detach(), J[Q * G:].detach()


def marginal_derivatives(plan: QuadraturePlan, spec: GlobalSpec, theta: torch.Tensor,
                         ) -> tuple[float, np.ndarray, np.ndarray]:
    """(f, grad f, hess f) of f(theta) = log p(votes, gold | theta) + log-priors, exactly (float64 numpy)."""
    theta = theta.detach()
    K = theta.numel()
    fixed: list[tuple[Bucket, torch.Tensor, torch.Tensor]] = []
    total = 0.0
    cov = torch.zeros(K, K, dtype=plan.dtype, device=plan.device)
    with torch.no_grad():
        for bk in plan.buckets:
            table, logw = _tables(plan, spec, theta, bk)
            s = bk.incidence @ table
            s += logw
            lse = torch.logsumexp(s, dim=1)
            total += float(lse.sum())
            p = s.sub_(lse[:, None]).exp_()
            fixed.append((bk, bk.incidence_t @ p, p.sum(0)))
            jt, jw = _jacobian(plan, spec, theta, bk)
            Q, G = table.shape
            rows = max(1, (GPU_CHUNK_ELEMENTS if plan.device.type == "cuda" else CHUNK_ELEMENTS) // max(G * K, 1))
            for start, inc in bk.row_chunks(rows):
                n = inc.shape[0]
                d = (inc @ jt.reshape(Q, G * K)).view(n, G, K)
                d += jw
                pc = p[start:start + n]
                d -= torch.einsum("ug,ugk->uk", pc, d)[:, None, :]     # D - E_P[D]
                d *= pc.sqrt()[:, :, None]
                flat = d.view(n * G, K)
                cov += flat.T @ flat

    def h(th: torch.Tensor) -> torch.Tensor:
        g = spec.unpack(th)
        out = gold_loglik(plan, g.mu) + spec.log_prior(th, g)
        for bk, c, w in fixed:
            table, logw = bucket_table(plan, bk, g.a, g.b, g.mu, g.rho, g.rho_prior)
            out = out + (c * table).sum() + (w * logw).sum()
        return out

    _, grad, second = value_grad_hessian(h, theta)
    with torch.no_grad():
        g = spec.unpack(theta)
        extra = float(gold_loglik(plan, g.mu) + spec.log_prior(theta, g))
    H = (second + cov).cpu().numpy().astype(np.float64)
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
