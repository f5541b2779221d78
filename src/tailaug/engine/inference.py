"""Run a model over batches and collect features, logits and labels (no gradients)."""

from __future__ import annotations

import torch

from .device import autocast


@torch.no_grad()
def collect_outputs(model, batches, device, dtype=None) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    feats, logits, labels, index = [], [], [], []
    for x, y, idx in batches:
        with autocast(device, dtype):
            out = model(x)
        feats.append(out.features.float().cpu())
        logits.append(out.logits.float().cpu())
        labels.append(y.cpu())
        index.append(idx.cpu())
    model.train(was_training)
    return {
        "features": torch.cat(feats), "logits": torch.cat(logits),
        "labels": torch.cat(labels), "index": torch.cat(index),
    }
