"""Cross-entropy (with optional uniform label smoothing) and focal loss."""

from __future__ import annotations

import torch

from typing import Literal

from pydantic import Field

from ..registry import LOSSES
from .base import BaseLossTerm, LossInputs, LossTermConfig, as_compute, weighted_mean


class CELoss(LossTermConfig):
    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class FocalLoss(LossTermConfig):
    name: Literal["focal"]
    gamma: float = Field(2.0, ge=0)


@LOSSES.register("ce", config=CELoss)
class CrossEntropyTerm(BaseLossTerm):
    """l_i = (1 - eps) * (-log p_{i,y_i}) + eps / C * sum_c (-log p_{i,c}).

    ``eps = label_smoothing`` spreads eps uniformly over all C classes (the target
    included), as ``F.cross_entropy(label_smoothing=eps)``. With class weights the batch
    reduction is the weighted mean by w[y_i] of the whole per-sample loss (note: this
    differs from ``F.cross_entropy(weight=w, label_smoothing=eps)``, which also weights
    the smoothing part per class c).
    """

    name = "ce"
    takes_sample_weight = True

    def __init__(self, cfg: CELoss, class_counts: tuple[int, ...]):
        super().__init__()
        self.label_smoothing = float(cfg.label_smoothing)

    def forward(self, inputs: LossInputs, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        logp = torch.log_softmax(as_compute(inputs.logits), dim=1)
        loss = -logp.gather(1, inputs.targets[:, None]).squeeze(1)
        if self.label_smoothing > 0:
            loss = (1 - self.label_smoothing) * loss - self.label_smoothing * logp.mean(dim=1)
        return weighted_mean(loss, inputs.targets, class_weight, inputs.sample_weight)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


@LOSSES.register("focal", config=FocalLoss)
class FocalTerm(BaseLossTerm):
    """Focal loss (Lin et al. 2017): l_i = -(1 - p_t)^gamma * log p_t, p_t = p_{i,y_i}.

    gamma = 0 is cross-entropy. 1 - p_t is computed as -expm1(log p_t) (exact when p_t is
    close to 1) and floored at 1e-12 so that the gradient of (1 - p_t)^gamma stays finite
    for gamma < 1 when p_t rounds to 1. No alpha balancing factor: per-class weighting comes
    from ``reweight`` (weighted mean by w[y_i]).
    """

    name = "focal"
    takes_sample_weight = True

    def __init__(self, cfg: FocalLoss, class_counts: tuple[int, ...]):
        super().__init__()
        self.gamma = float(cfg.gamma)

    def forward(self, inputs: LossInputs, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        logp = torch.log_softmax(as_compute(inputs.logits), dim=1)
        logp_t = logp.gather(1, inputs.targets[:, None]).squeeze(1)
        loss = -logp_t
        if self.gamma > 0:
            loss = (-torch.expm1(logp_t)).clamp_min(1e-12).pow(self.gamma) * loss
        return weighted_mean(loss, inputs.targets, class_weight, inputs.sample_weight)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
