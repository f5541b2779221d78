"""Stage 2a: features of the frozen stage-1 backbone, cached in the run directory.

The cache is one safetensors file per (stage-1 model, features config) key, so every later
stage and every variant of it reads features instead of running the backbone again.
Keys: ``train_features``/``train_labels``/``train_index`` (un-augmented rows first, then
``views`` randomly augmented views per image), ``test_*``, ``val_*`` when there is a
validation split, ``head_weight``/``head_bias`` of the stage-1 classifier and
``class_counts``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.loaders import Batches
from ..engine.checkpoint import atomic_write, load_tensors
from ..engine.inference import collect_outputs
from ..errors import CheckpointError
from .representation import Trainer, load_stage1_model, stage1_key

# the entries of a cache, by split: each split's entries have one row per feature vector
SPLIT_ENTRIES = {"train": ("features", "labels", "index"), "test": ("features", "labels", "logits"),
                 "val": ("features", "labels", "logits")}
MODEL_ENTRIES = ("class_counts", "head_weight", "head_bias")


def features_key(cfg) -> str:
    return f"{stage1_key(cfg)}-{cfg.section_hash('features')}"


def cache_path(run_dir: Path, cfg) -> Path:
    return Path(run_dir) / "features" / f"{features_key(cfg)}.safetensors"


def extract_features(cfg, run_dir: Path, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Load the cache for this config, or run the backbone once and write it."""
    path = cache_path(run_dir, cfg)
    if path.is_file():
        return load_cache(path)
    trainer = Trainer(cfg, run_dir, progress=False)
    load_stage1_model(trainer.model, run_dir, trainer.device)
    data, size = trainer.data, cfg.features.batch_size

    def run(split, augment=False, view=0):
        batches = Batches(split, size, trainer.transform, trainer.device, augment=augment,
                          seed=cfg.run.seed + 7919 * view, num_workers=cfg.data.num_workers)
        return collect_outputs(trainer.model, batches, trainer.device, trainer.dtype)

    train = [run(data.train)] + [run(data.train, True, v) for v in range(1, cfg.features.views + 1)]
    cache = {
        "train_features": torch.cat([t["features"] for t in train]),
        "train_labels": torch.cat([t["labels"] for t in train]),
        "train_index": torch.cat([t["index"] for t in train]),
        "class_counts": torch.tensor(data.class_counts),
        "head_weight": trainer.model.head.weight.detach().float().cpu(),
        "head_bias": _bias(trainer.model.head),
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
