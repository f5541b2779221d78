"""Spatial maps of the stage-1 backbone's last convolutional stage, for augmenters that read
them (:meth:`~tailaug.augment.base.AugmenterOptions.spatial_request`).

Offline: the maps of every (un-augmented) training image, computed once and cached in
``spatial/<spatial_key>.safetensors`` (``maps`` [N, d, h, w] in the requested
dtype, bfloat16 by default: half of float32; ``index``, ``labels``). Online: nothing is
stored; the frozen backbone computes the maps of the images asked for, rounded to the same
dtype, so both give the same maps (up to the backbone's batch-size-dependent rounding).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..augment.base import SpatialMaps, SpatialRequest
from ..data.datasets import Split
from ..data.loaders import Batches
from ..engine.checkpoint import atomic_write, load_tensors
from ..engine.device import autocast
from ..errors import CheckpointError
from ..models import spatial_maps
from .keys import spatial_key
from .stage1_model import Stage1Model, load_finished

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def spatial_path(run_dir: Path, cfg, dtype: str) -> Path:
    return Path(run_dir) / "spatial" / f"{spatial_key(cfg, dtype)}.safetensors"


@torch.no_grad()
def backbone_maps(stage1: Stage1Model, split: Split, index, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The maps of the images ``index`` of ``split`` (un-augmented, eval mode), rounded to
    ``dtype``, on the backbone's device."""
    stage1.model.eval()
    order = torch.as_tensor(index).long().cpu().numpy()
    out = []
    for x, _, _ in Batches(split, batch_size, stage1.transform, stage1.device, order=order,
                           num_workers=stage1.cfg.data.num_workers, prefetch_factor=stage1.cfg.data.prefetch_factor):
        with autocast(stage1.device, stage1.dtype):
            maps = spatial_maps(stage1.model.backbone, x, stage1.cfg.model.arch)
        out.append(maps.float().to(dtype).contiguous(memory_format=torch.contiguous_format))
    return torch.cat(out)


class CachedSpatialMaps(SpatialMaps):
    """Offline maps held in memory (as stored), by dataset index."""

    def __init__(self, maps: torch.Tensor, index: torch.Tensor, labels: torch.Tensor):
        self.stored, self.index, self.labels = maps, index.long(), labels.long()
        self._row = torch.full((int(self.index.max()) + 1,), -1, dtype=torch.long)
        self._row[self.index] = torch.arange(len(self.index))

    def maps(self, index, device="cpu"):
        return self.stored[self._row[torch.as_tensor(index).cpu().long()]].to(device).float()


class BackboneSpatialMaps(SpatialMaps):
    """Online maps: the frozen stage-1 backbone run on the training images asked for."""

    def __init__(self, stage1: Stage1Model, batch_size: int, dtype: torch.dtype):
        self.stage1, self.batch_size, self.dtype = stage1, batch_size, dtype
        self.split = stage1.data.train
        self.labels = torch.as_tensor(self.split.labels).long()
        self.index = torch.arange(len(self.labels))

    def maps(self, index, device="cpu"):
        return backbone_maps(self.stage1, self.split, index, self.batch_size, self.dtype).to(device).float()


def spatial_source(cfg, run_dir: Path, request: SpatialRequest, *, progress: bool = True) -> SpatialMaps:
    """The spatial maps ``request`` asks for: online from the frozen backbone, or the cache of
    this config (written now when missing); the cache's size is printed."""
    dtype = DTYPES[request.dtype]
    if request.online:
        stage1 = load_finished(cfg, run_dir)
        print(f"spatial maps: recomputed online by the frozen {cfg.model.arch} backbone (rounded to {request.dtype})")
        return BackboneSpatialMaps(stage1, cfg.features.batch_size, dtype)
    path = spatial_path(run_dir, cfg, request.dtype)
    if path.is_file():
        cache = load_spatial(path)
        verb = "reusing"
    else:
        stage1 = load_finished(cfg, run_dir)
        train = stage1.data.train
        index = torch.arange(len(train))
        cache = {"maps": backbone_maps(stage1, train, index, cfg.features.batch_size, dtype).cpu(), "index": index,
                 "labels": torch.as_tensor(train.labels).long()}
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(cache, tmp))
        verb = "cached"
    maps = cache["maps"]
    print(f"spatial maps: {verb} {tuple(maps.shape)} {request.dtype} in {path} "
          f"({path.stat().st_size / 2**20:.1f} MiB)")
    return CachedSpatialMaps(maps, cache["index"], cache["labels"])


def load_spatial(path: Path) -> dict[str, torch.Tensor]:
    fix = f"delete {path} and rerun: the maps are computed again from the stage-1 checkpoint"
    cache = load_tensors(path, fix=fix)
    missing = [k for k in ("maps", "index", "labels") if k not in cache]
    if missing:
        raise CheckpointError(f"spatial-map cache {path} lacks {', '.join(missing)}; {fix}")
    if not len(cache["maps"]) == len(cache["index"]) == len(cache["labels"]) or cache["maps"].ndim != 4:
        raise CheckpointError(f"spatial-map cache {path}: its entries disagree in length or shape; {fix}")
    return cache
