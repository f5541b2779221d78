"""Angular-margin losses on a cosine classifier: ArcFace, CosFace, SphereFace.

Each replaces the target-class cosine cos(theta_y) by a smaller value psi(theta_y), leaves
the other classes at cos(theta_c), multiplies everything by ``scale`` and applies
cross-entropy (weighted mean with class weights). They read ``inputs.cosine`` (the
unscaled cosines of a cosine / NormedLinear head) and ignore ``inputs.logits``.

* CosFace (Wang et al. 2018, additive margin): psi = cos(theta) - m.
* ArcFace (Deng et al. 2019, additive angular margin): psi = cos(theta + m) while
  theta + m <= pi. Beyond that cos(theta + m) would rise again (a sample moving away from
  its class would be rewarded), so for theta > pi - m we use the continuous, decreasing
  continuation psi = cos(theta) - 1 + cos(m) (equal to -1 at theta = pi - m; the same
  idea as the insightface "cos(theta) - m sin(m)" fallback, made continuous).
* SphereFace (Liu et al. 2017, multiplicative angular margin, integer m): the monotonic
  extension psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi / m, (k+1) pi / m],
  k = 0..m-1, which is continuous and decreasing on [0, pi]. No lambda annealing with
  the plain softmax and no feature-norm scaling: the logit scale is ``scale``.

theta = acos(cos) is computed on cosines clamped to [-1 + 1e-6, 1 - 1e-6], so the
gradient of acos stays finite.
"""

from __future__ import annotations

import math

import torch

from typing import Literal

from pydantic import Field

from ..registry import LOSSES
from .base import (
    BaseLossTerm,
    LossInputs,
    LossTermConfig,
    per_sample_nll,
    replace_target_column,
    require_cosine,
    weighted_mean,
)


class ArcFaceLoss(LossTermConfig):
    name: Literal["arcface"]
    margin: float = Field(0.5, ge=0)
    scale: float = Field(30.0, gt=0)


class CosFaceLoss(LossTermConfig):
    name: Literal["cosface"]
    margin: float = Field(0.35, ge=0)
    scale: float = Field(30.0, gt=0)


class SphereFaceLoss(LossTermConfig):
    name: Literal["sphereface"]
    margin: int = Field(4, ge=1)
    scale: float = Field(30.0, gt=0)

_CLAMP = 1e-6


def safe_acos(cosine: torch.Tensor) -> torch.Tensor:
    """acos of ``cosine`` clamped into [-1 + 1e-6, 1 - 1e-6] (finite gradient)."""
    return torch.acos(cosine.clamp(-1 + _CLAMP, 1 - _CLAMP))


def arcface_psi(theta: torch.Tensor, margin: float) -> torch.Tensor:
    """cos(theta + m) for theta <= pi - m, else cos(theta) - 1 + cos(m) (see module doc)."""
    inside = torch.cos(theta + margin)
    outside = torch.cos(theta) - 1.0 + math.cos(margin)
    return torch.where(theta <= math.pi - margin, inside, outside)


def sphereface_psi(theta: torch.Tensor, margin: int) -> torch.Tensor:
    """(-1)^k cos(m theta) - 2k with k = floor(m theta / pi), k <= m - 1; theta in [0, pi]."""
    k = torch.floor(theta.detach() * margin / math.pi).clamp(0, margin - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * torch.cos(margin * theta) - 2.0 * k


class _MarginTerm(BaseLossTerm):
    needs_cosine = True
    uses_cosine = True
    takes_sample_weight = True

    def __init__(self, margin: float, scale: float):
        super().__init__()
        self.margin = margin
        self.scale = float(scale)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs: LossInputs, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        cosine = require_cosine(inputs, self.name)
        targets = inputs.targets
        cos_target = cosine.gather(1, targets[:, None]).squeeze(1)
        margined = replace_target_column(cosine, targets, self.target_logit(cos_target))
        loss = per_sample_nll(self.scale * margined, targets)
        return weighted_mean(loss, targets, class_weight, inputs.sample_weight)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}"


@LOSSES.register("arcface", config=ArcFaceLoss)
class ArcFaceTerm(_MarginTerm):
    """ArcFace: target logit s * cos(theta_y + m) (with the continuation past pi - m)."""

    name = "arcface"

    def __init__(self, cfg: ArcFaceLoss, class_counts: tuple[int, ...]):
        super().__init__(float(cfg.margin), cfg.scale)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return arcface_psi(safe_acos(cos_target), self.margin)


@LOSSES.register("cosface", config=CosFaceLoss)
class CosFaceTerm(_MarginTerm):
    """CosFace: target logit s * (cos(theta_y) - m)."""

    name = "cosface"

    def __init__(self, cfg: CosFaceLoss, class_counts: tuple[int, ...]):
        super().__init__(float(cfg.margin), cfg.scale)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin


@LOSSES.register("sphereface", config=SphereFaceLoss)
class SphereFaceTerm(_MarginTerm):
    """SphereFace: target logit s * psi(theta_y), psi the monotonic extension of cos(m theta)."""

    name = "sphereface"

    def __init__(self, cfg: SphereFaceLoss, class_counts: tuple[int, ...]):
        super().__init__(int(cfg.margin), cfg.scale)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return sphereface_psi(safe_acos(cos_target), self.margin)
