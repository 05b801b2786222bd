"""Coordinates in which the marginal likelihood's weakly identified ridge is nearly straight (for Newton).

Single votes identify delta_p = E[eta] (mu_p - 1/2) per pair; two votes of one user add
E[eta^2] / E[eta]^2 = 1 + cv^2; E[eta] itself rests on the higher moments of each user's votes, so the
likelihood is a long flat ridge along it. In theta = (log a, log b, logit mu) that ridge is curved and
Newton zigzags across it (the gain only halves per step); in

    psi = (logit m, log cv^2, [rho's coordinates], delta_p ...),   m = a / (a + b),
    cv^2 = Var(eta) / m^2 = (1 - m) / (m (a + b + 1)),   mu_p = 1/2 + delta_p / m,

it is nearly straight and Newton converges quadratically (five steps from L-BFGS's end on 10M votes).
Used when a and b are learned and the mu's are free per pair; rho's coordinates and known mu's pass through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from heedful.inference.curvature import jacobian_rows, value_grad_hessian
from heedful.inference.globals import Globals, GlobalSpec


@dataclass
class RidgeCoordinates:
    """theta <-> psi for ``spec``; ``unpack`` and ``log_prior`` take psi, so it stands in for the spec."""

    spec: GlobalSpec

    @staticmethod
    def applies(spec: GlobalSpec) -> bool:
        return spec.eta_fixed is None and not spec.strengths and bool(spec.free_mu.any())

    @property
    def _mid(self) -> int:
        return 2 + int(self.spec.learn_rho) + 2 * int(self.spec.learn_rho_user)

    def to_theta(self, psi: torch.Tensor) -> torch.Tensor:
        m = torch.sigmoid(psi[0])
        total = (1.0 - m) / (m * torch.exp(psi[1])) - 1.0          # a + b
        mu = 0.5 + psi[self._mid:] / m
        return torch.cat([torch.log(m * total).reshape(1), torch.log((1.0 - m) * total).reshape(1),
                          psi[2:self._mid], torch.log(mu) - torch.log1p(-mu)])

    def from_theta(self, theta: np.ndarray) -> np.ndarray:
        a, b = np.exp(theta[0]), np.exp(theta[1])
        m = a / (a + b)
        mu = 1.0 / (1.0 + np.exp(-theta[self._mid:]))
        return np.concatenate([[np.log(a / b), np.log((1.0 - m) / (m * (a + b + 1.0)))], theta[2:self._mid],
                               m * (mu - 0.5)])

    def unpack(self, psi: torch.Tensor) -> Globals:
        return self.spec.unpack(self.to_theta(psi))

    def log_prior(self, psi: torch.Tensor, g: Globals) -> torch.Tensor:
        return self.spec.log_prior(self.to_theta(psi), g)

    def theta_hessian(self, psi: torch.Tensor, grad_psi: np.ndarray, hess_psi: np.ndarray) -> np.ndarray:
        """The Hessian in theta of a function f with gradient and Hessian (grad_psi, hess_psi) in psi.

        With J = d theta / d psi: grad_psi = J' g, hess_psi = J' H J + sum_k g_k d2 theta_k / d psi2,
        so g = J'^-1 grad_psi and H = J'^-1 (hess_psi - sum_k g_k d2 theta_k) J^-1.
        """
        psi = psi.detach()
        K = psi.numel()
        J = self.jacobian(psi)
        Jinv = np.linalg.inv(J)
        g = Jinv.T @ grad_psi
        gt = torch.as_tensor(g, dtype=psi.dtype, device=psi.device)
        _, _, second = value_grad_hessian(lambda p: (gt * self.to_theta(p)).sum(), psi)
        H = Jinv.T @ (hess_psi - second.cpu().numpy().reshape(K, K)) @ Jinv
        return 0.5 * (H + H.T)

    def psi_hessian(self, psi: torch.Tensor, grad_psi: np.ndarray, hess_theta: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`theta_hessian`: hess_psi = J' H J + sum_k g_k d2 theta_k / d psi2."""
        psi = psi.detach()
        J = self.jacobian(psi)
        g = np.linalg.solve(J.T, grad_psi)
        gt = torch.as_tensor(g, dtype=psi.dtype, device=psi.device)
        _, _, second = value_grad_hessian(lambda p: (gt * self.to_theta(p)).sum(), psi)
        H = J.T @ hess_theta @ J + second.cpu().numpy().reshape(J.shape)
        return 0.5 * (H + H.T)

    def jacobian(self, psi: torch.Tensor) -> np.ndarray:
        """J = d theta / d psi at psi, [K, K] float64."""
        x = psi.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return jacobian_rows(self.to_theta(x), x).cpu().numpy().astype(np.float64)
