"""Real against augmented features of tail classes, for any feature augmenter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..augment.base import AugmentContext, FeatureAugmenter
from ..errors import TailaugError


def fit_on_cache(augmenter: FeatureAugmenter, cache: dict, head: list[int], stage1_head) -> FeatureAugmenter:
    """Fit ``augmenter`` on the cached training features as stage 3 does (head classes
    ``head``, the stage-1 classifier ``stage1_head`` for augmenters that read it)."""
    augmenter.fit(AugmentContext(features=cache["train_features"], labels=cache["train_labels"],
                                 class_counts=cache["class_counts"], head_classes=head,
                                 classifier_weight=stage1_head.weight, classifier_bias=stage1_head.bias,
                                 classifier_cosine_scale=stage1_head.cosine_scale))
    return augmenter


def original_rows(cache: dict) -> torch.Tensor:
    """Bool [N]: the un-augmented training rows of the cache (listed before the augmented views)."""
    labels = cache["train_labels"]
    return torch.arange(len(labels)) < int(cache["class_counts"].sum())


def smallest_tail_classes(counts: Sequence[int], head: Sequence[int], k: int, min_count: int = 1) -> list[int]:
    """The ``k`` non-head classes with the fewest training images (ties: lower id), each with
    at least ``min_count`` images; an error when there is none."""
    tail = sorted((c for c in range(len(counts)) if c not in head and counts[c] >= min_count),
                  key=lambda c: (counts[c], c))
    if not tail:
        raise TailaugError(f"no tail class has {min_count} training images to show; every class with images "
                           "is a head class (shrink the head set, stg.head)")
    return tail[:k]


def augment_rows(augmenter: FeatureAugmenter, features: torch.Tensor, labels: torch.Tensor, *,
                 reps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``reps`` passes of ``features`` through ``augmenter``; returns the rows it changed or
    appended (augmenters may replace rows or append new ones) and their labels."""
    base_f, base_y = features.repeat(reps, 1), labels.repeat(reps)
    with torch.no_grad():
        out_f, out_y = augmenter(base_f, base_y, generator=generator)
    m = min(len(base_f), len(out_f))
    changed = torch.ones(len(out_f), dtype=torch.bool)
    changed[:m] = (out_f[:m] != base_f[:m]).any(dim=1)
    return out_f[changed], out_y[changed]


def augmented_tsne(augmenter: FeatureAugmenter, cache: dict, classes: list[int], path: str | os.PathLike, *,
                   seed: int, label: str, reps: int = 10, class_names: Sequence[str] | None = None) -> Path:
    """t-SNE of the real training features of ``classes`` (dots) and of ``reps`` augmented
    copies of them (crosses) from the fitted ``augmenter``; ``label`` names it in the title."""
    from ..engine.seed import torch_generator
    from .plots import plot_tsne

    feats, labels = cache["train_features"], cache["train_labels"]
    real = original_rows(cache) & torch.isin(labels, torch.tensor(classes))
    aug_f, aug_y = augment_rows(augmenter, feats[real], labels[real], reps=reps,
                                generator=torch_generator(seed, 5))
    points = torch.cat([feats[real], aug_f.to(feats.dtype)])
    point_labels = torch.cat([labels[real], aug_y])
    markers = torch.cat([torch.zeros(int(real.sum()), dtype=torch.bool), torch.ones(len(aug_f), dtype=torch.bool)])
    shown = ", ".join(class_names[c] if class_names else str(c) for c in classes)
    return plot_tsne(points.float().numpy(), point_labels.numpy(), path, markers=markers.numpy(), seed=seed,
                     class_names=class_names,
                     title=f"Real (o) and {label}-augmented (x) training features\nof tail classes {shown}")
