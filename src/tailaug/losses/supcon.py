"""Supervised contrastive loss (Khosla et al. 2020), the L_out form.

For L2-normalised features z_i and temperature T, with A(i) = all samples but i and
P(i) = the samples of A(i) with the label of i (both views count):

    L = mean over anchors i with |P(i)| > 0 of
        -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a in A(i)} exp(z_i.z_a / T) )

Anchors without any positive are left out of the mean; a batch with no positive pair at
all gives 0 (still attached to the graph). There is no (T / base_T) factor (base
temperature = temperature). Class weights are ignored.

The two-view layout (rows [0:N/2] and [N/2:N] are views of the same images) needs no
special handling: the two views share a label and so are positives of each other.
``targets`` may have N entries (one per row) or N/2 (one per image, repeated for the
second view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import Literal

from pydantic import Field

from ..errors import TailaugError
from ..registry import LOSSES
from .base import BaseLossTerm, LossInputs, LossTermConfig, as_compute


class SupConLoss(LossTermConfig):
    name: Literal["supcon"]
    temperature: float = Field(0.07, gt=0)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """SupCon L_out on [N, d] features (normalised here) with [N] labels."""
    n = features.shape[0]
    if n < 2:
        return as_compute(features).sum() * 0.0
    z = F.normalize(as_compute(features), dim=1)
    sim = z @ z.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(dim=1)
    pos_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    has_pos = n_pos > 0
    per_anchor = -pos_log_prob / n_pos.clamp_min(1).to(pos_log_prob.dtype)
    per_anchor = torch.where(has_pos, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum() / has_pos.sum().clamp_min(1).to(per_anchor.dtype)


@LOSSES.register("supcon", config=SupConLoss)
class SupConTerm(BaseLossTerm):
    """SupCon on ``inputs.features``; needs two augmented views per image."""

    name = "supcon"
    uses_class_weights = False
    takes_sample_weight = False  # no per-sample label term for Remix to weight: its positives come from the labels
    needs_two_views = True

    def __init__(self, cfg: SupConLoss, class_counts: tuple[int, ...]):
        super().__init__()
        self.temperature = float(cfg.temperature)

    def forward(self, inputs: LossInputs, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        if inputs.features is None:
            raise TailaugError(
                "the supcon loss needs the pooled features of the batch (LossInputs.features), "
                "but none were given; pass the backbone features with both views stacked as rows "
                "[0:N/2] and [N/2:N], or remove supcon from train.loss"
            )
        features, labels = inputs.features, inputs.targets
        if features.ndim != 2:
            raise TailaugError(f"supcon features must be [N, d], got shape {tuple(features.shape)}")
        if labels.shape[0] * 2 == features.shape[0]:
            labels = torch.cat([labels, labels])
        elif labels.shape[0] != features.shape[0]:
            raise TailaugError(
                f"supcon got {features.shape[0]} feature rows but {labels.shape[0]} targets; "
                "give one target per row (or one per image when the rows are two views)"
            )
        return supcon_loss(features, labels, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
