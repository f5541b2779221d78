"""LDAM: label-distribution-aware margin loss (Cao et al. 2019)."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from ..registry import LOSSES
from .base import (
    BaseLossTerm,
    LossInputs,
    LossTermConfig,
    check_counts,
    per_sample_nll,
    replace_target_column,
    require_cosine,
    weighted_mean,
)


def ldam_margins(class_counts: Sequence[int], max_margin: float = 0.5) -> torch.Tensor:
    """[C] float32 margins m_c = K / n_c^(1/4), with K chosen so that max_c m_c = max_margin.

    The largest margin goes to the smallest class; m_a / m_b = (n_b / n_a)^(1/4).
    """
    counts = torch.tensor(check_counts(class_counts), dtype=torch.float64)
    raw = counts.pow(-0.25)
    return (raw * (max_margin / raw.max())).to(torch.float32)


class LDAMLoss(LossTermConfig):
    name: Literal["ldam"]
    max_margin: float = Field(0.5, gt=0)
    scale: float = Field(30.0, gt=0)


@LOSSES.register("ldam", config=LDAMLoss)
class LDAMTerm(BaseLossTerm):
    """l_i = CE(s * z'_i, y_i) where z'_{i,c} = cos_{i,c} - m_c [c = y_i].

    Defined, as in Cao et al. (2019), on the cosines of a cosine ("NormedLinear") head, with
    scale s (default 30). Decision: a linear head is a ConfigError, not a fallback to the
    raw logits: the margins (at most ``max_margin``) are in cosine units and would mean
    nothing against unbounded logits, and s would train softmax(s * z) while the model is
    evaluated on softmax(z). Use ce, focal, balanced_softmax or logit_adjust on a linear
    head. Class weights (DRW) give the weighted mean.
    """

    name = "ldam"
    needs_cosine = True
    uses_cosine = True
    takes_sample_weight = True

    def __init__(self, cfg: LDAMLoss, class_counts: tuple[int, ...]):
        super().__init__()
        self.scale = float(cfg.scale)
        self.max_margin = float(cfg.max_margin)
        self.register_buffer("margins", ldam_margins(class_counts, cfg.max_margin))

    def forward(self, inputs: LossInputs, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        z = require_cosine(inputs, self.name)
        targets = inputs.targets
        m = self.margins.to(device=z.device, dtype=z.dtype)[targets]
        z_target = z.gather(1, targets[:, None]).squeeze(1)
        adjusted = replace_target_column(z, targets, z_target - m)
        loss = per_sample_nll(self.scale * adjusted, targets)
        return weighted_mean(loss, targets, class_weight, inputs.sample_weight)

    def extra_repr(self) -> str:
        return f"max_margin={self.max_margin}, scale={self.scale}"
