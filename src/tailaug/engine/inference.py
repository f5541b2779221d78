"""Run a model over batches and collect features, logits and labels (no gradients)."""

from __future__ import annotations

import torch

from .device import autocast


@torch.no_grad()
def iter_outputs(model, batches, device, dtype=None):
    """Per batch: {"features", "logits", "labels", "index"} on the CPU (features and logits float32)."""
    was_training = model.training
    model.eval()
    try:
        for x, y, idx in batches:
            with autocast(device, dtype):
                out = model(x)
            yield {"features": out.features.float().cpu(), "logits": out.logits.float().cpu(),
                   "labels": y.cpu(), "index": idx.cpu()}
    finally:
        model.train(was_training)


def collect_outputs(model, batches, device, dtype=None) -> dict[str, torch.Tensor]:
    parts = list(iter_outputs(model, batches, device, dtype))
    return {k: torch.cat([p[k] for p in parts]) for k in ("features", "logits", "labels", "index")}
