"""The paper's decision-boundary figure (CE, cRT, cRT + augmentation) on a 2-D embedding.

The run's classifiers live in the backbone's d-dimensional feature space, where regions
cannot be drawn. The figure therefore shows the same three training recipes re-fitted on a
faithful 2-D slice of that space:

1. Three classes: the tail class with the fewest training images and the two classes whose
   mean training features are closest to its mean (cosine), the classes it is confused with.
2. The plane through the three class means: every feature is projected onto it
   (orthonormal basis of m2 - m1 and m3 - m1, origin at the mean of the means), so the class
   means keep their distances exactly.
3. Three linear softmax classifiers trained on the projected real training features with
   the run's stage-3 settings (Adam, ``retrain.lr`` x 10 for three weights per class,
   ``retrain.epochs`` but at least 1,000 steps, the run's seed): "CE"
   draws instances uniformly (what stage 1 sees), "cRT" draws classes uniformly, and
   "cRT + <augmenter>" draws classes uniformly from the real features plus ``reps``
   augmented copies of every tail feature. The augmenter is the run's, fitted on all
   training features as in stage 3; it augments in the d-dimensional space and the
   augmented features are projected like the real ones.

Regions are the argmax of each classifier over a grid covering the points.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RetrainConfig, SamplerConfig
from .augmented import augment_rows, original_rows

MIN_STEPS = 1000  # a small run's few points still get a converged 2-D classifier

CAPTION = ("Three linear classifiers re-fitted on the plane through the three class means of the backbone's "
           "features (projected training features; x: augmented copies): instance sampling (CE), class-balanced "
           "sampling (cRT), and class-balanced with augmented tail features (cRT + augmenter).")


def nearest_classes(features: torch.Tensor, labels: torch.Tensor, anchor: int, num_classes: int, k: int) -> list[int]:
    """The ``k`` classes (other than ``anchor``) whose mean feature is most cosine-similar to ``anchor``'s."""
    from ..data.classes import class_means

    means = F.normalize(class_means(features.float(), labels, num_classes), dim=1)
    sims = means @ means[anchor]
    sims[anchor] = -float("inf")
    present = torch.bincount(labels, minlength=num_classes) > 0
    sims[~present] = -float("inf")
    return [int(c) for c in torch.argsort(sims, descending=True, stable=True)[:k]]


def mean_plane(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(origin [d], basis [d, 2]) of the plane through the mean features of three classes."""
    means = torch.stack([features[labels == c].double().mean(0) for c in classes])
    origin = means.mean(0)
    basis, _ = torch.linalg.qr(torch.stack([means[1] - means[0], means[2] - means[0]], dim=1))
    return origin, basis


def _fit_2d(points: torch.Tensor, labels: torch.Tensor, sampler: str, retrain: RetrainConfig, seed: int,
            min_steps: int):
    from ..stages.classifier import retrain_classifier

    steps_per_epoch = -(-len(labels) // retrain.batch_size)
    epochs = max(retrain.epochs, -(-min_steps // steps_per_epoch))
    cfg = RetrainConfig(method="crt", epochs=epochs, batch_size=retrain.batch_size, lr=retrain.lr * 10,
                        sampler=SamplerConfig(kind=sampler))
    counts = torch.bincount(labels, minlength=3)
    return retrain_classifier(points, labels, counts, cfg, num_classes=3, seed=seed, progress=False)


def decision_boundary_figure(cache: dict, augmenter, augmenter_label: str | None, tail_class: int,
                             retrain: RetrainConfig, path: str | os.PathLike, *, seed: int,
                             class_names: Sequence[str] | None = None, reps: int = 10,
                             grid: int = 200, min_steps: int = MIN_STEPS) -> Path:
    """Write the figure (see the module docstring) for ``tail_class``; ``augmenter`` is the
    run's fitted augmenter (None: only the CE and cRT panels)."""
    from ..engine.seed import torch_generator
    from .plots import plot_decision_regions

    feats, labels = cache["train_features"], cache["train_labels"]
    num_classes = len(cache["class_counts"])
    real = original_rows(cache)
    classes = [tail_class, *nearest_classes(feats[real], labels[real], tail_class, num_classes, 2)]
    classes.sort(key=lambda c: -int(cache["class_counts"][c]))  # head first, tail last
    keep = real & torch.isin(labels, torch.tensor(classes))
    origin, basis = mean_plane(feats[keep], labels[keep], classes)
    local = {c: i for i, c in enumerate(classes)}

    def project(x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - origin) @ basis).float()

    points = project(feats[keep])
    y = torch.tensor([local[int(c)] for c in labels[keep]])
    panels = [("CE (instance sampling)", points, y, None), ("cRT (class-balanced)", points, y, None)]
    if augmenter is not None:
        aug_f, aug_y = augment_rows(augmenter, feats[keep], labels[keep], reps=reps, generator=torch_generator(seed, 6))
        inside = torch.isin(aug_y, torch.tensor(classes))
        aug_points = project(aug_f[inside])
        aug_local = torch.tensor([local[int(c)] for c in aug_y[inside]], dtype=torch.long)
        panels.append((f"cRT + {augmenter_label}", torch.cat([points, aug_points]), torch.cat([y, aug_local]),
                       torch.cat([torch.zeros(len(y), dtype=torch.bool), torch.ones(len(aug_local), dtype=torch.bool)])))
    all_points = torch.cat([p[1] for p in panels]).numpy()
    lo, hi = np.quantile(all_points, 0.005, axis=0), np.quantile(all_points, 0.995, axis=0)
    pad = 0.1 * (hi - lo) + 1e-6
    xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid)
    ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid)
    mesh = torch.tensor(np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2), dtype=torch.float32)
    drawn = []
    for i, (title, pts, lab, augmented) in enumerate(panels):
        sampler = "instance" if i == 0 else "class_balanced"
        head = _fit_2d(pts, lab, sampler, retrain, seed, min_steps)
        with torch.no_grad():
            regions = head(mesh).argmax(1).reshape(grid, grid).numpy()
        panel = {"title": title, "xs": xs, "ys": ys, "regions": regions, "points": pts.numpy(), "labels": lab.numpy()}
        if augmented is not None:
            panel["augmented"] = augmented.numpy()
        drawn.append(panel)
    counts = [int(cache["class_counts"][c]) for c in classes]
    names = [f"{class_names[c] if class_names else f'class {c}'} ({n} images)" for c, n in zip(classes, counts)]
    return plot_decision_regions(drawn, path, class_names=names, caption=CAPTION,
                                 title=f"Decision regions on the plane of three class means (tail: {names[-1]})")
