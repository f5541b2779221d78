"""Prior-corrected softmax losses and post-hoc logit adjustment.

Balanced softmax (Ren et al. 2020): CE on logits + log(prior).
Logit-adjusted loss (Menon et al. 2021): CE on logits + tau * log(prior).
Post-hoc logit adjustment (Menon et al. 2021): predict argmax of logits - tau * log(prior).

prior_c = n_c / N, the training label frequencies. Both losses ignore ``reweight`` class
weights: they already correct for the prior, and weighting on top would count it twice.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from ..registry import LOSSES
from .base import (BaseLossTerm, LossInputs, LossTermConfig, as_compute, check_counts, log_prior, per_sample_nll,
                   weighted_mean)


class BalancedSoftmaxLoss(LossTermConfig):
    name: Literal["balanced_softmax"]


class LogitAdjustLoss(LossTermConfig):
    name: Literal["logit_adjust"]
    tau: float = Field(1.0, ge=0)


def adjust_logits(
    logits: torch.Tensor, class_counts: Sequence[int] | torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Post-hoc logit adjustment for evaluation: ``logits - tau * log(prior)``.

    Returns a tensor of the same dtype and device as ``logits``; tau = 0 returns the logits
    unchanged. Works on any [..., C] tensor.
    """
    counts = check_counts(class_counts)
    if logits.shape[-1] != len(counts):
        raise ValueError(f"logits have {logits.shape[-1]} classes but class_counts has {len(counts)}")
    if tau == 0:
        return logits
    shift = (tau * log_prior(counts)).to(device=logits.device, dtype=logits.dtype)
    return logits - shift


class _PriorShiftTerm(BaseLossTerm):
    uses_class_weights = False
    takes_sample_weight = True

    def __init__(self, class_counts: tuple[int, ...], tau: float):
        super().__init__()
        self.tau = tau
        self.register_buffer("shift", (tau * log_prior(class_counts)).to(torch.float32))

    def forward(self, inputs: LossInputs, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = as_compute(inputs.logits)
        shifted = logits + self.shift.to(device=logits.device, dtype=logits.dtype)
        return weighted_mean(per_sample_nll(shifted, inputs.targets), inputs.targets, None, inputs.sample_weight)


@LOSSES.register("balanced_softmax", config=BalancedSoftmaxLoss)
class BalancedSoftmaxTerm(_PriorShiftTerm):
    """l_i = CE(z_i + log prior, y_i); class weights are ignored."""

    name = "balanced_softmax"

    def __init__(self, cfg: BalancedSoftmaxLoss, class_counts: tuple[int, ...]):
        super().__init__(class_counts, 1.0)


@LOSSES.register("logit_adjust", config=LogitAdjustLoss)
class LogitAdjustTerm(_PriorShiftTerm):
    """l_i = CE(z_i + tau * log prior, y_i); class weights are ignored."""

    name = "logit_adjust"

    def __init__(self, cfg: LogitAdjustLoss, class_counts: tuple[int, ...]):
        super().__init__(class_counts, float(cfg.tau))

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
