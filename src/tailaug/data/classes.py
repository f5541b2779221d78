"""Class labels and per-class counts: the one place each rule about them lives.

- :func:`check_labels`: 1-D integer class ids in 0..C-1.
- :func:`check_counts`: per-class training counts, whole numbers, every class non-empty.
- :func:`check_features`: a [N, d] float feature matrix with its N labels, finite.
- :func:`shot_groups`: many / medium / few-shot classes (classifier-balancing: many = more
  than ``many`` training images, few = fewer than ``few``, medium = the rest). The many-shot
  classes are also the default head set of the feature augmenters.
- :func:`class_means`: the mean feature of every class.
- :func:`class_order_problem`: what is wrong with an order of the classes (``data.class_order``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.shards import CHUNK_ROWS, ShardedArray
from ..errors import DataError

SHOT_GROUPS = ("many", "medium", "few")


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def check_labels(labels, num_classes: int | None = None, what: str = "labels") -> np.ndarray:
    """``labels`` as an int64 numpy array of class ids in 0..num_classes-1 (any range when
    ``num_classes`` is None); a DataError naming ``what`` otherwise."""
    arr = _numpy(labels)
    if arr.ndim != 1:
        raise DataError(f"{what} must be a 1-D sequence of class ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iub":
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise DataError(f"{what} must be integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if num_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = arr[(arr < 0) | (arr >= num_classes)]
        raise DataError(
            f"{what} must lie in 0..{num_classes - 1} (num_classes={num_classes}) but {bad.size} do not, "
            f"e.g. {bad[:5].tolist()}; check that the model and the data agree on the number of classes"
        )
    return arr


def check_counts(class_counts: Sequence[int] | torch.Tensor, what: str = "class_counts") -> tuple[int, ...]:
    """Per-class training counts as a tuple of ints: whole numbers, at least two classes, and
    every class with at least one image (priors, margins, class weights and class-aware
    sampling are all undefined for an empty class)."""
    if isinstance(class_counts, torch.Tensor):
        raw = class_counts.detach().cpu().reshape(-1).tolist()
    else:
        try:
            raw = [c.item() if hasattr(c, "item") else c for c in class_counts]
        except TypeError:
            raise DataError(
                f"{what} must be a sequence of per-class image counts, got {type(class_counts).__name__}"
            ) from None
    counts = []
    for c, n in enumerate(raw):
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n != math.floor(n):
            raise DataError(f"{what}[{c}] = {n!r} is not a whole number of training images")
        counts.append(int(n))
    if len(counts) < 2:
        raise DataError(f"{what} has {len(counts)} entries; a classifier needs at least 2 classes")
    negative = [c for c, n in enumerate(counts) if n < 0]
    if negative:
        raise DataError(f"{what} are negative for class(es) {negative}")
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(
            f"class(es) {empty} have no training images; every class needs at least one (log prior, "
            "margins, class weights and class-aware sampling are undefined otherwise): lower "
            "data.imbalance_factor, raise data.n_max, or drop the empty classes from the split"
        )
    return tuple(counts)


def check_features(features, labels, num_classes: int, what: str = "training") -> tuple:
    """(float32 [N, d] features, int64 [N] labels) on the features' device; a DataError when
    the shapes disagree, there are no rows, a label is out of range or a value is not finite.
    A :class:`~tailaug.engine.shards.ShardedArray` stays mapped (checked in one pass)."""
    if not isinstance(features, ShardedArray):
        features = torch.as_tensor(features).float()
    labels = torch.as_tensor(labels, device=features.device).long().reshape(-1)
    if features.ndim != 2:
        raise DataError(f"{what} features must be [N, d], got shape {tuple(features.shape)}")
    if labels.numel() != features.shape[0]:
        raise DataError(f"{what}: {labels.numel()} labels for {features.shape[0]} feature rows")
    if features.shape[0] == 0:
        raise DataError(f"{what} features are empty")
    check_labels(labels, num_classes, f"{what} labels")
    if isinstance(features, ShardedArray):
        finite = features.all_finite()
    else:  # in chunks: torch.isfinite of the whole matrix would hold about twice its size at once
        finite = all(bool(torch.isfinite(features[s : s + CHUNK_ROWS]).all())
                     for s in range(0, features.shape[0], CHUNK_ROWS))
    if not finite:
        raise DataError(f"{what} features contain NaN or inf; re-extract them")
    return features, labels


def shot_groups(class_counts: Sequence[int], many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Class ids per shot group: many: n > many; few: n < few; medium: the rest."""
    if few > many:
        raise DataError(f"the few-shot threshold ({few}) must not exceed the many-shot one ({many})")
    counts = _numpy(class_counts)
    if counts.ndim != 1:
        raise DataError(f"class_counts must be 1-D, got shape {counts.shape}")
    groups: dict[str, list[int]] = {g: [] for g in SHOT_GROUPS}
    for c, n in enumerate(counts.tolist()):
        groups["many" if n > many else "few" if n < few else "medium"].append(c)
    return groups


def class_means(features, labels: torch.Tensor, num_classes: int, *, normalize: bool = False) -> torch.Tensor:
    """[C, d] mean feature of each class (a zero row for a class without rows), of the
    L2-normalised features with ``normalize``. ``features``: a tensor or a ShardedArray, summed
    ``CHUNK_ROWS`` rows at a time (on the CPU the same sums as at once: index_add_ adds rows in order)."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    sums = torch.zeros(num_classes, features.shape[1], dtype=dtype, device=features.device)
    for start in range(0, features.shape[0], CHUNK_ROWS):
        chunk = features[start : start + CHUNK_ROWS].to(dtype)
        sums.index_add_(0, labels[start : start + CHUNK_ROWS], F.normalize(chunk, dim=1) if normalize else chunk)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(sums.dtype)
    return sums / counts[:, None]


def class_order_problem(order: Sequence[int], num_classes: int) -> str | None:
    """What keeps ``order`` from being a permutation of 0..num_classes-1 (each class exactly
    once), as a phrase that follows "data.class_order"; None when it is one."""
    order = [int(c) for c in order]
    problems = []
    if len(order) != num_classes:
        problems.append(f"has {len(order)} entries for {num_classes} classes")
    outside = sorted({c for c in order if not 0 <= c < num_classes})
    if outside:
        problems.append(f"names {_listing(outside, 'class', 'classes')} outside 0..{num_classes - 1}")
    twice = sorted({c for c in order if order.count(c) > 1})
    if twice:
        problems.append(f"lists {_listing(twice, 'class', 'classes')} more than once")
    missing = sorted(set(range(num_classes)) - set(order))
    if missing:
        problems.append(f"leaves out {_listing(missing, 'class', 'classes')}")
    return "; ".join(problems) or None


def _listing(items: list[int], one: str, many: str) -> str:
    shown = ", ".join(map(str, items[:8])) + (", ..." if len(items) > 8 else "")
    return f"{one} {shown}" if len(items) == 1 else f"{many} {shown}"
