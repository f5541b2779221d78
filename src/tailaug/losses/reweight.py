"""Per-class loss weights (class-balanced re-weighting, and DRW when deferred).

``effective_number`` (Cui et al. 2019): w_c = (1 - beta) / (1 - beta^{n_c}), the inverse of
the effective number of samples E_n = (1 - beta^n) / (1 - beta).
``inverse_frequency``: w_c proportional to 1 / n_c.
``none``: all ones (the same as no weights).

Both schemes are normalised so that sum_c w_c = C, i.e. the mean weight is 1. Weights are
computed in float64 and returned as float32.

Which terms use them: ce, focal, ldam, label_aware_smoothing, arcface, cosface and
sphereface (weighted mean over the batch). balanced_softmax and logit_adjust ignore them
(they already correct for the label prior; weighting on top would count it twice), and
supcon ignores them (it has no per-sample class term to weight).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from .base import check_counts

SCHEMES = ("none", "effective_number", "inverse_frequency")


def class_weights(scheme: str, class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """[C] float32 per-class weights for ``scheme``, normalised to sum to C.

    ``beta`` is only used by ``effective_number`` and must lie in [0, 1); beta = 0 gives all
    ones, beta -> 1 approaches ``inverse_frequency``.
    """
    counts = torch.tensor(check_counts(class_counts), dtype=torch.float64)
    num_classes = counts.numel()
    if scheme == "none":
        return torch.ones(num_classes, dtype=torch.float32)
    if scheme == "effective_number":
        if not 0.0 <= beta < 1.0:
            raise ConfigError(
                f"reweight.beta = {beta} is outside [0, 1); effective-number weights use "
                "beta = 0.999 or 0.9999 (beta = 1 would divide by zero)"
            )
        raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    elif scheme == "inverse_frequency":
        raw = 1.0 / counts
    else:
        raise ConfigError(f"unknown reweight.scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    return (raw * (num_classes / raw.sum())).to(torch.float32)
