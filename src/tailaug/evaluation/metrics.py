"""Evaluation metrics for long-tailed classification (methods.md section 1).

Pure numpy/torch. Conventions:

* ``per_class_accuracy`` and ``expected_calibration_error`` return fractions in [0, 1];
  :func:`evaluate_logits` reports percentages (top-1, shot groups, per-class, ECE).
* Shot groups follow classifier-balancing (Kang et al. 2019; :func:`tailaug.data.classes.shot_groups`):
  many = more than ``many`` training images, few = fewer than ``few``, medium = the rest
  (``few``..``many`` inclusive). Shot-group accuracy is the mean of the group's per-class accuracies, which
  on the balanced test set equals the accuracy over the group's test samples.
* ECE uses equal-width bins on the max probability; bin b holds confidences in
  (b/B, (b+1)/B] (the first bin also holds 0).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..data.classes import SHOT_GROUPS, check_labels, shot_groups
from ..errors import DataError


def _np(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _pair(preds, targets, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    p = check_labels(preds, num_classes, "preds")
    t = check_labels(targets, num_classes, "targets")
    if p.shape != t.shape:
        raise DataError(f"preds ({p.shape[0]}) and targets ({t.shape[0]}) differ in length")
    return p, t


# --------------------------------------------------------------------------- accuracy


def confusion_matrix(preds, targets, num_classes: int) -> np.ndarray:
    """Counts ``[true, pred]``, shape [C, C], dtype int64."""
    p, t = _pair(preds, targets, num_classes)
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(preds, targets, num_classes: int) -> np.ndarray:
    """Fraction correct per true class, shape [C]; nan for a class absent from targets."""
    cm = confusion_matrix(preds, targets, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.diag(cm) / support
    acc = acc.astype(np.float64)
    acc[support == 0] = np.nan
    return acc


# --------------------------------------------------------------------------- calibration


def _probs(probs, targets) -> tuple[np.ndarray, np.ndarray]:
    p = _np(probs, "probs").astype(np.float64)
    if p.ndim != 2:
        raise DataError(f"probs must be [N, C] class probabilities, got shape {p.shape}")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or not np.all(np.isfinite(p))):
        raise DataError("probs must be finite probabilities in [0, 1]; pass softmax(logits), not logits")
    t = check_labels(targets, p.shape[1], "targets")
    if t.shape[0] != p.shape[0]:
        raise DataError(f"probs ({p.shape[0]} rows) and targets ({t.shape[0]}) differ in length")
    return p, t


def reliability_bins(probs, targets, bins: int = 15) -> dict:
    """Per-bin statistics of the max-probability confidence (equal-width bins on [0, 1]).

    Returns a JSON-serialisable dict: ``edges`` (bins + 1 floats), ``counts`` (ints),
    ``accuracy`` and ``confidence`` (fractions, None for an empty bin), ``num_samples``,
    and ``ece`` (fraction).
    """
    if bins < 1:
        raise DataError(f"the number of ECE bins must be >= 1, got {bins} (eval.ece_bins)")
    p, t = _probs(probs, targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf = p.max(axis=1) if p.size else np.zeros(0)
    correct = (p.argmax(axis=1) == t).astype(np.float64) if p.size else np.zeros(0)
    # bin b holds (edges[b], edges[b+1]]; 0 goes to bin 0
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    n = int(len(t))
    acc = [float(a / k) if k else None for a, k in zip(acc_sum, counts)]
    cfd = [float(c / k) if k else None for c, k in zip(conf_sum, counts)]
    ece = 0.0
    if n:
        ece = float(np.sum(np.abs(acc_sum - conf_sum)) / n)  # sum_b |B|/N * |acc_b - conf_b|
    return {
        "edges": edges.tolist(),
        "counts": counts.astype(int).tolist(),
        "accuracy": acc,
        "confidence": cfd,
        "num_samples": n,
        "ece": ece,
    }


def expected_calibration_error(probs, targets, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc_b - conf_b| over equal-width confidence bins; a fraction."""
    return reliability_bins(probs, targets, bins)["ece"]


# --------------------------------------------------------------------------- all at once


def _pct(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(100.0 * x)


def group_accuracies(per_class, groups: dict) -> dict:
    """Accuracy (%) of each shot group: the mean of its classes' accuracies (fractions in
    ``per_class``, nan for a class without samples, which is left out); None for a group
    with no such class. ``groups`` as :func:`tailaug.data.classes.shot_groups` returns."""
    acc = np.asarray(per_class, dtype=np.float64)
    out = {}
    for g in SHOT_GROUPS:
        vals = acc[list(groups[g])]
        vals = vals[~np.isnan(vals)]
        out[g] = float(100.0 * vals.mean()) if vals.size else None
    return out


def log_probabilities(logits) -> torch.Tensor:
    """float64 log-softmax [N, C] on the CPU: the probabilities behind NLL, ECE and the reliability diagram."""
    x = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    return torch.log_softmax(x.detach().cpu().to(torch.float64), dim=1)


def evaluate_logits(logits, targets, class_counts, *, many: int = 100, few: int = 20, ece_bins: int = 15) -> dict:
    """All test metrics from logits [N, C]; a JSON-serialisable dict.

    Keys: ``top1``, ``many``, ``medium``, ``few`` (%; a shot group is None when it has no
    class or none of its classes occurs in ``targets``), ``groups`` (classes per group),
    ``per_class`` (% per class, None for a class absent from ``targets``), ``class_counts``
    (the training images per class, for figures against class size), ``ece`` (%),
    ``nll`` (mean negative log-likelihood, nats), ``confusion`` ([true][pred] counts),
    ``num_samples``. ``class_counts`` are the TRAINING-set class sizes.
    """
    x = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    x = x.detach().cpu().to(torch.float64)
    if x.ndim != 2:
        raise DataError(f"logits must have shape [N, C], got {tuple(x.shape)}")
    num_classes = x.shape[1]
    counts = _np(class_counts, "class_counts")
    if counts.ndim != 1 or len(counts) != num_classes:
        raise DataError(
            f"class_counts has {counts.size} entries but the logits have {num_classes} classes; "
            "pass the training-set count of every class"
        )
    t = check_labels(targets, num_classes, "targets")
    if t.shape[0] != x.shape[0]:
        raise DataError(f"logits ({x.shape[0]} rows) and targets ({t.shape[0]}) differ in length")
    if x.shape[0] == 0:
        raise DataError("no test samples to evaluate")
    if not torch.isfinite(x).all():
        raise DataError("logits contain nan or inf; the model diverged (lower the learning rate)")

    log_probs = log_probabilities(x)
    tt = torch.from_numpy(t)
    nll = float(-log_probs.gather(1, tt[:, None]).mean())
    probs = log_probs.exp().numpy()
    preds = x.argmax(dim=1).numpy()

    cm = confusion_matrix(preds, t, num_classes)
    pca = per_class_accuracy(preds, t, num_classes)
    groups = shot_groups(counts, many=many, few=few)
    out: dict = {"top1": float(100.0 * np.mean(preds == t)), **group_accuracies(pca, groups)}
    out["groups"] = {g: len(groups[g]) for g in SHOT_GROUPS}
    out["class_counts"] = [int(n) for n in counts.tolist()]
    out["per_class"] = [_pct(a) for a in pca.tolist()]
    out["ece"] = float(100.0 * expected_calibration_error(probs, t, ece_bins))
    out["nll"] = nll
    out["confusion"] = cm.tolist()
    out["num_samples"] = int(len(t))
    return out
