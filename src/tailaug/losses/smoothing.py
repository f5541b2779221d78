"""Label-aware smoothing (MiSLAS, Zhong et al. 2021).

Each class y gets its own smoothing eps_y, decided by its training count n_y. With
n_1 = max_c n_c (the head) and n_K = min_c n_c (the tail) and r_y = (n_y - n_K) / (n_1 - n_K):

* concave: eps_y = eps_K + (eps_1 - eps_K) * sin(pi / 2 * r_y)
* linear:  eps_y = eps_K + (eps_1 - eps_K) * r_y
* convex:  eps_y = eps_K + (eps_1 - eps_K) * r_y ** power   (power > 1 is convex)

eps_1 = ``head_smoothing`` (the largest class is smoothed most, over-confidence lives in
the head) and eps_K = ``tail_smoothing``. When every class has the same count (n_1 = n_K)
r_y is taken as 1, so every class gets ``head_smoothing``.

Decision (the paper's Eq. for the target distribution): q_{y} = 1 - eps_y on the label and
eps_y / (C - 1) on each of the other C - 1 classes, so eps_y is exactly the mass moved off
the label. (The uniform-mixture form eps/C on every class, as in ``ce`` label smoothing,
would leave 1 - eps_y + eps_y / C on the label.) The loss is the cross-entropy
-sum_c q_c log p_c, reduced with the class-weighted mean when re-weighting is on.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from pydantic import Field

from ..registry import LOSSES
from .base import BaseLossTerm, LossInputs, LossTermConfig, as_compute, check_counts, weighted_mean

SHAPES = ("concave", "linear", "convex")


def label_aware_smoothing(
    class_counts: Sequence[int],
    head_smoothing: float = 0.4,
    tail_smoothing: float = 0.1,
    shape: str = "concave",
    power: float = 2.0,
) -> torch.Tensor:
    """[C] float32 per-class smoothing eps_c (see the module docstring)."""
    counts = torch.tensor(check_counts(class_counts), dtype=torch.float64)
    n_head, n_tail = counts.max(), counts.min()
    if n_head == n_tail:
        r = torch.ones_like(counts)
    else:
        r = (counts - n_tail) / (n_head - n_tail)
    if shape == "concave":
        f = torch.sin(math.pi / 2 * r)
    elif shape == "linear":
        f = r
    elif shape == "convex":
        f = r.pow(power)
    else:
        raise ValueError(f"unknown label-aware smoothing shape {shape!r}; use one of {', '.join(SHAPES)}")
    return (tail_smoothing + (head_smoothing - tail_smoothing) * f).to(torch.float32)


class LabelAwareSmoothingLoss(LossTermConfig):
    name: Literal["label_aware_smoothing"]
    head_smoothing: float = Field(0.4, ge=0, lt=1)
    tail_smoothing: float = Field(0.1, ge=0, lt=1)
    shape: Literal["concave", "linear", "convex"] = "concave"
    power: float = Field(2.0, gt=0)


@LOSSES.register("label_aware_smoothing", config=LabelAwareSmoothingLoss)
class LabelAwareSmoothingTerm(BaseLossTerm):
    """l_i = (1 - eps_{y_i}) (-log p_{i,y_i}) + eps_{y_i} / (C - 1) * sum_{c != y_i} (-log p_{i,c})."""

    name = "label_aware_smoothing"
    takes_sample_weight = True

    def __init__(self, cfg: LabelAwareSmoothingLoss, class_counts: tuple[int, ...]):
        super().__init__()
        self.shape = cfg.shape
        self.register_buffer(
            "smoothing",
            label_aware_smoothing(
                class_counts, cfg.head_smoothing, cfg.tail_smoothing, cfg.shape, cfg.power
            ),
        )

    def forward(self, inputs: LossInputs, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = as_compute(inputs.logits)
        targets = inputs.targets
        num_classes = logits.shape[1]
        neg_logp = -torch.log_softmax(logits, dim=1)
        nll = neg_logp.gather(1, targets[:, None]).squeeze(1)
        others = neg_logp.sum(dim=1) - nll
        eps = self.smoothing.to(device=logits.device, dtype=logits.dtype)[targets]
        loss = (1 - eps) * nll + eps / (num_classes - 1) * others
        return weighted_mean(loss, targets, class_weight, inputs.sample_weight)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
