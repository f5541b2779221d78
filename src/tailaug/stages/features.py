"""Stage 2a: features of the frozen stage-1 backbone, cached in the run directory.

The cache (``feature_cache``: a directory of .npy shards and an index, one per key
``keys.features_key``) lets every later stage and every variant of it read features instead
of running the backbone again. Entries: ``train_features``/``train_labels``/``train_index``
(un-augmented rows first, then ``views`` randomly augmented views per image), ``test_*``,
``val_*`` when there is a validation split, ``head_weight``/``head_bias`` of the stage-1
classifier (zeros for the bias of a cosine head) and ``class_counts``. Extraction writes it
batch by batch, a shard at a time; :func:`stage1_classifier` says how stage 3 must score
with that head.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from .feature_cache import SPLIT_ENTRIES, CacheWriter, cache_path, find_cache, load_cache
from .stage1_model import load_finished


class Stage1Classifier(NamedTuple):
    """The stage-1 head as stage 3 uses it: logits = ``head_logits(a, weight, bias, cosine_scale)``."""

    weight: torch.Tensor  # [C, d]
    bias: torch.Tensor | None  # [C]; None for a cosine head
    cosine_scale: float | None  # the cosine head's logit scale; None for a linear head


def stage1_classifier(cache: dict, cfg) -> Stage1Classifier:
    """The cached stage-1 head with the scoring of ``cfg.model.head`` (part of the cache key)."""
    if cfg.model.head == "cosine":
        return Stage1Classifier(cache["head_weight"], None, float(cfg.model.cosine_scale))
    return Stage1Classifier(cache["head_weight"], cache["head_bias"], None)


def extract_features(cfg, run_dir: Path, *, progress: bool = True) -> dict:
    """Load the cache for this config (:func:`~.feature_cache.load_cache`: arrays mapped, not
    read), or run the finished stage-1 backbone once and write it (given embeddings: the
    embeddings themselves, :func:`.linear_head.embeddings_stage1`)."""
    if cfg.data.dataset == "embeddings":
        from .linear_head import embeddings_stage1

        return embeddings_stage1(cfg, run_dir, progress=progress)
    found = find_cache(run_dir, cfg)
    if found is not None:
        return load_cache(found)
    stage1 = load_finished(cfg, run_dir)
    data, model = stage1.data, stage1.model
    path = cache_path(run_dir, cfg)
    writer = CacheWriter(path, cfg.features.shard_rows, cfg.features.dtype)

    def run(name, split, augment=False, view=0):  # only what the cache keeps of the split leaves the device
        for batch in stage1.batches_out(split, cfg.features.batch_size, augment=augment,
                                        seed=cfg.run.seed + 7919 * view, keys=SPLIT_ENTRIES[name]):
            writer.add(name, batch)

    run("train", data.train)
    for v in range(1, cfg.features.views + 1):
        run("train", data.train, True, v)
    for name, split in (("val", data.val), ("test", data.test)):
        if split is not None:
            run(name, split)
    writer.finish({"class_counts": torch.tensor(data.class_counts),
                   "head_weight": model.head.weight.detach().float().cpu(), "head_bias": _bias(model.head)})
    cache = load_cache(path)
    if progress:
        print(f"cached {len(cache['train_features']):,} training and {len(cache['test_features']):,} "
              f"test features in {path}")
    return cache


def _bias(head) -> torch.Tensor:
    bias = getattr(head, "bias", None)
    return torch.zeros(head.weight.shape[0]) if bias is None else bias.detach().float().cpu()
