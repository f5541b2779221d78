"""Stage 2: train the Semantic Transformation Generator on cached head-class features.

:func:`train_generator` takes plain tensors (features of the frozen stage-1 backbone, labels,
dataset index per row, class counts) and returns the trained generator and its per-epoch
mean loss. :func:`save_generator` / :func:`load_generator` store it as a safetensors file
plus a JSON sidecar (``<stem>.json``) with the architecture, the caller's config and the
SHA-256 of the tensor file; loading never executes code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..augment.stg import (
    SemanticTransformationGenerator,
    TargetEstimator,
    generator_loss,
    head_classes,
    neighbour_nll,
)
from ..data.classes import check_features
from ..engine.checkpoint import atomic_write, atomic_write_text, exception_summary
from ..engine.device import autocast
from ..errors import CheckpointError, ConfigError, DataError, TailaugError
from ..evaluation.report import read_json

log = logging.getLogger(__name__)

FORMAT = "tailaug.stg_generator"
VERSION = 1


def train_generator(
    features,
    labels,
    index,
    class_counts,
    cfg,
    *,
    seed: int,
    many: int = 100,
    progress: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[SemanticTransformationGenerator, list[float]]:
    """Train the STG on the head-class rows of ``features`` (an :class:`~tailaug.config.STGConfig`);
    ``features`` may be a mapped ShardedArray, of which only those rows are read into memory.

    ``index`` [N] is the dataset index of each row (views of one image share it; None:
    every row its own image). ``class_counts`` [C] counts training images per class and
    defines the head set (``cfg.head``; ``many`` is the many-shot threshold). Mini-batches of
    ``cfg.batch_size`` come from a permutation drawn with ``torch.Generator`` seeded by
    ``seed``; the model is initialised from ``seed`` too (the global RNG is left untouched).
    The model trains on ``device`` with its forward pass under autocast to ``dtype`` (None:
    float32; the loss is always float32). Returns the model in eval mode and the mean loss of each epoch (over the batches that
    had at least one target). An epoch in which no batch had a target, or a head class none
    of whose rows ever had one, is a ConfigError: the generator (or that class's token)
    would be returned untrained.
    """
    device = torch.device(device)
    counts = torch.as_tensor(class_counts).long().reshape(-1)
    num_classes = counts.numel()
    features, labels = check_features(features, labels, num_classes, "cached")
    n_rows, dim = features.shape
    index = torch.arange(n_rows) if index is None else torch.as_tensor(index).long().reshape(-1)
    if index.numel() != n_rows:
        raise DataError(f"{index.numel()} dataset indices for {n_rows} feature rows")

    heads = head_classes(counts, cfg.head, many=many)
    if not heads:
        raise ConfigError(
            f"no head class under stg.head.rule={cfg.head.rule} (class counts {counts.tolist()}); "
            "lower stg.head.threshold / data.shots.many or use stg.head.rule=top_k"
        )
    rows = torch.isin(labels, torch.tensor(heads))
    x, y, idx = features[rows].to(device), labels[rows].to(device), index[rows].to(device)
    n = x.shape[0]
    if n < 2:
        raise DataError(f"the head classes {heads} have {n} feature row(s); the generator needs at least 2")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SemanticTransformationGenerator(dim, num_classes, cfg.hidden_dims, cfg.token_std, cfg.rank)
    model.trained_tokens[torch.tensor(heads)] = True
    model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    estimator = TargetEstimator(cfg.memory_size, cfg.min_neighbours, cfg.ema, cfg.neighbours)
    order_rng = torch.Generator().manual_seed(seed)
    batch_size = cfg.batch_size
    log.info("stage 2: %d head classes %s, %d rows, %d epochs", len(heads), heads, n, cfg.epochs)

    had_target = torch.zeros(num_classes, dtype=torch.bool, device=device)
    losses: list[float] = []
    bar = tqdm(range(cfg.epochs), desc="stage 2 (STG)", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=order_rng).to(device)
        total, batches = 0.0, 0
        for start in range(0, n, batch_size):
            b = perm[start : start + batch_size]
            if b.numel() < 2:  # BatchNorm needs two rows; the row is used in the next epoch
                continue
            xb, yb, ib = x[b], y[b], idx[b]
            if cfg.loss == "nll":  # the neighbours themselves, not their smoothed moments
                pool, same = estimator.neighbourhood(xb, yb, ib)
                mask = same.sum(1) >= estimator.min_neighbours
                estimator.push(xb, yb, ib)
            else:
                mu_t, sigma_t, mask = estimator(xb, yb, ib)
            if not bool(mask.any()):
                continue
            with autocast(device, dtype):
                mu, log_var = model(xb, yb)
                factor = model.factor(xb, yb)
            mu, log_var, factor = mu.float(), log_var.float(), factor.float()
            if cfg.loss == "nll":
                loss = neighbour_nll(mu[mask], log_var[mask], factor[mask], xb[mask].float(), pool.float(), same[mask])
            else:
                loss = generator_loss(mu[mask], log_var[mask], mu_t[mask], sigma_t[mask], cfg.loss)
            if not torch.isfinite(loss):
                raise TailaugError(
                    f"the generator loss became {loss.item()} in epoch {epoch + 1}; lower stg.lr or "
                    "use stg.loss=mse (nothing was saved)"
                )
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            had_target[yb[mask]] = True
            total += float(loss.detach())
            batches += 1
        if not batches:
            raise ConfigError(
                f"stage 2 epoch {epoch + 1}: no head-class row had {cfg.min_neighbours} other images of its "
                f"class in its batch and the memory, so there is nothing to train the generator on; raise "
                "stg.batch_size or stg.memory_size, or lower stg.min_neighbours (nothing was saved)"
            )
        epoch_loss = total / batches
        losses.append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
    untrained = [c for c in heads if not bool(had_target[c])]
    if untrained:
        raise ConfigError(
            f"head class(es) {untrained} never had a target in stage 2 (a target needs {cfg.min_neighbours} "
            "other images of the class in the batch and the memory), so their tokens would stay untrained; "
            "lower stg.min_neighbours, raise stg.batch_size or stg.memory_size, or leave them out of the "
            "head set (stg.head) (nothing was saved)"
        )
    model.eval()
    return model, losses


# --------------------------------------------------------------------------- persistence


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of a generator file: the same stem with suffix ``.json``."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"{path}: the generator tensors need a suffix other than .json (use .safetensors)")
    return path.with_suffix(".json")


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_generator(path: str | Path, model: SemanticTransformationGenerator, cfg_dict: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` (safetensors) and its sidecar; both writes are atomic.

    ``cfg_dict`` (JSON-serialisable, e.g. ``cfg.stg.model_dump(mode="json")``) is stored
    as-is and returned by :func:`load_generator`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    side = sidecar_path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "arch": model.arch(),
        "config": cfg_dict if cfg_dict is not None else {},
        "tensors_file": path.name,
        "tensors_sha256": _sha256(path),
    }
    atomic_write_text(side, json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_generator(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[SemanticTransformationGenerator, dict[str, Any]]:
    """Read a generator written by :func:`save_generator`: (model in eval mode, cfg_dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    side = sidecar_path(path)
    for p in (path, side):
        if not p.is_file():
            raise CheckpointError(f"generator file {p} does not exist; run stage 2 (the generator) first")
    # a cached generator is reused as long as its file exists: the fix is to delete both files
    fix = f"delete {path} and {side} and rerun: stage 2 trains the generator again"
    meta = read_json(side, fix=fix)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{side} is not a tailaug generator sidecar; {fix}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{side} has format version {meta.get('version')}, expected {VERSION}; {fix}")
    if meta.get("tensors_sha256") != _sha256(path):
        raise CheckpointError(f"{path} does not match its sidecar {side} (truncated or from another run); {fix}")
    arch = meta.get("arch") or {}
    try:
        model = SemanticTransformationGenerator(
            int(arch["dim"]), int(arch["num_classes"]), [int(h) for h in arch["hidden_dims"]], float(arch["token_std"]),
            int(arch.get("rank", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{side} has an invalid architecture entry ({exc!r}); {fix}") from None
    try:
        state = load_file(str(path), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot load generator weights from {path} ({exception_summary(exc)}); {fix}") from None
    model.requires_grad_(False)
    return model.to(device).eval(), meta.get("config", {})
