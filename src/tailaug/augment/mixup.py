"""Image-level mixup (Zhang et al. 2018): x = lam*x_i + (1-lam)*x_perm(i), lam ~ Beta(alpha, alpha)."""

from __future__ import annotations

import numpy as np
import torch


def mixup(x: torch.Tensor, rng: np.random.Generator, alpha: float):
    """Returns (mixed x, lam, permutation); the loss is lam*L(y) + (1-lam)*L(y[perm])."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam, perm
