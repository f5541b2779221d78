"""Class-count profiles and the long-tailed subset draw (methods.md section 1)."""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .classes import class_order_problem


def exponential_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """n_c = int(n_max * (1/IF) ** (c / (C - 1))) for c = 0..C-1 (Cao et al. 2019)."""
    _check(n_max, num_classes, imbalance_factor)
    if num_classes == 1:
        return [n_max]
    return [int(n_max * (1.0 / imbalance_factor) ** (c / (num_classes - 1))) for c in range(num_classes)]


def step_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """The first half of the classes keep n_max, the rest int(n_max / IF)."""
    _check(n_max, num_classes, imbalance_factor)
    half = num_classes // 2
    return [n_max] * half + [int(n_max / imbalance_factor)] * (num_classes - half)


PROFILES = {
    "exponential": exponential_counts,
    "step": step_counts,
    "none": lambda n_max, num_classes, imbalance_factor: [n_max] * num_classes,
}


def profile_counts(profile: str, n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    if profile not in PROFILES:
        raise DataError(f"unknown profile {profile!r}; use exponential, step or none")
    counts = PROFILES[profile](n_max, num_classes, imbalance_factor)
    empty = [c for c, n in enumerate(counts) if n < 1]
    if empty:
        # int() rounding can empty the last class at IF = n_max itself (n_max 49: 49 * (1/49) < 1)
        limit = n_max if min(PROFILES[profile](n_max, num_classes, n_max)) >= 1 else n_max - 1
        raise DataError(
            f"the {profile} profile with n_max={n_max} and imbalance factor {imbalance_factor:g} leaves "
            f"class(es) {empty} with no samples; lower data.imbalance_factor (at most {limit}) "
            "or raise data.n_max"
        )
    return counts


def ordered_counts(counts: list[int], class_order: list[int] | None = None) -> list[int]:
    """Per-class counts when the profile's counts go to the classes in ``class_order``: count i
    goes to class ``class_order[i]`` (None: class i, the protocol)."""
    counts = list(counts)
    if class_order is None:
        return counts
    problem = class_order_problem(class_order, len(counts))
    if problem:
        raise DataError(
            f"data.class_order {problem}; list each class 0..{len(counts) - 1} exactly once "
            "(profile count i goes to class class_order[i])"
        )
    per_class = [0] * len(counts)
    for i, c in enumerate(class_order):
        per_class[c] = counts[i]
    return per_class


def long_tail_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Indices of the long-tailed subset: per class, shuffle its indices and keep the first n_c.

    Uses ``np.random.RandomState(seed)`` with classes visited in order, the protocol that
    gives the published CIFAR-LT sizes.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    kept = []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        if len(idx) < n_c:
            raise DataError(
                f"class {c} has {len(idx)} images but the profile asks for {n_c}; "
                "lower data.n_max or check the labels of the data"
            )
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def _check(n_max: int, num_classes: int, imbalance_factor: float) -> None:
    if imbalance_factor < 1:
        raise DataError(
            f"imbalance factor {imbalance_factor:g} is below 1; it is n_max / n_min, so use a value >= 1 "
            "(1 keeps the set balanced)"
        )
    if n_max < 1 or num_classes < 1:
        raise DataError(f"n_max ({n_max}) and the number of classes ({num_classes}) must be positive")
