"""Stage 3: re-train (or re-balance) the classifier on cached features (methods.md 4 and 6).

:func:`retrain_classifier` maps plain tensors to a module ``features [N, d] -> logits [N, C]``:

``crt``
    a re-initialised linear classifier trained with cross-entropy (Eq. 5) on batches drawn
    by ``cfg.sampler`` (class-balanced by default), Adam, ``cfg.epochs`` epochs of N
    samples each; the augmenter is applied to every batch.
``lws``
    learnable weight scaling: the stage-1 head stays frozen and one scale f_c per class
    (initialised to 1) is trained like cRT; logits_c = f_c * z_c with z the stage-1 head's
    own logits: w_c . a + b_c for a linear head, s * cos(w_c, a) for a cosine head
    (``init_cosine_scale`` = s).
``tau_norm``
    w_c / ||w_c||^tau, no training. Decision (Kang et al.'s implementation): the stage-1
    bias is dropped. tau = cfg.tau, or when None the best of 0, 0.1, ..., 2.0 by accuracy on
    ``val`` (ties: smaller tau); without ``val``, tau = 1 with a warning. Never pass the test
    set as ``val``. A cosine stage-1 head is an error: it normalises its weights, so every
    tau gives back the stage-1 model.
``ncm``
    nearest class mean: logits are the cosine similarities between the L2-normalised
    feature and the class means of the L2-normalised training features.

Everything random (initialisation, sampling, augmentation) derives from ``seed`` through
private generators, so the same inputs and seed give the same module on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..augment.base import AugmentContext, FeatureAugmenter
from ..augment.stg import head_classes as _head_classes
from ..data.classes import check_features, class_means
from ..data.samplers import build_sampler
from ..engine.device import autocast
from ..errors import ConfigError, DataError, TailaugError
from ..models.heads import head_logits
from ..registry import CLASSIFIERS

log = logging.getLogger(__name__)

TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))
TAU_NORM_COSINE = (
    "retrain.method = tau_norm rescales the norms of the stage-1 weights, but a cosine head "
    "(model.head: cosine) normalises them, so every tau gives back the stage-1 model; use "
    "retrain.method lws or crt, or train stage 1 with model.head: linear"
)


# --------------------------------------------------------------------------- classifiers


class LinearClassifier(nn.Linear):
    """The cRT classifier: a plain linear layer."""


class LWSClassifier(nn.Module):
    """Frozen stage-1 classifier (linear, or cosine with ``cosine_scale``) with a learnt per-class scale f_c."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, cosine_scale: float | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.cosine_scale = None if cosine_scale is None else float(cosine_scale)
        self.scales = nn.Parameter(torch.ones(weight.shape[0]))

    @property
    def effective_weight(self) -> torch.Tensor:
        return self.scales.detach()[:, None] * self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_logits(x, self.weight, self.bias, self.cosine_scale) * self.scales

    def extra_repr(self) -> str:
        return "linear" if self.cosine_scale is None else f"cosine_scale={self.cosine_scale}"


class TauNormClassifier(nn.Module):
    """Linear classifier with weights w_c / ||w_c||^tau (and an optional bias, None by default)."""

    def __init__(self, weight: torch.Tensor, tau: float, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().float()
        norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.tau = float(tau)
        self.register_buffer("weight", weight / norms.pow(self.tau))
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class NCMClassifier(nn.Module):
    """Cosine similarity to the class means of L2-normalised training features."""

    EMPTY_LOGIT = -2.0  # below every cosine: a class without training samples is never predicted

    def __init__(self, means: torch.Tensor, present: torch.Tensor):
        super().__init__()
        self.register_buffer("means", F.normalize(means.float(), dim=1))
        self.register_buffer("present", present.bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(x.float(), dim=1) @ self.means.T
        return torch.where(self.present, cos, torch.full_like(cos, self.EMPTY_LOGIT))


# --------------------------------------------------------------------------- helpers


def accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model`` on (features, labels)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, features.shape[0], batch_size):
            logits = model(features[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(1, features.shape[0])


def _as_inputs(features, labels, num_classes: int, what: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = check_features(features, labels, num_classes, what)
    return x.to(device), y.to(device)


def _stage1(init_weight, init_bias, init_cosine_scale, num_classes: int, dim: int, method: str, device):
    if init_weight is None:
        raise ConfigError(
            f"retrain.method = {method} needs the stage-1 classifier weights (init_weight); "
            "use method crt or ncm when they are not available"
        )
    if init_cosine_scale is not None and method == "tau_norm":
        raise ConfigError(TAU_NORM_COSINE)
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
) -> nn.Module:
    """Stage 3 on cached features; returns a module (eval mode) mapping [N, d] -> [N, C].

    ``cfg`` is a :class:`~tailaug.config.RetrainConfig`. ``class_counts`` [C] are the
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
    ``dtype`` (None: float32; the loss and every evaluation are float32).
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
        progress=progress, device=device, head_classes=head_classes, dtype=dtype,
    )
    model = CLASSIFIERS.get(cfg.method).obj(inputs)
    model.history = getattr(model, "history", [])
    model.choices = getattr(model, "choices", {})
    return model.eval()


@dataclasses.dataclass
class Stage3Inputs:
    """What a decoupled classifier's fit function receives (all tensors on ``device``)."""

    x: torch.Tensor
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


TRAINED = ("epochs", "batch_size", "lr", "weight_decay", "sampler", "augmenter", "seed")


@CLASSIFIERS.register("crt", label="cRT", reads=TRAINED)
def _fit_crt(inp: Stage3Inputs) -> nn.Module:
    model = LinearClassifier(inp.dim, inp.num_classes)
    _init_linear(model, inp.seed)
    return _fit_trained(model, inp)


@CLASSIFIERS.register("lws", label="LWS", reads=TRAINED)
def _fit_lws(inp: Stage3Inputs) -> nn.Module:
    return _fit_trained(LWSClassifier(*inp.stage1(), inp.init_cosine_scale), inp)


def _tau_norm_needs_a_linear_head(cfg) -> None:
    if cfg.model.head == "cosine":
        raise ValueError(
            "retrain.method = tau_norm rescales the norms of the stage-1 weights, but model.head: "
            "cosine normalises them, so every tau gives back the stage-1 model; use retrain.method "
            "lws or crt, or model.head: linear"
        )


@CLASSIFIERS.register("tau_norm", label="tau-norm", check=_tau_norm_needs_a_linear_head, reads=("tau",))
def _fit_tau_norm_method(inp: Stage3Inputs) -> nn.Module:
    inp.ignore_augmenter()
    return _fit_tau_norm(inp.stage1()[0], inp.cfg.tau, inp.val_xy)


@CLASSIFIERS.register("ncm", label="NCM")
def _fit_ncm_method(inp: Stage3Inputs) -> nn.Module:
    inp.ignore_augmenter()
    return _fit_ncm(inp.x, inp.y, inp.num_classes)


def _fit_trained(model: nn.Module, inp: Stage3Inputs) -> nn.Module:
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
            )
        )
    model.history = _train(model, inp.x, inp.y, inp.cfg, inp.num_classes, inp.seed, augmenter, inp.val_xy,
                           inp.progress, inp.device, inp.dtype)
    model.choices = {"seed": inp.seed}
    return model


def _init_linear(layer: nn.Linear, seed: int) -> None:
    """PyTorch's default nn.Linear initialisation, drawn from a private seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)


def _train(model, x, y, cfg, num_classes, seed, augmenter, val_xy, progress, device, dtype) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if augmenter is not None:
        augmenter.to(device).train()
    optimiser = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sampler = build_sampler(cfg.sampler, y.cpu(), num_classes, seed=seed, total_epochs=cfg.epochs)
    aug_rng = torch.Generator(device=device).manual_seed(seed + 1)
    history: list[dict] = []
    bar = tqdm(range(cfg.epochs), desc=f"stage 3 ({cfg.method})", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        sampler.set_epoch(epoch)
        if augmenter is not None:
            augmenter.set_epoch(epoch, cfg.epochs)
        order = torch.as_tensor(list(sampler), dtype=torch.long, device=device)
        total, seen = 0.0, 0
        for start in range(0, order.numel(), cfg.batch_size):
            b = order[start : start + cfg.batch_size]
            xb, yb = x[b], y[b]
            if augmenter is not None:
                xb, yb = augmenter(xb, yb, generator=aug_rng)
            with autocast(device, dtype):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            if not torch.isfinite(loss):
                raise TailaugError(f"the stage-3 loss became {loss.item()} in epoch {epoch + 1}; lower "
                                   "retrain.lr or the augmentation strength (e.g. retrain.augmenter.lam)")
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            total += float(loss.detach()) * yb.numel()
            seen += yb.numel()
        record = {"epoch": epoch, "loss": total / max(1, seen)}
        if val_xy is not None:
            model.eval()
            record["val_acc"] = accuracy(model, *val_xy)
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
    if augmenter is not None:
        augmenter.eval()
    return history


def _fit_tau_norm(weight: torch.Tensor, tau: float | None, val_xy) -> TauNormClassifier:
    """tau-norm with ``tau``, or chosen on ``val_xy``; ``choices`` says which and why."""
    scores = None
    if tau is not None:
        source = "retrain.tau"
    elif val_xy is None:
        log.warning(
            "tau_norm: retrain.tau is not set and there is no validation split, so tau = 1; set "
            "retrain.tau or data.val_per_class > 0 to choose it on validation data (never on the test set)"
        )
        tau, source = 1.0, "default (no validation split)"
    else:
        scores = {t: accuracy(TauNormClassifier(weight, t), *val_xy) for t in TAU_GRID}
        tau, source = max(TAU_GRID, key=lambda t: (scores[t], -t)), "validation split"
        log.info("tau_norm: tau = %.1f chosen on the validation split (accuracy %.4f)", tau, scores[tau])
    model = TauNormClassifier(weight, tau)
    model.tau_scores = scores
    model.choices = {"tau": tau, "tau_from": source,
                     "tau_scores": None if scores is None else {f"{t:.1f}": s for t, s in scores.items()}}
    return model


def _fit_ncm(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> NCMClassifier:
    present = torch.bincount(y, minlength=num_classes) > 0
    if not bool(present.all()):
        log.warning("ncm: class(es) %s have no training sample and are never predicted", (~present).nonzero().flatten().tolist())
    return NCMClassifier(class_means(F.normalize(x, dim=1), y, num_classes), present).to(x.device)
