"""Classifier heads: linear and cosine (NormedLinear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class LinearHead(nn.Linear):
    """A plain linear classifier; ``cosine`` is None for it."""

    def cosine(self, features: torch.Tensor) -> None:
        return None


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


def build_head(kind: str, in_features: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    raise ValueError(f"unknown head {kind!r}; use linear or cosine")
