"""torchvision ResNets/ResNeXt as feature extractors (the fc layer removed)."""

from __future__ import annotations

import torchvision
from torch import nn

from ..registry import BACKBONES

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d")


def torchvision_backbone(arch: str, in_channels: int = 3) -> nn.Module:
    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


for _arch in ARCHS:
    BACKBONES.register(_arch)(lambda in_channels, arch=_arch: torchvision_backbone(arch, in_channels))
