"""Classifier heads: linear and cosine (NormedLinear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.cosine(features)


def build_head(kind: str, in_features: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    raise ValueError(f"unknown head {kind!r}; use linear or cosine")
