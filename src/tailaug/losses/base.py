"""Shared pieces of the loss terms: the input bundle, the term base class, helpers.

Conventions every term follows:

* Terms compute in float32 (float64 inputs stay float64, so ``gradcheck`` works); half or
  bfloat16 inputs from autocast are upcast first.
* A term that uses per-class weights reduces with the *weighted mean*
  ``sum_i w[y_i] * l_i / sum_i w[y_i]`` (what ``F.cross_entropy(weight=w)`` does); with no
  weights it is the plain mean over the batch.
* Per-sample weights ``s`` (``LossInputs.sample_weight``, Remix's label weights) scale each
  sample's term inside that reduction without entering its normaliser:
  ``sum_i s_i w[y_i] l_i / sum_i w[y_i]``, or ``sum_i s_i l_i / N`` without class weights
  (:func:`weighted_mean`). So for a mixed batch, the loss of labels ``a`` with weights ``s``
  plus the loss of labels ``b = a[perm]`` with weights ``1 - s`` is the per-sample mixture
  ``sum_i [s_i w[a_i] l_i(a_i) + (1 - s_i) w[b_i] l_i(b_i)] / sum_i w[a_i]`` (a permutation
  leaves ``sum_i w[y_i]`` unchanged), and ``s = lam`` everywhere is mixup's
  ``lam L(a) + (1 - lam) L(b)``. A term that honours ``s`` says so with
  ``takes_sample_weight = True``; the others are refused a weighted batch.
* Log-probabilities come from ``log_softmax`` (a logsumexp), never ``log(softmax)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from pydantic import Field
from torch import nn

from ..data.classes import check_counts  # noqa: F401 (the terms validate counts with it)
from ..errors import ConfigError
from ..registry import Section


class LossTermConfig(Section):
    """The options every term of ``train.loss`` has: its weight in the sum."""

    weight: float = Field(1.0, gt=0)


@dataclass
class LossInputs:
    """Everything a loss term may look at for one batch.

    ``logits`` [N, C] is the head output and ``targets`` [N] the int64 labels. ``features``
    [N, d] are the pooled features (SupCon); with two views of each image, rows [0:N/2] and
    [N/2:N] are the two views of the same images and ``targets`` has all N labels.
    ``cosine`` [N, C] holds the cosine similarities in [-1, 1] when the head is cosine
    (NormedLinear), else None. ``sample_weight`` [N] scales each sample's loss inside the
    batch reduction (see the module doc; Remix), None: every sample counts once.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor | None = None
    cosine: torch.Tensor | None = None
    sample_weight: torch.Tensor | None = None


class BaseLossTerm(nn.Module):
    """One configured loss term. ``forward(inputs, class_weight)`` returns a scalar.

    ``class_weight`` is the current [C] per-class weight vector, or None when re-weighting
    is off (scheme ``none`` or before ``reweight.start_epoch``). Terms with
    ``uses_class_weights = False`` ignore it. ``takes_sample_weight = True``: the term reduces
    with ``inputs.sample_weight`` as :func:`weighted_mean` does (False, the default: the loss
    refuses a batch with sample weights rather than silently ignore them).
    """

    name: str = ""
    uses_class_weights: bool = True
    takes_sample_weight: bool = False
    needs_cosine: bool = False  # raises without inputs.cosine
    uses_cosine: bool = False  # reads inputs.cosine when given (needs_cosine implies it)
    needs_two_views: bool = False

    def forward(self, inputs: LossInputs, class_weight: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- helpers


def require_cosine(inputs: LossInputs, name: str) -> torch.Tensor:
    """``inputs.cosine`` in the compute dtype, or a ConfigError telling the user to use a cosine head."""
    if inputs.cosine is None:
        raise ConfigError(
            f"{name} needs a cosine classifier: set model.head: cosine (the {name} margin and scale act "
            "on the cosine between feature and class weight, which a linear head does not give)"
        )
    return as_compute(inputs.cosine)


def as_compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype losses compute in: float64 stays, everything else float32."""
    return t if t.dtype == torch.float64 else t.float()


def log_prior(class_counts: Sequence[int]) -> torch.Tensor:
    """log(n_c / N) as a float64 [C] tensor."""
    counts = torch.tensor(class_counts, dtype=torch.float64)
    return torch.log(counts / counts.sum())


def per_sample_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[i, y_i] for every row, [N]."""
    logp = torch.log_softmax(logits, dim=1)
    return -logp.gather(1, targets[:, None]).squeeze(1)


def weighted_mean(
    per_sample: torch.Tensor,
    targets: torch.Tensor,
    class_weight: torch.Tensor | None,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i w[y_i] l_i / sum_i w[y_i]``, or the plain mean when ``class_weight`` is None.

    With ``sample_weight`` s [N]: ``sum_i s_i w[y_i] l_i / sum_i w[y_i]`` (``sum_i s_i l_i / N``
    without class weights); s scales the samples, the normaliser stays that of the batch.
    """
    if per_sample.numel() == 0:
        return per_sample.sum()
    if sample_weight is not None:
        s = sample_weight.to(device=per_sample.device, dtype=per_sample.dtype)
        if class_weight is None:
            return (s * per_sample).sum() / per_sample.numel()
        w = class_weight.to(device=per_sample.device, dtype=per_sample.dtype)[targets]
        return (s * w * per_sample).sum() / w.sum()
    if class_weight is None:
        return per_sample.mean()
    w = class_weight.to(device=per_sample.device, dtype=per_sample.dtype)[targets]
    return (w * per_sample).sum() / w.sum()


def replace_target_column(
    values: torch.Tensor, targets: torch.Tensor, target_values: torch.Tensor
) -> torch.Tensor:
    """``values`` [N, C] with entry (i, y_i) replaced by ``target_values[i]`` (differentiably)."""
    is_target = torch.nn.functional.one_hot(targets, values.shape[1]).bool()
    return torch.where(is_target, target_values[:, None].to(values.dtype), values)
