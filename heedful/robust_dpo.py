"""Robust DPO (rDPO, Chowdhury et al. 2024) with a label-flip rate per example.

With h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) and flip rate
epsilon_n < 1/2 per example,

    L_n = [ -(1 - epsilon_n) log sigmoid(beta h_n) + epsilon_n log sigmoid(-beta h_n) ] / (1 - 2 epsilon_n),

an unbiased estimate of the clean-label DPO loss when the label was flipped with probability
epsilon_n. TRL's ``loss_type="robust"`` is this with one global epsilon (``label_smoothing``);
heedful exports epsilon_u = (1 - eta_u) / 2 per vote. :func:`robust_dpo_loss` is the bare loss;
``EpsilonDPOTrainer`` (needs ``trl``, the ``dpo`` extra) is a ``trl.DPOTrainer`` that reads each
record's ``epsilon`` column instead of the global ``label_smoothing``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def robust_dpo_loss_from_margin(margin: torch.Tensor, epsilon: torch.Tensor | float, beta: float = 0.1) -> torch.Tensor:
    """Per-example L_n from the log-ratio margin h_n (see the module docstring); epsilon broadcasts."""
    eps = torch.as_tensor(epsilon, dtype=margin.dtype, device=margin.device)
    if bool(((eps < 0) | (eps >= 0.5)).any()):
        raise ValueError("epsilon must lie in [0, 0.5) for the robust DPO loss")
    return (-(1 - eps) * F.logsigmoid(beta * margin) + eps * F.logsigmoid(-beta * margin)) / (1 - 2 * eps)


def robust_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    epsilon: torch.Tensor | float,
    beta: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """rDPO loss with per-example epsilon from sequence log-probs; ``reduction``: mean, sum or none."""
    margin = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    loss = robust_dpo_loss_from_margin(margin, epsilon, beta)
    if reduction == "none":
        return loss
    if reduction in ("mean", "sum"):
        return getattr(loss, reduction)()
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")


class _EpsilonCollator:
    """Wraps TRL's preference collator: adds ``epsilon`` (float tensor, one per example) to the batch."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        batch["epsilon"] = torch.tensor([float(e["epsilon"]) for e in examples], dtype=torch.float32)
        return batch


@functools.cache
def _trainer_class():
    from trl import DPOTrainer

    class EpsilonDPOTrainer(DPOTrainer):
        """``trl.DPOTrainer`` with ``loss_type=["robust"]`` and a per-example ``epsilon`` column.

        The dataset needs an ``epsilon`` column (heedful's DPO export has one). Each batch's epsilons
        stand in for ``label_smoothing`` in TRL's robust loss, so with all epsilons equal to
        ``label_smoothing`` the loss is TRL's own.
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if list(self.loss_types) != ["robust"]:
                raise ValueError(f"EpsilonDPOTrainer needs loss_type=['robust'], got {self.loss_types}")
            self.data_collator = _EpsilonCollator(self.data_collator)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if "epsilon" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "epsilon"]

        def _compute_loss(self, model, inputs, return_outputs):
            if "epsilon" not in inputs:
                raise ValueError("EpsilonDPOTrainer: the batch has no 'epsilon'; give the dataset an epsilon column")
            inputs = dict(inputs)
            eps = inputs.pop("epsilon").to(self.accelerator.device)
            if bool(((eps < 0) | (eps >= 0.5)).any()):
                raise ValueError("epsilon must lie in [0, 0.5) for the robust DPO loss")
            saved, self.label_smoothing = self.label_smoothing, eps
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                self.label_smoothing = saved

    return EpsilonDPOTrainer


def __getattr__(name: str):
    if name == "EpsilonDPOTrainer":
        return _trainer_class()
    raise AttributeError(name)
