"""Stage 3: re-train (or re-balance) the classifier on cached features (methods.md 4 and 6).

:func:`retrain_classifier` checks plain tensors, bundles them as :class:`Stage3Inputs` and
hands them to the decoupled classifier that ``retrain.method`` names (``tailaug.classifiers``:
crt, lws, tau_norm, ncm, one file each); the result is a module ``features [N, d] -> logits
[N, C]``. :func:`fit_trained` is the training every trained classifier shares: the
augmenter fitted once, batches drawn by ``retrain.sampler`` (class-balanced by default) and
augmented, cross-entropy (Eq. 5) of the logits as the augmenter adjusts them (an implicit
augmenter such as ISDA adds its term there), Adam, ``retrain.epochs`` epochs of N samples each.

Everything random (initialisation, sampling, augmentation) derives from ``seed`` through
private generators, so the same inputs and seed give the same module on the CPU.

The training features may be a :class:`~tailaug.engine.shards.ShardedArray`, the
memory-mapped cache: every batch is then read by its row numbers (the sampler's order, on
the host) and moved to the device, and the augmenter's statistics are taken in passes of
``CHUNK_ROWS`` rows; the rows, and so the classifier, are the same as from a tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..augment.base import AugmentContext, FeatureAugmenter, SpatialMaps
from ..augment.meta import MetaStep, meta_indices, trainable
from ..augment.stg import head_classes as _head_classes
from ..data.classes import check_features
from ..data.samplers import build_sampler
from ..engine.device import autocast
from ..engine.schedule import cosine
from ..engine.shards import CHUNK_ROWS, ShardedArray
from ..errors import ConfigError, DataError, TailaugError
from ..losses.base import LossInputs
from ..registry import CLASSIFIERS

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- helpers


def accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model`` on (features, labels)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, features.shape[0], batch_size):
            logits = model(features[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(1, features.shape[0])


def predict(model: nn.Module, features, device, rows: int = CHUNK_ROWS) -> torch.Tensor:
    """float32 logits of ``model`` on ``features`` (a tensor or a ShardedArray), on the CPU,
    ``rows`` rows at a time (at once when there are no more)."""
    out = []
    with torch.no_grad():
        for start in range(0, features.shape[0], rows):
            out.append(model(features[start : start + rows].to(device)).float().cpu())
    return torch.cat(out).contiguous()


def _as_inputs(features, labels, num_classes: int, what: str, device) -> tuple:
    x, y = check_features(features, labels, num_classes, what)
    return x.to(device), y.to(device)


def _stage1(init_weight, init_bias, init_cosine_scale, num_classes: int, dim: int, method: str, device):
    if init_weight is None:
        raise ConfigError(
            f"retrain.method = {method} needs the stage-1 classifier weights (init_weight); "
            "use method crt or ncm when they are not available"
        )
    weight = torch.as_tensor(init_weight).float().to(device)
    if weight.shape != (num_classes, dim):
        raise DataError(f"init_weight must be [C, d] = [{num_classes}, {dim}], got {tuple(weight.shape)}")
    bias = None
    if init_bias is not None:
        bias = torch.as_tensor(init_bias).float().to(device)
        if bias.shape != (num_classes,):
            raise DataError(f"init_bias must be [C] = [{num_classes}], got {tuple(bias.shape)}")
    return weight, bias


# --------------------------------------------------------------------------- entry point


def retrain_classifier(
    train_features,
    train_labels,
    class_counts,
    cfg,
    *,
    num_classes: int,
    seed: int,
    augmenter: FeatureAugmenter | None = None,
    init_weight=None,
    init_bias=None,
    init_cosine_scale: float | None = None,
    val=None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    head_classes: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    spatial: SpatialMaps | None = None,
) -> nn.Module:
    """Stage 3 on cached features; returns a module (eval mode) mapping [N, d] -> [N, C].

    ``train_features``: [N, d] (tensor or array) or a ShardedArray, which stays mapped. ``cfg`` is a :class:`~tailaug.config.RetrainConfig`. ``class_counts`` [C] are the
    training-image counts (beta_y and the head set of the augmenter). ``augmenter`` is used
    by ``crt`` and ``lws``; when it has not been fitted yet it is fitted here, with head
    classes ``head_classes`` (default: the many-shot rule n_c > 100) and the stage-1
    classifier ``init_weight``/``init_bias``; ``init_cosine_scale`` s says that classifier
    is a cosine head (logits s * cos(w_c, a), no bias), None a linear one. ``val`` =
    (features, labels) of a validation split, used to choose tau of ``tau_norm`` and logged
    per epoch otherwise (no model selection). The module carries ``history`` (per-epoch loss /
    val accuracy) and ``choices``, what was resolved at run time (the seed of a trained
    classifier; tau-norm's tau, where it came from and the validation accuracy of every tau).
    Everything runs on ``device``; ``crt`` and ``lws`` train the classifier under autocast to
    ``dtype`` (None: float32; the loss and every evaluation are float32). ``spatial`` are the
    training images' spatial maps for an augmenter that reads them (and ``val`` reaches
    augmenters that read the validation split).
    """
    device = torch.device(device)
    x, y = _as_inputs(train_features, train_labels, num_classes, "training", device)
    dim = x.shape[1]
    counts = torch.as_tensor(class_counts).long().reshape(-1)
    if counts.numel() != num_classes:
        raise DataError(f"class_counts has {counts.numel()} entries for num_classes={num_classes}")
    val_xy = None
    if val is not None:
        val_xy = _as_inputs(val[0], val[1], num_classes, "validation", device)
        if val_xy[0].shape[1] != dim:
            raise DataError(f"validation features are {val_xy[0].shape[1]}-d, training features {dim}-d")

    if init_cosine_scale is not None and init_bias is not None:
        raise DataError("a cosine stage-1 head has no bias; pass init_bias=None with init_cosine_scale")
    inputs = Stage3Inputs(
        x=x, y=y, counts=counts, cfg=cfg, num_classes=num_classes, seed=seed, augmenter=augmenter,
        init_weight=init_weight, init_bias=init_bias, init_cosine_scale=init_cosine_scale, val_xy=val_xy,
        progress=progress, device=device, head_classes=head_classes, dtype=dtype, spatial=spatial,
    )
    model = CLASSIFIERS.get(cfg.method).obj(inputs)
    model.history = getattr(model, "history", [])
    model.choices = getattr(model, "choices", {})
    return model.eval()


@dataclasses.dataclass
class Stage3Inputs:
    """What a decoupled classifier's fit function receives (all tensors on ``device``)."""

    x: torch.Tensor | ShardedArray  # a ShardedArray: the memory-mapped cache, read batch by batch
    y: torch.Tensor
    counts: torch.Tensor
    cfg: Any  # RetrainConfig
    num_classes: int
    seed: int
    augmenter: FeatureAugmenter | None
    init_weight: Any
    init_bias: Any
    init_cosine_scale: float | None
    val_xy: tuple[torch.Tensor, torch.Tensor] | None
    progress: bool
    device: Any
    head_classes: Sequence[int] | None
    dtype: torch.dtype | None = None  # autocast dtype of training; None: float32
    spatial: SpatialMaps | None = None  # the training images' spatial maps (augmenters that read them)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def stage1(self):
        """The stage-1 classifier (weight [C, d], bias [C] or None), checked."""
        return _stage1(self.init_weight, self.init_bias, self.init_cosine_scale, self.num_classes, self.dim,
                       self.cfg.method, self.device)

    def ignore_augmenter(self) -> None:
        if self.augmenter is not None and type(self.augmenter) is not FeatureAugmenter:
            log.warning("retrain.method = %s does not train, so the augmenter %s is not used",
                        self.cfg.method, self.augmenter.name)


# the retrain options a trained classifier's result depends on (its stage key)
TRAINED_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "sampler", "augmenter", "seed", "loss")


def fit_trained(model: nn.Module, inp: Stage3Inputs) -> nn.Module:
    """Fit the augmenter (once) and train ``model`` on the augmented batches."""
    model.to(inp.device)
    augmenter = inp.augmenter
    if augmenter is not None and not augmenter.fitted:
        heads = list(inp.head_classes) if inp.head_classes is not None else _head_classes(inp.counts)
        augmenter.fit(
            AugmentContext(
                features=inp.x,
                labels=inp.y,
                class_counts=inp.counts.to(inp.device),
                head_classes=heads,
                classifier_weight=None if inp.init_weight is None
                else torch.as_tensor(inp.init_weight).float().to(inp.device),
                classifier_bias=None if inp.init_bias is None else torch.as_tensor(inp.init_bias).float().to(inp.device),
                classifier_cosine_scale=inp.init_cosine_scale,
                num_classes=inp.num_classes,
                validation=inp.val_xy,
                spatial=inp.spatial,
            )
        )
    model.history = _train(model, inp.x, inp.y, inp.cfg, inp.num_classes, inp.seed, augmenter, inp.val_xy,
                           inp.progress, inp.device, inp.dtype, loss_fn=stage3_loss(inp.cfg, inp.counts, inp.device),
                           cosine_lr=inp.cfg.schedule == "cosine")
    model.choices = {"seed": inp.seed}
    return model


def _cross_entropy(model, features, logits, labels):
    return F.cross_entropy(logits, labels)


def stage3_loss(cfg, counts, device):
    """``loss_fn`` of ``_train`` for ``retrain.loss``: plain cross-entropy (Eq. 5) by default,
    else the weighted sum of the terms (balanced softmax, logit adjustment, focal, ...) with
    the training-image ``counts`` as the class prior."""
    if cfg.plain_loss():
        return _cross_entropy
    from ..losses.combined import LossFunction, loss_terms

    loss = LossFunction(loss_terms(cfg.loss, counts.tolist()), counts.tolist()).to(device)
    if loss.needs_cosine or loss.needs_two_views:
        names = ", ".join(t.name for t in loss.terms if t.needs_cosine or t.needs_two_views)
        raise ConfigError(f"retrain.loss: {names} needs a cosine head or two views of each image, which a "
                          "stage-3 classifier on cached features does not have; use ce, focal, "
                          "balanced_softmax or logit_adjust")
    return lambda model, features, logits, labels: loss(LossInputs(logits, labels, features))


def _meta_step(model, loss_fn, lr, val_xy, rows, seed, epoch, step, device, dtype) -> MetaStep:
    """A stage-3 :class:`MetaStep`: the classifier, its loss, and ``rows`` validation rows."""
    pick = meta_indices(len(val_xy[1]), rows, seed, epoch, step).to(val_xy[1].device)
    return MetaStep(module=model, params=trainable(model), lr=lr, meta_images=val_xy[0][pick],
                    meta_labels=val_xy[1][pick], loss=lambda i: loss_fn(model, i.features, i.logits, i.targets),
                    autocast=lambda: autocast(device, dtype))


def _train(model, x, y, cfg, num_classes, seed, augmenter, val_xy, progress, device, dtype, *,
           loss_fn=_cross_entropy, set_epoch=None, desc: str | None = None, section: str = "retrain",
           cosine_lr: bool = False) -> list[dict]:
    """Train ``model`` on (x, y) with Adam at ``cfg.lr`` (constant, or with ``cosine_lr`` on a
    cosine schedule to 0 over all steps), batches of ``cfg.batch_size`` drawn by ``cfg.sampler``
    for ``cfg.epochs`` epochs. ``loss_fn(model, batch features, float32 logits,
    labels)`` is cross-entropy unless given (the linear stage 1 on embeddings passes its
    ``train.loss``), ``set_epoch(epoch)`` is called at the start of every epoch; ``section``
    names the config section of ``cfg`` in messages."""
    params = [p for p in model.parameters() if p.requires_grad]
    streamed = isinstance(x, ShardedArray)
    if augmenter is not None:
        augmenter.to(device).train()
    optimiser = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sampler = build_sampler(cfg.sampler, y.cpu(), num_classes, seed=seed, total_epochs=cfg.epochs)
    aug_rng = torch.Generator(device=device).manual_seed(seed + 1)
    history: list[dict] = []
    bar = tqdm(range(cfg.epochs), desc=desc or f"stage 3 ({cfg.method})", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        sampler.set_epoch(epoch)
        if set_epoch is not None:
            set_epoch(epoch)
        if augmenter is not None:
            augmenter.set_epoch(epoch, cfg.epochs)
        host_order = torch.as_tensor(list(sampler), dtype=torch.long)
        order = host_order.to(device)
        total, seen, augment_s = torch.zeros((), device=device), 0, 0.0
        steps = -(-order.numel() // cfg.batch_size)
        for start in range(0, order.numel(), cfg.batch_size):
            if cosine_lr:
                done = (epoch * steps + start // cfg.batch_size) / (cfg.epochs * steps)
                for group in optimiser.param_groups:
                    group["lr"] = cosine(cfg.lr, done)
            b = order[start : start + cfg.batch_size]
            # mapped rows are read by host row numbers (no device sync), then moved to the device
            xb = x[host_order[start : start + cfg.batch_size]] if streamed else x[b]
            yb = y[b]
            if augmenter is not None:
                t0 = time.perf_counter()
                xb, yb = augmenter(xb, yb, generator=aug_rng)
                augment_s += time.perf_counter() - t0
            with autocast(device, dtype):
                logits = model(xb)
            logits = logits.float()
            if augmenter is not None:  # an implicit augmenter changes the logits here
                if rows := augmenter.meta_rows():  # a meta step on validation rows (augment/meta.py)
                    augmenter.set_meta_step(_meta_step(model, loss_fn, cfg.lr, val_xy, rows, seed, epoch,
                                                       start // cfg.batch_size, device, dtype))
                logits = augmenter.adjust_loss_inputs(LossInputs(logits, yb, xb), model).logits
            loss = loss_fn(model, xb, logits, yb)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            total += loss.detach() * yb.numel()  # on the device: no host sync per step
            seen += yb.numel()
        mean_loss = float(total) / max(1, seen)  # one sync per epoch
        if not math.isfinite(mean_loss):
            stage = "stage-3" if section == "retrain" else "stage-1"
            weaker = " or the augmentation strength (e.g. retrain.augmenter.lam)" if section == "retrain" else ""
            raise TailaugError(f"the {stage} loss became {mean_loss} in epoch {epoch + 1}; lower "
                               f"{section}.lr{weaker}")
        record = {"epoch": epoch, "loss": mean_loss}
        if val_xy is not None:
            model.eval()
            record["val_acc"] = accuracy(model, *val_xy)
        if augmenter is not None:
            # host time in the augmenter (on a GPU: the launches, not the kernels)
            record["augment_s"] = augment_s
            model.eval()
            record.update(augmenter.after_epoch(model, epoch))
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if isinstance(v, float)})
    if augmenter is not None:
        augmenter.eval()
    return history
