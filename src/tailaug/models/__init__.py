"""Models: a backbone that returns pooled features and a head that maps them to logits."""

from __future__ import annotations

import contextlib

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig
from ..engine.checkpoint import load_tensors
from ..errors import CheckpointError, ConfigError
from ..registry import BACKBONES
from .heads import CosineHead, LinearHead, build_head
from .pretrained import InputSpec, convert_layout, resolve_weights

__all__ = ["Network", "Output", "build_model", "input_spec", "InputSpec", "spatial_maps", "stage_channels",
           "stage_forward", "CosineHead", "LinearHead", "build_head"]


class Output(NamedTuple):
    features: torch.Tensor  # [N, d] after global pooling
    logits: torch.Tensor  # [N, C]
    # rows a training-time module generated inside the network (models/stage_modules.py): their labels
    # (features and logits hold them after the input's rows) and its extra loss term; None: none
    labels: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class Network(nn.Module):
    """backbone + head. ``frozen``: the backbone keeps its weights and BatchNorm statistics
    (eval mode, no gradients), so training changes the head alone."""

    def __init__(self, backbone: nn.Module, head: nn.Module, frozen: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = backbone.feature_dim
        self.frozen = frozen
        if frozen:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None, at_stage=None) -> Output:
        """Features of ``x`` and logits; ``extra`` feature rows (e.g. virtual features of a
        stage-1 feature augmenter) go through the head in the same pass, their logits after
        those of ``x``. ``at_stage`` = (stage, fn): ``fn`` maps the backbone's maps after that
        stage (1-based) before the later stages run (:func:`stage_forward`). A frozen backbone
        runs without autograd."""
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            features = self.backbone(x) if at_stage is None else stage_forward(self.backbone, x, *at_stage)
        if extra is None:
            return Output(features, self.head(features))
        return Output(features, self.head(torch.cat([features, extra.to(features.dtype)])))


def spatial_maps(backbone: nn.Module, x: torch.Tensor, arch: str = "") -> torch.Tensor:
    """The maps of the backbone's last convolutional stage [N, d, h, w], whose spatial mean is
    its pooled feature (what class activation maps are computed on). A backbone offers them
    through a ``spatial_maps(x)`` method; one without it is a ConfigError."""
    fn = getattr(backbone, "spatial_maps", None)
    if fn is None:
        name = f"model.arch {arch}" if arch else f"the backbone {type(backbone).__name__}"
        raise ConfigError(
            f"{name} has no spatial feature maps (no spatial_maps method), which class activation maps "
            "need; use a ResNet backbone (resnet32, resnet18, ...) or another retrain.augmenter"
        )
    return fn(x)


def stage_channels(backbone: nn.Module, arch: str = "") -> tuple[int, ...]:
    """The channels of the maps after each stage of a backbone that exposes its stages (a
    ``stage_channels`` tuple and a ``forward_stages(x, stage, fn)`` method); a ConfigError otherwise."""
    channels = getattr(backbone, "stage_channels", None)
    if channels is None or not hasattr(backbone, "forward_stages"):
        name = f"model.arch {arch}" if arch else f"the backbone {type(backbone).__name__}"
        raise ConfigError(f"{name} exposes no stages (no stage_channels/forward_stages), which train.stage_module "
                          "needs; use a CIFAR or torchvision ResNet backbone (resnet32, resnet18, ...) or remove "
                          "train.stage_module")
    return tuple(channels)


def stage_forward(backbone: nn.Module, x: torch.Tensor, stage: int, fn) -> torch.Tensor:
    """The pooled features of ``x`` with ``fn`` applied to the maps after ``stage`` (1-based);
    ``fn`` may return more rows than it gets (generated samples), which the later stages carry."""
    count = len(stage_channels(backbone))
    if not 1 <= stage <= count:
        raise ConfigError(f"train.stage_module sits after stage {stage}, and {type(backbone).__name__} has stages "
                          f"1..{count}; set stage to one of them")
    return backbone.forward_stages(x, stage, fn)


def build_backbone(arch: str, in_channels: int, cfg: ModelConfig | None = None) -> nn.Module:
    """The backbone registered as ``arch`` (``tailaug.registry.BACKBONES``), with ``feature_dim``;
    the options its entry ``reads`` (``model.name``, ...) come from ``cfg``."""
    entry = BACKBONES.get(arch)
    options = {key: getattr(cfg, key) for key in entry.reads} if cfg is not None else {}
    return entry.obj(in_channels, **options)


def input_spec(module: nn.Module) -> InputSpec | None:
    """What a pretrained backbone (of a Network or itself) expects of its input; None: the dataset's own."""
    backbone = getattr(module, "backbone", module)
    return getattr(backbone, "input_spec", None)


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> Network:
    """The network for images of ``in_channels`` channels (model.in_channels may only agree)."""
    if cfg.in_channels is not None and cfg.in_channels != in_channels:
        raise ConfigError(
            f"model.in_channels is {cfg.in_channels} but the dataset's images have {in_channels} "
            f"channel(s); set model.in_channels={in_channels} or remove it (it defaults to the dataset's)"
        )
    backbone = build_backbone(cfg.arch, in_channels, cfg)
    if cfg.weights:
        path = resolve_weights(cfg.arch, cfg.name, cfg.weights, hub_files=getattr(backbone, "hub_files", list))
        loaded, ignored = load_backbone_weights(backbone, path)
        print(f"model: {loaded} backbone tensors loaded from {path}"
              + (f" (not used: {', '.join(ignored[:4])}{' ...' if len(ignored) > 4 else ''})" if ignored else ""))
    head = build_head(cfg.head, backbone.feature_dim, num_classes, cfg.cosine_scale)
    return Network(backbone, head, frozen=cfg.mode == "frozen")


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> tuple[int, list[str]]:
    """Load backbone weights from a local file (safetensors or a torch state dict); returns the
    number of tensors loaded and the file's keys the backbone has no place for (its classifier).

    A ``module.``/``backbone.`` prefix is stripped and a known foreign layout renamed
    (``models.pretrained.LAYOUTS``), so torchvision and timm ImageNet weights, the
    EfficientNet-Lite0 package's file and tailaug checkpoints all load. Every tensor of the
    backbone must come from the file, with its shape: none is left at its initial value.
    """
    BACKBONES.names()  # the layouts register with the backbones' modules
    state = load_tensors(path)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    cleaned = {}
    for key, value in state.items():
        key = str(key)
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        cleaned[key] = value
    own = backbone.state_dict()
    cleaned = convert_layout(cleaned, list(own))
    missing = sorted(set(own) - set(cleaned))
    mismatched = [k for k in own if k in cleaned
                  and (not isinstance(cleaned[k], torch.Tensor) or cleaned[k].shape != own[k].shape)]
    if missing or mismatched:
        raise CheckpointError(
            f"weights in {path} do not fit this backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), shape mismatch in {mismatched[:3]}; check model.arch and model.in_channels"
        )
    backbone.load_state_dict({k: cleaned[k] for k in own})
    return len(own), sorted(set(cleaned) - set(own))
