"""Image-level mixup (Zhang et al. 2018): x = lam*x_i + (1-lam)*x_perm(i), lam ~ Beta(alpha, alpha)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


def mixup(x: torch.Tensor, rng: np.random.Generator, alpha: float):
    """Returns (mixed x, lam, permutation); the loss is lam*L(y) + (1-lam)*L(y[perm])."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam, perm


def mixed_loss(loss_fn, inputs, targets_b: torch.Tensor, lam: float,
               label_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of a mixed batch whose ``inputs.targets`` are the labels of x_i and
    ``targets_b`` those of x_perm(i).

    Mixup (``label_weight`` None): ``lam * L(y) + (1 - lam) * L(y[perm])``. With per-sample
    label weights s [N] (Remix, ``augment/remix.py``): ``L(y; s) + L(y[perm]; 1 - s)``, where
    ``L(.; s)`` weights each sample's loss by s (``LossInputs.sample_weight``), so the sum is
    the per-sample mixture s_i L_i(y_i) + (1 - s_i) L_i(y_perm(i)); s = lam everywhere is mixup.
    """
    if label_weight is None:
        return lam * loss_fn(inputs) + (1 - lam) * loss_fn(dataclasses.replace(inputs, targets=targets_b))
    return (loss_fn(dataclasses.replace(inputs, sample_weight=label_weight))
            + loss_fn(dataclasses.replace(inputs, targets=targets_b, sample_weight=1 - label_weight)))
