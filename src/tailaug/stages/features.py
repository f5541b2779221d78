"""Stage 2a: features of the frozen stage-1 backbone, cached in the run directory.

The cache is one safetensors file per key (``keys.features_key``), so every later
stage and every variant of it reads features instead of running the backbone again.
Keys: ``train_features``/``train_labels``/``train_index`` (un-augmented rows first, then
``views`` randomly augmented views per image), ``test_*``, ``val_*`` when there is a
validation split, ``head_weight``/``head_bias`` of the stage-1 classifier (zeros for the
bias of a cosine head) and ``class_counts``. :func:`stage1_classifier` says how stage 3
must score with that head.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ..engine.checkpoint import atomic_write, load_tensors
from ..errors import CheckpointError
from .keys import features_key
from .stage1_model import load_finished

# the entries of a cache, by split: each split's entries have one row per feature vector
SPLIT_ENTRIES = {"train": ("features", "labels", "index"), "test": ("features", "labels", "logits"),
                 "val": ("features", "labels", "logits")}
MODEL_ENTRIES = ("class_counts", "head_weight", "head_bias")


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


def cache_path(run_dir: Path, cfg) -> Path:
    return Path(run_dir) / "features" / f"{features_key(cfg)}.safetensors"


def extract_features(cfg, run_dir: Path, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Load the cache for this config, or run the finished stage-1 backbone once and write it
    (given embeddings: the embeddings themselves, :func:`.linear_head.embeddings_stage1`)."""
    if cfg.data.dataset == "embeddings":
        from .linear_head import embeddings_stage1

        return embeddings_stage1(cfg, run_dir, progress=progress)
    path = cache_path(run_dir, cfg)
    if path.is_file():
        return load_cache(path)
    stage1 = load_finished(cfg, run_dir)
    data, model = stage1.data, stage1.model

    def run(split, augment=False, view=0):
        return stage1.outputs(split, cfg.features.batch_size, augment=augment, seed=cfg.run.seed + 7919 * view)

    train = [run(data.train)] + [run(data.train, True, v) for v in range(1, cfg.features.views + 1)]
    cache = {
        "train_features": torch.cat([t["features"] for t in train]),
        "train_labels": torch.cat([t["labels"] for t in train]),
        "train_index": torch.cat([t["index"] for t in train]),
        "class_counts": torch.tensor(data.class_counts),
        "head_weight": model.head.weight.detach().float().cpu(),
        "head_bias": _bias(model.head),
    }
    for name, split in (("val", data.val), ("test", data.test)):
        if split is not None:
            out = run(split)
            cache[f"{name}_features"], cache[f"{name}_labels"] = out["features"], out["labels"]
            cache[f"{name}_logits"] = out["logits"]
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in cache.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    if progress:
        print(f"cached {len(cache['train_features']):,} training and {len(cache['test_features']):,} "
              f"test features in {path}")
    return cache


def load_cache(path: Path) -> dict[str, torch.Tensor]:
    """The cache at ``path`` with every entry the later stages read (val_* all or none), one
    row count per split; a CheckpointError that says to delete it otherwise."""
    fix = f"delete {path} and rerun: the features are extracted again from the stage-1 checkpoint"
    cache = load_tensors(path, fix=fix)
    needed = [*MODEL_ENTRIES, *(f"{split}_{entry}" for split, entries in SPLIT_ENTRIES.items()
                                for entry in entries if split != "val" or "val_features" in cache)]
    missing = [k for k in needed if k not in cache]
    if missing:
        raise CheckpointError(f"feature cache {path} lacks {', '.join(missing)}; {fix}")
    for split, entries in SPLIT_ENTRIES.items():
        rows = {len(cache[f"{split}_{e}"]) for e in entries if f"{split}_{e}" in cache}
        if len(rows) > 1:
            raise CheckpointError(
                f"feature cache {path}: the {split}_* entries disagree in length {sorted(rows)}; {fix}"
            )
    return cache


def _bias(head) -> torch.Tensor:
    bias = getattr(head, "bias", None)
    return torch.zeros(head.weight.shape[0]) if bias is None else bias.detach().float().cpu()
