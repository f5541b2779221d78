"""NCM, nearest class mean: logits are the cosine similarities between the L2-normalised
feature and the class means of the L2-normalised training features."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..data.classes import class_means
from ..registry import CLASSIFIERS
from ..stages.classifier import Stage3Inputs

log = logging.getLogger(__name__)


class NCMClassifier(nn.Module):
    """Cosine similarity to the class means of L2-normalised training features."""

    EMPTY_LOGIT = -2.0  # below every cosine: a class without training samples is never predicted

    def __init__(self, means: torch.Tensor, present: torch.Tensor):
        super().__init__()
        self.register_buffer("means", F.normalize(means.float(), dim=1))
        self.register_buffer("present", present.bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(x.to(self.means.dtype), dim=1) @ self.means.T
        return torch.where(self.present, cos, torch.full_like(cos, self.EMPTY_LOGIT))

    def head_state(self) -> dict:  # its form for stages.stored_head: cosines to the means, scale 1
        return {"weight": self.means, "cosine_scale": torch.tensor(1.0), "present": self.present,
                "empty_logit": torch.tensor(self.EMPTY_LOGIT)}


@CLASSIFIERS.register("ncm", label="NCM")
def fit_ncm(inp: Stage3Inputs) -> nn.Module:
    inp.ignore_augmenter()
    x, y, num_classes = inp.x, inp.y, inp.num_classes
    present = torch.bincount(y, minlength=num_classes) > 0
    if not bool(present.all()):
        log.warning("ncm: class(es) %s have no training sample and are never predicted",
                    (~present).nonzero().flatten().tolist())
    return NCMClassifier(class_means(x, y, num_classes, normalize=True), present).to(x.device)
