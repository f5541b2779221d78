"""LWS, learnable weight scaling: the stage-1 head frozen, one learnt scale per class.

logits_c = f_c * z_c with z the stage-1 head's own logits: w_c . a + b_c for a linear head,
s * cos(w_c, a) for a cosine head (``init_cosine_scale`` = s); f_c starts at 1 and is
trained like cRT.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.heads import head_logits
from ..registry import CLASSIFIERS
from ..stages.classifier import TRAINED_OPTIONS, Stage3Inputs, fit_trained


class LWSClassifier(nn.Module):
    """Frozen stage-1 classifier (linear, or cosine with ``cosine_scale``) with a learnt per-class scale f_c."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, cosine_scale: float | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.cosine_scale = None if cosine_scale is None else float(cosine_scale)
        self.scales = nn.Parameter(torch.ones(weight.shape[0]))

    @property
    def effective_weight(self) -> torch.Tensor:
        return self.scales.detach()[:, None] * self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_logits(x, self.weight, self.bias, self.cosine_scale) * self.scales

    def extra_repr(self) -> str:
        return "linear" if self.cosine_scale is None else f"cosine_scale={self.cosine_scale}"

    def head_state(self) -> dict:  # its form for stages.stored_head
        scale = None if self.cosine_scale is None else torch.tensor(self.cosine_scale)
        return {"weight": self.weight, "bias": self.bias, "cosine_scale": scale, "class_scale": self.scales}


@CLASSIFIERS.register("lws", label="LWS", reads=TRAINED_OPTIONS)
def fit_lws(inp: Stage3Inputs) -> nn.Module:
    return fit_trained(LWSClassifier(*inp.stage1(), inp.init_cosine_scale), inp)
