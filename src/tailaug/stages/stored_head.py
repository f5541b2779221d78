"""A stage-3 classifier stored beside its test logits and restored without its training code.

Every decoupled classifier is, at prediction time, one form::

    logits = class_scale * head_logits(features, weight, bias, cosine_scale)

(a linear map, or ``cosine_scale`` times the cosines to the rows of ``weight``), with the
classes that had no training sample (``present`` false) at ``empty_logit``. A classifier
module says its form by ``head_state()`` (cRT: weight and bias; LWS: the stage-1 head and
its class scales; tau-norm: the rescaled weight; NCM: the class means at cosine scale 1);
:class:`StoredHead` computes it from those tensors, which stage 3 saves under ``head.*`` in
the safetensors file of its test logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.heads import head_logits

PREFIX = "head."
ENTRIES = ("weight", "bias", "cosine_scale", "class_scale", "present", "empty_logit")


class StoredHead(nn.Module):
    """features [N, d] -> logits [N, C] of a stored stage-3 classifier."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, cosine_scale: float | None = None,
                 class_scale: torch.Tensor | None = None, present: torch.Tensor | None = None,
                 empty_logit: float = -2.0):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("class_scale", None if class_scale is None else class_scale.float())
        self.register_buffer("present", None if present is None else present.bool())
        self.cosine_scale = None if cosine_scale is None else float(cosine_scale)
        self.empty_logit = float(empty_logit)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = head_logits(features.float(), self.weight, self.bias, self.cosine_scale)
        if self.class_scale is not None:
            logits = logits * self.class_scale
        if self.present is not None:
            logits = torch.where(self.present, logits, torch.full_like(logits, self.empty_logit))
        return logits


def head_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The ``head.*`` tensors of a trained stage-3 classifier (its ``head_state()``), on the CPU;
    none for a classifier without ``head_state`` (its test logits are still stored and scored,
    and :func:`load_head` says that it cannot predict)."""
    if not hasattr(module, "head_state"):
        return {}
    state = module.head_state()
    unknown = set(state) - set(ENTRIES)
    if "weight" not in state or unknown:
        raise TypeError(f"{type(module).__name__}.head_state() must give weight and only {ENTRIES}")
    return {PREFIX + k: torch.as_tensor(v).detach().float().cpu().contiguous() if k != "present"
            else torch.as_tensor(v).detach().cpu().to(torch.uint8).contiguous()
            for k, v in state.items() if v is not None}


def load_head(tensors: dict[str, torch.Tensor], path: Path) -> StoredHead:
    """The classifier stored in ``tensors`` (read from ``path``); a CheckpointError for a file
    stage 3 wrote before classifiers were stored."""
    if PREFIX + "weight" not in tensors:
        raise CheckpointError(
            f"{path} holds the test logits of this stage-3 classifier but not its weights (it was written by an "
            f"older tailaug, or its classifier has no head_state()); delete it and "
            f"{Path(path).with_suffix('.json').name}, then rerun 'tailaug run' with the run's config: stage 3 "
            "trains again in seconds from the cached features")
    get = lambda k: tensors.get(PREFIX + k)  # noqa: E731
    scale, empty = get("cosine_scale"), get("empty_logit")
    return StoredHead(get("weight"), get("bias"), None if scale is None else float(scale),
                      get("class_scale"), get("present"), -2.0 if empty is None else float(empty)).eval()
