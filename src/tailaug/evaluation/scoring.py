"""Scoring a model's logits on a split with the run's evaluation settings."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..losses import adjust_logits
from .metrics import evaluate_logits
from .plots import plot_results


def evaluated_logits(logits: torch.Tensor, class_counts, cfg: Config) -> torch.Tensor:
    """The logits every reported number and figure comes from: the model's, with post-hoc
    logit adjustment (``eval.logit_adjust_tau``) when configured."""
    if cfg.eval.logit_adjust_tau > 0:
        return adjust_logits(logits, class_counts, cfg.eval.logit_adjust_tau)
    return logits


def score(logits: torch.Tensor, labels, class_counts, cfg: Config, *, plots_dir: Path | None = None,
          name: str = "") -> dict:
    """Metrics of logits on a split; with ``plots_dir``, also the per-class and reliability
    plots named ``name``, drawn from the same (adjusted) logits as the metrics."""
    logits = evaluated_logits(logits, class_counts, cfg)
    shots = cfg.data.shots
    results = evaluate_logits(logits, torch.as_tensor(labels), class_counts, many=shots.many,
                              few=shots.few, ece_bins=cfg.eval.ece_bins)
    if plots_dir is not None:
        plot_results(logits, labels, class_counts, results, plots_dir, name, many=shots.many,
                     few=shots.few, bins=cfg.eval.ece_bins)
    return results


def eval_settings(cfg: Config) -> dict:
    """The settings a score depends on besides the model: recorded beside every result."""
    return {"shots": cfg.data.shots.model_dump(), **cfg.eval.model_dump(mode="json")}
