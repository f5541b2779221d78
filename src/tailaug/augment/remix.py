"""Remix (Chou et al. 2020, "Remix: Rebalanced Mixup"): mixup's images, labels moved to the rarer class.

The images mix as in mixup (:func:`tailaug.augment.mixup.mixup`): x = lam x_i + (1 - lam) x_j
with j = perm(i) and one lam ~ Beta(alpha, alpha) per batch. The weight of label y_i in the
loss of sample i is, with n the training class counts,

    lam_y = 0     if n_{y_i} / n_{y_j} >= kappa and lam < tau
    lam_y = 1     if n_{y_i} / n_{y_j} <= 1 / kappa and 1 - lam < tau
    lam_y = lam   otherwise,

and the loss is lam_y L(y_i) + (1 - lam_y) L(y_j) per sample (:func:`mixup.mixed_loss` with
``LossInputs.sample_weight``). So when the minority image j still makes up more than
1 - tau of the pixels, the whole label goes to its class. Published values: kappa = 3,
tau = 0.5. With lam_y = lam for every sample this is mixup.

Decisions: n_i / n_j <= 1 / kappa is evaluated as n_j / n_i >= kappa, so both boundaries are
the same exact comparison (kappa > 1, so at most one branch holds); the class counts are
those of the training split (``LTData.class_counts``); the draws of lam and perm are
mixup's, so mixup and Remix of one seed mix the same images.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..data.classes import check_counts


class Remix(nn.Module):
    """``remix(lam, y_a, y_b)`` -> the [N] float64 weights lam_y of labels ``y_a`` (those of
    ``y_b`` are 1 - lam_y), on the device of the labels once the module is moved there."""

    def __init__(self, class_counts: Sequence[int], kappa: float = 3.0, tau: float = 0.5):
        super().__init__()
        if not kappa > 1:
            raise ValueError(f"Remix needs kappa > 1, got {kappa}")
        if not 0 <= tau <= 1:
            raise ValueError(f"Remix needs tau in [0, 1], got {tau}")
        self.kappa, self.tau = float(kappa), float(tau)
        counts = torch.tensor(check_counts(class_counts), dtype=torch.float64)
        self.register_buffer("counts", counts, persistent=False)

    def forward(self, lam: float, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        n_a, n_b = self.counts[y_a], self.counts[y_b]
        weights = torch.full_like(n_a, lam)
        if lam < self.tau:  # a Python float: no host sync
            weights = torch.where(n_a / n_b >= self.kappa, torch.zeros_like(weights), weights)
        if 1 - lam < self.tau:
            weights = torch.where(n_b / n_a >= self.kappa, torch.ones_like(weights), weights)
        return weights

    def extra_repr(self) -> str:
        return f"kappa={self.kappa}, tau={self.tau}"
