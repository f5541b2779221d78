"""``retrain.select``: stage-3 options chosen on the validation split, never on the test set.

Every point of ``retrain.select.grid`` (the combinations of its value lists, the first key
varying slowest) trains the stage-3 classifier on the training features with the same seed
and is scored on the validation features by ``retrain.select.metric``
(:func:`tailaug.evaluation.scoring.validation_score`). The best point's classifier is kept;
ties go to the first point in grid order. :func:`select_on_validation` receives no test
data: the caller applies the chosen classifier to the test set once, afterwards.

The stage-3 rows of a run share one ``retrain.select``: a row searches the grid keys it
reads (:func:`row_select`), so the plain cRT row of a run that also trains an augmenter
chooses the grid's ``lr``, ``epochs``, ... but not its ``augmenter.*`` values.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch
from torch import nn

from ..config import RetrainConfig, SelectConfig, ShotThresholds
from ..errors import ConfigError, TailaugError
from ..evaluation.scoring import LOWER_IS_BETTER, validation_score
from ..registry import AUGMENTERS, CLASSIFIERS

log = logging.getLogger(__name__)

AUGMENTER = "augmenter."


def row_select(configured: RetrainConfig, augmenter) -> SelectConfig | None:
    """The part of ``configured.select`` that a stage-3 row with ``augmenter`` searches: the
    ``augmenter.*`` keys only when the row has the configured augmenter; None when no key
    is left (or there is no ``select``)."""
    select = configured.select
    if select is None:
        return None
    same = augmenter.name == configured.augmenter.name
    grid = {k: v for k, v in select.grid.items() if same or not k.startswith(AUGMENTER)}
    return select.model_copy(update={"grid": grid}) if grid else None


def row_label(retrain: RetrainConfig) -> str:
    """The results.json row name of a stage-3 classifier, e.g. ``cRT + STG (lambda 1.5)``. A
    row with ``select`` names the keys it chose and how, not the chosen values (they may
    differ by seed): ``cRT + STG [augmenter.lam, lr chosen on validation top1]``."""
    label = CLASSIFIERS.get(retrain.method).label
    select, augmenter = retrain.select, retrain.augmenter
    if augmenter.name != "none":
        chosen = select is not None and any(k.startswith(AUGMENTER) for k in select.grid)
        label += f" + {AUGMENTERS.get(augmenter.name).label if chosen else augmenter.label()}"
    if not retrain.plain_loss() and "loss" in CLASSIFIERS.get(retrain.method).reads:
        label += f", {' + '.join(t.name.replace('_', ' ') for t in retrain.loss)} loss"
    if select is not None:
        label += f" [{', '.join(select.grid)} chosen on validation {select.metric}]"
    return label


def select_on_validation(
    fit: Callable[[RetrainConfig], nn.Module],
    retrain: RetrainConfig,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    class_counts,
    shots: ShotThresholds,
) -> nn.Module:
    """Train ``fit(point config)`` for every point of ``retrain.select.grid``, score each on
    (``val_features``, ``val_labels``) and return the best classifier (the highest score, or the
    lowest for a metric in ``LOWER_IS_BETTER``). Its ``choices`` gain
    ``select``: the metric, the grid, every point with its validation score, the chosen
    point and its score."""
    select = retrain.select
    if select is None:
        raise ConfigError("select_on_validation needs retrain.select")
    best, best_score, scores = None, None, []
    sign = -1.0 if select.metric in LOWER_IS_BETTER else 1.0
    for point in select.points():
        point_cfg = retrain.at(point)
        try:
            model = fit(point_cfg)
        except TailaugError as exc:
            raise type(exc)(f"retrain.select.grid point {_shown(point)}: {exc}") from None
        score = validation_score(_logits(model, val_features), val_labels, class_counts, select.metric,
                                 many=shots.many, few=shots.few)
        log.info("retrain.select: %s -> validation %s %.2f", _shown(point), select.metric, score)
        scores.append({"point": point, "score": score})
        if best_score is None or sign * score > sign * best_score:  # ties: the earlier point stays
            best, best_score, chosen = model, score, point
    best.choices = {
        **getattr(best, "choices", {}),
        "select": {"metric": select.metric, "grid": select.grid, "scores": scores, "chosen": chosen,
                   "score": best_score, "validation_samples": int(len(val_labels))},
    }
    return best


def _logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    tensors = itertools.chain(model.parameters(), model.buffers())
    device = next((t.device for t in tensors if t is not None), features.device)
    with torch.no_grad():
        return model(features.to(device)).float().cpu()


def _shown(point: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in point.items()) + "}"
