"""Run a model over batches and collect features, logits and labels (no gradients)."""

from __future__ import annotations

import torch

from ..errors import TailaugError
from .device import autocast

OUTPUTS = ("features", "logits", "labels", "index")


@torch.no_grad()
def iter_outputs(model, batches, device, dtype=None, keys=OUTPUTS):
    """Per batch: the ``keys`` of {"features", "logits", "labels", "index"} on the CPU (features
    and logits float32). Outputs not asked for are never moved to the host (the training split's
    logits of a feature extraction: 8,142 floats a row on iNaturalist)."""
    keys = tuple(keys)
    unknown = [k for k in keys if k not in OUTPUTS]
    if unknown:
        raise TailaugError(f"iter_outputs cannot return {', '.join(map(repr, unknown))}; ask for some of "
                           f"{', '.join(OUTPUTS)}")
    was_training = model.training
    model.eval()
    try:
        for x, y, idx in batches:
            with autocast(device, dtype):
                out = model(x)
            batch = {}
            for k in keys:
                if k in ("features", "logits"):
                    batch[k] = getattr(out, k).float().cpu()
                else:
                    batch[k] = (y if k == "labels" else idx).cpu()
            yield batch
    finally:
        model.train(was_training)


def collect_outputs(model, batches, device, dtype=None) -> dict[str, torch.Tensor]:
    parts = list(iter_outputs(model, batches, device, dtype))
    return {k: torch.cat([p[k] for p in parts]) for k in OUTPUTS}
