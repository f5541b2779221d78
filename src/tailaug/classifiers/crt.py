"""cRT: a re-initialised linear classifier trained on the (augmented) cached features."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import CLASSIFIERS
from ..stages.classifier import TRAINED_OPTIONS, Stage3Inputs, fit_trained


class LinearClassifier(nn.Linear):
    """The cRT classifier: a plain linear layer."""

    def head_state(self) -> dict:  # its form for stages.stored_head
        return {"weight": self.weight, "bias": self.bias}


def init_linear(layer: nn.Linear, seed: int) -> None:
    """PyTorch's default nn.Linear initialisation, drawn from a private seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)


@CLASSIFIERS.register("crt", label="cRT", reads=TRAINED_OPTIONS)
def fit_crt(inp: Stage3Inputs) -> nn.Module:
    model = LinearClassifier(inp.dim, inp.num_classes)
    init_linear(model, inp.seed)
    return fit_trained(model, inp)
