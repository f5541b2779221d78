"""Scoring a model's logits on a split with the run's evaluation settings."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..losses import adjust_logits
from ..data.classes import SHOT_GROUPS
from ..errors import ConfigError
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


LOWER_IS_BETTER = frozenset({"nll"})  # the validation metrics a smaller value of wins


def validation_score(logits: torch.Tensor, labels, class_counts, metric: str, *, many: int, few: int) -> float:
    """The number ``retrain.select`` ranks a classifier by, from its own logits on the
    validation split (no post-hoc adjustment): ``top1``, accuracy over the images (%);
    ``balanced``, the mean of the per-class accuracies (%); ``shot_mean``, the mean of the
    many-, medium- and few-shot accuracies (%; groups by the training counts ``class_counts``
    and the thresholds ``many``/``few``; a group without classes is left out); ``nll``, the
    mean negative log-likelihood of the true labels (nats; smaller wins, see
    ``LOWER_IS_BETTER``). NLL moves with every image's probability, not only with the
    images that change side, so it separates close grid points that top1 scores alike."""
    results = evaluate_logits(logits, torch.as_tensor(labels), class_counts, many=many, few=few)
    if metric in ("top1", "nll"):
        return results[metric]
    if metric == "balanced":
        values = [a for a in results["per_class"] if a is not None]
    elif metric == "shot_mean":
        values = [results[g] for g in SHOT_GROUPS if results[g] is not None]
    else:
        raise ConfigError(f"unknown retrain.select.metric {metric!r}; use top1, balanced, shot_mean or nll")
    return float(sum(values) / len(values))
