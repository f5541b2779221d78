"""The paper's stage-3 baselines: Gaussian noise on features and feature dropout.

Both act on the target rows only (``targets="tail"``: samples of non-head classes;
``"all"``: every sample) and replace those rows; fresh randomness from ``generator`` on
every call.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from ..registry import AUGMENTERS
from .base import AugmenterOptions, FeatureAugmenter


class NoiseAugmenter(AugmenterOptions):
    name: Literal["noise"]
    std: float = Field(1.0, gt=0)
    targets: Literal["tail", "all"] = "tail"

    def label(self) -> str:
        return f"noise (std {self.std})"


class DropoutAugmenter(AugmenterOptions):
    name: Literal["dropout"]
    p: float = Field(0.1, gt=0, lt=1)
    targets: Literal["tail", "all"] = "tail"

    def label(self) -> str:
        return f"dropout (p {self.p})"


@AUGMENTERS.register("noise", config=NoiseAugmenter)
class GaussianNoiseAugmenter(FeatureAugmenter):
    """a -> a + std * eps, eps ~ N(0, I)."""

    name = "noise"

    def __init__(self, std: float = 1.0, targets: str = "tail"):
        super().__init__(targets)
        if not std > 0:
            raise ConfigError(f"noise std must be > 0, got {std}")
        self.std = float(std)

    def forward(self, features, labels, *, generator=None):
        rows = self.target_rows(labels)
        eps = torch.randn(features.shape, generator=generator, device=features.device, dtype=features.dtype)
        return torch.where(rows[:, None], features + self.std * eps, features), labels

    def extra_repr(self) -> str:
        return f"std={self.std}, targets={self.targets!r}"


@AUGMENTERS.register("dropout", config=DropoutAugmenter)
class FeatureDropoutAugmenter(FeatureAugmenter):
    """Inverted dropout: each coordinate zeroed with probability p, the rest scaled by 1/(1-p)."""

    name = "dropout"

    def __init__(self, p: float = 0.1, targets: str = "tail"):
        super().__init__(targets)
        if not 0 < p < 1:
            raise ConfigError(f"dropout p must lie in (0, 1), got {p}")
        self.p = float(p)

    def forward(self, features, labels, *, generator=None):
        rows = self.target_rows(labels)
        keep = torch.rand(features.shape, generator=generator, device=features.device) >= self.p
        dropped = features * keep.to(features.dtype) / (1.0 - self.p)
        return torch.where(rows[:, None], dropped, features), labels

    def extra_repr(self) -> str:
        return f"p={self.p}, targets={self.targets!r}"
