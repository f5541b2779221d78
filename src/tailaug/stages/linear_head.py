"""Stage 1 on given embeddings: a linear (or cosine) head instead of a backbone.

:func:`train_linear_head` trains ``model.head`` on fixed features with ``train.loss`` (every
term that works on one view: ce, focal, balanced_softmax, logit_adjust,
label_aware_smoothing; ldam/arcface/cosface/sphereface on ``model.head: cosine``),
``train.reweight`` (DRW from ``start_epoch``) and ``train.sampler``, through the training
loop stage 3 uses (:func:`tailaug.stages.classifier._train`). Decision: Adam at a constant
``train.lr`` with ``train.weight_decay``, ``train.epochs`` epochs of N samples in batches of
``train.batch_size``, float32; the SGD settings (momentum, nesterov, schedule, warm-up)
tune a CNN and are not read. The scikit-learn estimator (``tailaug.sklearn``) calls it too.

:func:`embeddings_stage1` is stage 1 of ``tailaug run`` on ``data.dataset: embeddings``: the
feature cache is the embeddings themselves (with the head's weights and test logits), so
stages 2 and 3 run on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..losses import LossInputs, build_loss
from ..models.heads import build_head
from .classifier import _as_inputs, _train


def train_linear_head(features, labels, class_counts, train_cfg, *, head: str = "linear",
                      cosine_scale: float = 16.0, seed: int = 0, device: str | torch.device = "cpu",
                      val=None, progress: bool = False) -> nn.Module:
    """The head (eval mode, on ``device``) trained on (features, labels) by ``train_cfg`` (a
    :class:`~tailaug.config.TrainConfig`); ``history`` holds the loss (and validation
    accuracy with ``val``) of every epoch. Initialisation and batches come from ``seed``."""
    device = torch.device(device)
    counts = [int(c) for c in class_counts]
    x, y = _as_inputs(features, labels, len(counts), "training", device)
    loss = build_loss(train_cfg, counts).to(device)
    if loss.needs_two_views:
        raise ConfigError("supcon in train.loss needs two augmented views of each sample; fixed embeddings have one: "
                          "drop the supcon term")
    if loss.needs_cosine and head != "cosine":
        names = sorted({t.name for t in loss.terms if t.needs_cosine})
        raise ConfigError(f"the margin loss(es) {', '.join(names)} act on the cosines of a cosine classifier; set "
                          "model.head: cosine (head='cosine')")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_head(head, x.shape[1], len(counts), cosine_scale).to(device)

    def loss_fn(model, xb, logits, yb):
        return loss(LossInputs(logits, yb, xb, model.cosine(xb)))

    val_xy = None if val is None else _as_inputs(val[0], val[1], len(counts), "validation", device)
    model.history = _train(model, x, y, train_cfg, len(counts), seed, None, val_xy, progress, device, None,
                           loss_fn=loss_fn, set_epoch=loss.set_epoch, desc="stage 1 (linear head)", section="train")
    return model.eval()


def head_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, d], bias [C]) of a trained head on the CPU; a cosine head's bias is zeros."""
    weight = model.weight.detach().float().cpu()
    bias = getattr(model, "bias", None)
    return weight, torch.zeros(weight.shape[0]) if bias is None else bias.detach().float().cpu()


def embeddings_stage1(cfg, run_dir: Path, *, progress: bool = True) -> dict:
    """The feature cache of an embeddings run: loaded when stage 1 finished with this config,
    else the embeddings read, the head trained and the cache (written in shards as extracted
    features are, then loaded: mapped) and ``stage1.json`` written."""
    from ..data.embeddings import as_tensor, load_embeddings
    from ..engine.device import resolve_device
    from ..evaluation.report import write_json
    from .feature_cache import cache_path, find_cache, load_cache, write_cache
    from .keys import stage1_key
    from .stage1_model import finished_key, is_complete, marker_path, other_model_error

    run_dir = Path(run_dir)
    found = find_cache(run_dir, cfg)
    if is_complete(run_dir, cfg) and found is not None:
        return load_cache(found)
    done = finished_key(run_dir)
    if done is not None and done != stage1_key(cfg):
        raise other_model_error(f"stage 1 in {run_dir}", run_dir, cfg)
    data = load_embeddings(cfg.data)
    for note in data.notes:
        print(note)
    device = resolve_device(cfg.run.device)
    counts = data.class_counts
    print(f"stage 1: a {cfg.model.head} head on {len(data.train_y):,} embeddings of {data.train_x.shape[1]} "
          f"dimensions, {data.num_classes} classes (no backbone)")
    val = None if data.val_x is None else (as_tensor(data.val_x), torch.from_numpy(data.val_y))
    head = train_linear_head(as_tensor(data.train_x), torch.from_numpy(data.train_y), counts, cfg.train,
                             head=cfg.model.head, cosine_scale=cfg.model.cosine_scale, seed=cfg.run.seed,
                             device=device, val=val, progress=progress)
    weight, bias = head_parameters(head)
    cache = {
        "train_features": as_tensor(data.train_x), "train_labels": torch.from_numpy(data.train_y),
        "train_index": torch.arange(len(data.train_y)), "class_counts": torch.tensor(counts),
        "head_weight": weight, "head_bias": bias,
    }
    splits = [("test", data.test_x, data.test_y)] + ([] if val is None else [("val", data.val_x, data.val_y)])
    for name, x, y in splits:
        features = as_tensor(x)
        with torch.no_grad():
            logits = head(features.to(device)).float().cpu()
        cache.update({f"{name}_features": features, f"{name}_labels": torch.from_numpy(y), f"{name}_logits": logits})
    if not cache["test_labels"].numel():
        raise DataError("the test set is empty; give data.embeddings.test or more rows per class")
    path = write_cache(cache_path(run_dir, cfg), cache, cfg.features.shard_rows, cfg.features.dtype)
    if data.class_names:
        write_json(run_dir / "classes.json", {"names": data.class_names})  # as stage1_model.write_classes
    write_json(marker_path(run_dir), {"key": stage1_key(cfg), "epochs": cfg.train.epochs, "history": head.history})
    return load_cache(path)
