"""tau-norm: the stage-1 weights rescaled to w_c / ||w_c||^tau, no training.

Decision (Kang et al.'s implementation): the stage-1 bias is dropped. tau = ``retrain.tau``,
or when None the best of 0, 0.1, ..., 2.0 by accuracy on the validation split (ties: the
smaller tau); without one, tau = 1 with a warning. Never the test set. A cosine stage-1 head
is an error: it normalises its weights, so every tau gives back the stage-1 model.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import CLASSIFIERS
from ..stages.classifier import Stage3Inputs, accuracy

log = logging.getLogger(__name__)

TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))
COSINE_HEAD = (
    "retrain.method = tau_norm rescales the norms of the stage-1 weights, but a cosine head "
    "(model.head: cosine) normalises them, so every tau gives back the stage-1 model; use "
    "retrain.method lws or crt, or train stage 1 with model.head: linear"
)


class TauNormClassifier(nn.Module):
    """Linear classifier with weights w_c / ||w_c||^tau (and an optional bias, None by default)."""

    def __init__(self, weight: torch.Tensor, tau: float, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().float()
        norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.tau = float(tau)
        self.register_buffer("weight", weight / norms.pow(self.tau))
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"

    def head_state(self) -> dict:  # its form for stages.stored_head
        return {"weight": self.weight, "bias": self.bias}


def fit_tau_norm(weight: torch.Tensor, tau: float | None, val_xy) -> TauNormClassifier:
    """tau-norm with ``tau``, or chosen on ``val_xy``; ``choices`` says which and why."""
    scores = None
    if tau is not None:
        source = "retrain.tau"
    elif val_xy is None:
        log.warning(
            "tau_norm: retrain.tau is not set and there is no validation split, so tau = 1; set "
            "retrain.tau or data.val_per_class > 0 to choose it on validation data (never on the test set)"
        )
        tau, source = 1.0, "default (no validation split)"
    else:
        scores = {t: accuracy(TauNormClassifier(weight, t), *val_xy) for t in TAU_GRID}
        tau, source = max(TAU_GRID, key=lambda t: (scores[t], -t)), "validation split"
        log.info("tau_norm: tau = %.1f chosen on the validation split (accuracy %.4f)", tau, scores[tau])
    model = TauNormClassifier(weight, tau)
    model.tau_scores = scores
    model.choices = {"tau": tau, "tau_from": source,
                     "tau_scores": None if scores is None else {f"{t:.1f}": s for t, s in scores.items()}}
    return model


def _needs_a_linear_head(cfg) -> None:
    if cfg.model.head == "cosine":
        raise ValueError(COSINE_HEAD)


@CLASSIFIERS.register("tau_norm", label="tau-norm", check=_needs_a_linear_head, reads=("tau",))
def fit(inp: Stage3Inputs) -> nn.Module:
    if inp.init_cosine_scale is not None:
        raise ConfigError(COSINE_HEAD)
    inp.ignore_augmenter()
    return fit_tau_norm(inp.stage1()[0], inp.cfg.tau, inp.val_xy)
