"""Models: a backbone that returns pooled features and a head that maps them to logits."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig
from ..engine.checkpoint import load_tensors
from ..errors import CheckpointError, ConfigError
from ..registry import BACKBONES
from .heads import CosineHead, LinearHead, build_head

__all__ = ["Network", "Output", "build_model", "spatial_maps", "CosineHead", "LinearHead", "build_head"]


class Output(NamedTuple):
    features: torch.Tensor  # [N, d] after global pooling
    logits: torch.Tensor  # [N, C]


class Network(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = backbone.feature_dim

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> Output:
        """Features of ``x`` and logits; ``extra`` feature rows (e.g. virtual features of a
        stage-1 feature augmenter) go through the head in the same pass, their logits after
        those of ``x``."""
        features = self.backbone(x)
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


def build_backbone(arch: str, in_channels: int) -> nn.Module:
    """The backbone registered as ``arch`` (``tailaug.registry.BACKBONES``), with ``feature_dim``."""
    return BACKBONES.get(arch).obj(in_channels)


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> Network:
    """The network for images of ``in_channels`` channels (model.in_channels may only agree)."""
    if cfg.in_channels is not None and cfg.in_channels != in_channels:
        raise ConfigError(
            f"model.in_channels is {cfg.in_channels} but the dataset's images have {in_channels} "
            f"channel(s); set model.in_channels={in_channels} or remove it (it defaults to the dataset's)"
        )
    backbone = build_backbone(cfg.arch, in_channels)
    if cfg.weights:
        load_backbone_weights(backbone, cfg.weights)
    return Network(backbone, build_head(cfg.head, backbone.feature_dim, num_classes, cfg.cosine_scale))


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load backbone weights from a local file (safetensors or a torch state dict).

    A classifier (``fc.*``/``head.*``) in the file is ignored and a ``module.``/``backbone.``
    prefix is stripped, so torchvision ImageNet weights and tailaug checkpoints both load.
    """
    state = load_tensors(path)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    cleaned = {}
    for key, value in state.items():
        key = str(key)
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith(("fc.", "head.")):
            cleaned[key] = value
    own = backbone.state_dict()
    missing = sorted(set(own) - set(cleaned))
    mismatched = [k for k in own if k in cleaned
                  and (not isinstance(cleaned[k], torch.Tensor) or cleaned[k].shape != own[k].shape)]
    if missing or mismatched:
        raise CheckpointError(
            f"weights in {path} do not fit this backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), shape mismatch in {mismatched[:3]}; check model.arch and model.in_channels"
        )
    backbone.load_state_dict({k: cleaned[k] for k in own})
