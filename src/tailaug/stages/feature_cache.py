"""The files of the feature cache, ``run_dir/features/<features_key>/``:

    index.json            {"format", "version", "shard_rows", "arrays": {name: {"shape", "dtype",
                          "shards": [{"file", "rows", "bytes"}]}}, "tensors": {"file", "bytes"}}
    <array>-00000.npy ... the shards of each per-row array (``engine/shards.py``): the features of
                          every split in ``features.dtype``, the val/test logits in float32
    entries.safetensors   everything else: ``<split>_labels``, ``train_index``, ``class_counts``,
                          ``head_weight``, ``head_bias`` (8 bytes a row, and the stage-1 head)

Shards and entries are written atomically and index.json last: a directory without it is an
interrupted extraction, whose files the next extraction replaces. :func:`load_cache` returns
the arrays as :class:`~tailaug.engine.shards.ShardedArray` (mapped, nothing read) and the
rest as tensors, so loading needs the same memory for any number of rows. A cache of earlier
versions, the single file ``<features_key>.safetensors`` (float32; the key of a float32
cache is unchanged), is still loaded, whole, as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.checkpoint import atomic_write, atomic_write_text, exception_summary, load_tensors
from ..engine.shards import ShardedArray, ShardWriter, dense
from ..errors import CheckpointError
from .keys import features_key

FORMAT, VERSION = "tailaug feature cache", 1
INDEX, ENTRIES = "index.json", "entries.safetensors"
# the entries of a cache, by split: each split's entries have one row per feature vector
SPLIT_ENTRIES = {"train": ("features", "labels", "index"), "test": ("features", "labels", "logits"),
                 "val": ("features", "labels", "logits")}
MODEL_ENTRIES = ("class_counts", "head_weight", "head_bias")
ROW_ARRAYS = ("features", "logits")  # sharded; the other entries go to entries.safetensors


def cache_path(run_dir: Path, cfg) -> Path:
    """The cache directory of ``cfg`` in ``run_dir``."""
    return Path(run_dir) / "features" / features_key(cfg)


def legacy_cache_path(run_dir: Path, cfg) -> Path:
    """The single-file cache earlier versions wrote for ``cfg``."""
    return Path(run_dir) / "features" / f"{features_key(cfg)}.safetensors"


def find_cache(run_dir: Path, cfg) -> Path | None:
    """The cache of ``cfg`` in ``run_dir`` (directory, else an earlier version's file), or None."""
    directory = cache_path(run_dir, cfg)
    if (directory / INDEX).is_file():
        return directory
    legacy = legacy_cache_path(run_dir, cfg)
    return legacy if legacy.is_file() else None


def fix_for(path: Path) -> str:
    what = f"the directory {path}" if path.suffix != ".safetensors" else str(path)
    return f"delete {what} and rerun: the features are extracted again from the stage-1 checkpoint"


class CacheWriter:
    """Writes a cache split by split, batch by batch: ``add(split, {"features": ..., "labels":
    ..., ...})`` as often as needed, then ``finish(model entries)``. At most one shard of each
    array is held in memory."""

    def __init__(self, directory: Path, shard_rows: int, dtype: str):
        self.directory, self.shard_rows, self.dtype = Path(directory), int(shard_rows), dtype
        if self.directory.is_dir():  # an interrupted extraction: its files are replaced
            for old in self.directory.iterdir():
                if old.is_file() and (old.suffix in (".npy", ".tmp") or old.name in (INDEX, ENTRIES)):
                    old.unlink()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.arrays: dict[str, ShardWriter] = {}
        self.small: dict[str, list[torch.Tensor]] = {}

    def add(self, split: str, outputs: dict) -> None:
        for entry in SPLIT_ENTRIES[split]:
            name, value = f"{split}_{entry}", outputs[entry]
            if entry in ROW_ARRAYS:
                if name not in self.arrays:
                    dtype = self.dtype if entry == "features" else "float32"
                    self.arrays[name] = ShardWriter(self.directory, name, self.shard_rows, dtype)
                self.arrays[name].append(value)
            else:
                self.small.setdefault(name, []).append(torch.as_tensor(value).detach().cpu().long())

    def finish(self, model_entries: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        arrays = {name: writer.close() for name, writer in self.arrays.items()}
        tensors = {name: torch.cat(parts).contiguous() for name, parts in self.small.items()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in model_entries.items()})
        entries = atomic_write(self.directory / ENTRIES, lambda tmp: save_file(tensors, tmp))
        index = {"format": FORMAT, "version": VERSION, "shard_rows": self.shard_rows, "arrays": arrays,
                 "tensors": {"file": ENTRIES, "bytes": entries.stat().st_size}}
        atomic_write_text(self.directory / INDEX, json.dumps(index, indent=1) + "\n")
        return self.directory


def write_cache(directory: Path, cache: dict[str, torch.Tensor], shard_rows: int, dtype: str) -> Path:
    """A cache held in memory (``<split>_<entry>`` and model entries), written as ``directory``."""
    writer = CacheWriter(directory, shard_rows, dtype)
    for split, entries in SPLIT_ENTRIES.items():
        if f"{split}_features" in cache:
            writer.add(split, {e: cache[f"{split}_{e}"] for e in entries})
    return writer.finish({k: cache[k] for k in MODEL_ENTRIES})


def load_cache(path: Path) -> dict:
    """The cache at ``path`` (a cache directory, or an earlier version's single file) with
    every entry the later stages read (val_* all or none), one row count per split; a
    CheckpointError that names the damaged file and says to delete the cache otherwise."""
    path = Path(path)
    fix = fix_for(path)
    cache = _load_directory(path, fix) if path.suffix != ".safetensors" else load_tensors(path, fix=fix)
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


def _load_directory(directory: Path, fix: str) -> dict:
    index_path = directory / INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"format {index.get('format')!r} version {index.get('version')!r}, not {FORMAT!r} "
                             f"version {VERSION}")
        arrays, small = dict(index["arrays"]), index["tensors"]
        entries, size = directory / small["file"], int(small["bytes"])
    except Exception as exc:  # unreadable, not JSON, not this format
        raise CheckpointError(f"feature cache index {index_path} cannot be read ({exception_summary(exc)}); "
                              f"{fix}") from None
    if not entries.is_file():
        raise CheckpointError(f"feature cache file {entries} is missing; {fix}")
    if entries.stat().st_size != size:
        raise CheckpointError(f"feature cache file {entries} has {entries.stat().st_size:,} bytes where the index "
                              f"records {size:,} (truncated or overwritten); {fix}")
    cache: dict = load_tensors(entries, fix=fix)
    cache.update({name: ShardedArray.open(directory, name, entry, fix=fix) for name, entry in arrays.items()})
    return cache


def training_features(cache: dict, cfg):
    """The training features as stage 3 reads them: the mapped shards, streamed batch by batch,
    when there are more rows than ``features.shard_rows``; one float32 tensor otherwise."""
    x = cache["train_features"]
    if isinstance(x, ShardedArray) and len(x) <= cfg.features.shard_rows:
        return x.tensor()
    return x


def dense_cache(cache: dict) -> dict[str, torch.Tensor]:
    """Every entry of ``cache`` in memory (float32 arrays), for analyses of small runs."""
    return {k: dense(v) for k, v in cache.items()}


def stage1_head_tensors(run_dir: Path, cfg, fix: str) -> dict[str, torch.Tensor]:
    """``head_weight`` and ``head_bias`` of the cache of ``cfg`` (nothing else is read); a
    CheckpointError with ``fix`` when there is no readable cache."""
    from safetensors import safe_open

    found = find_cache(run_dir, cfg)
    if found is None:
        raise CheckpointError(f"the feature cache {cache_path(run_dir, cfg)} with the run's stage-1 head is "
                              f"missing; {fix}")
    path = found if found.suffix == ".safetensors" else found / ENTRIES
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in ("head_weight", "head_bias")}
    except Exception as exc:
        raise CheckpointError(f"{path} holds no readable stage-1 head ({type(exc).__name__}: {exc}); delete "
                              f"{found} and {fix}") from None
