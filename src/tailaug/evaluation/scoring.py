"""Scoring a model's logits on a split with the run's evaluation settings."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..losses import adjust_logits
from .metrics import evaluate_logits
from .plots import plot_results


def score(logits: torch.Tensor, labels, class_counts, cfg: Config) -> dict:
    """Metrics of logits on a split (with post-hoc logit adjustment when configured)."""
    if cfg.eval.logit_adjust_tau > 0:
        logits = adjust_logits(logits, class_counts, cfg.eval.logit_adjust_tau)
    shots = cfg.data.shots
    return evaluate_logits(logits, torch.as_tensor(labels), class_counts, many=shots.many,
                           few=shots.few, ece_bins=cfg.eval.ece_bins)


def score_and_plot(logits: torch.Tensor, labels, class_counts, cfg: Config, plots_dir: Path, label: str) -> dict:
    """:func:`score` plus the per-class accuracy plot and reliability diagram in ``plots_dir``."""
    results = score(logits, labels, class_counts, cfg)
    shots = cfg.data.shots
    plot_results(logits, labels, class_counts, results, plots_dir, label,
                 many=shots.many, few=shots.few, bins=cfg.eval.ece_bins)
    return results


def eval_settings(cfg: Config) -> dict:
    """The settings a score depends on besides the model: recorded beside every result."""
    return {"shots": cfg.data.shots.model_dump(), **cfg.eval.model_dump(mode="json")}
