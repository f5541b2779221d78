"""Classifier heads: linear and cosine (NormedLinear), and the linear form of any head."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def cosine_matrix(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, C] cosine similarities between the rows of ``features`` [N, d] and ``weight`` [C, d]."""
    return F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t()


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                cosine_scale: float | None = None) -> torch.Tensor:
    """The logits of a head given by its parameters, as the head itself computes them.

    ``cosine_scale`` None: a linear head, ``w_c . a + b_c``. Otherwise a cosine head,
    ``cosine_scale * cos(w_c, a)``; it has no bias, and the norms of its weights play no part.
    """
    if cosine_scale is None:
        return F.linear(features, weight, bias)
    if bias is not None:
        raise ValueError("a cosine head has no bias; pass bias=None with cosine_scale")
    return cosine_scale * cosine_matrix(features, weight)


class LinearForm(NamedTuple):
    """A head as a linear map: ``logits = weight @ phi(a) + bias`` with ``phi(a) = a / |a|``
    when ``normalised`` (cosine heads) and ``a`` otherwise. ``weight`` [C, d] is differentiable
    in the head's parameters (a cosine head's scale and normalised weights, LWS's class
    scales are folded into it); ``cosine_scale`` is s of a cosine head (logits = s * cosines)."""

    weight: torch.Tensor
    normalised: bool
    cosine_scale: float | None


def linear_form(head: nn.Module) -> LinearForm:
    """The :class:`LinearForm` of a head, from its ``head_state()`` (the form every trained
    classifier states: ``class_scale * head_logits(a, weight, bias, cosine_scale)``, see
    ``tailaug.stages.stored_head``) or, for a bare ``nn.Linear``, its weight."""
    if hasattr(head, "head_state"):
        state = head.head_state()
    elif isinstance(head, nn.Linear):
        state = {"weight": head.weight}
    else:
        raise ConfigError(f"the classifier {type(head).__name__} does not state its linear form (no head_state()), "
                          "which an implicit feature augmenter needs; train a linear or cosine classifier (crt, lws)")
    weight, scale, class_scale = state["weight"], state.get("cosine_scale"), state.get("class_scale")
    scale = None if scale is None else float(scale)  # a Python number or a CPU scalar: no device sync
    if scale is not None:
        weight = scale * F.normalize(weight, dim=1)
    if class_scale is not None:
        weight = class_scale[:, None] * weight
    return LinearForm(weight, scale is not None, scale)


class LinearHead(nn.Linear):
    """A plain linear classifier; ``cosine`` is None for it."""

    def cosine(self, features: torch.Tensor) -> None:
        return None

    def head_state(self) -> dict:  # its form (as the stage-3 classifiers state theirs)
        return {"weight": self.weight, "bias": self.bias}


class CosineHead(nn.Module):
    """logits = scale * cos(feature, w_c); ``cosine`` gives the unscaled cosines."""

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.scale = scale

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_matrix(features, self.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.cosine(features)

    def head_state(self) -> dict:  # its form (as the stage-3 classifiers state theirs)
        return {"weight": self.weight, "bias": None, "cosine_scale": self.scale}


def build_head(kind: str, in_features: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    raise ValueError(f"unknown head {kind!r}; use linear or cosine")
