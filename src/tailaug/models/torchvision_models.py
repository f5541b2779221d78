"""torchvision ResNets/ResNeXt as feature extractors (the fc layer removed)."""

from __future__ import annotations

import types

import torch
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
    net.spatial_maps = types.MethodType(_spatial_maps, net)
    # the maps after layer1..layer4 (models.stage_forward): each stage's last BatchNorm sets its channels
    net.stage_channels = tuple([m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
                               for layer in _stages(net))
    net.forward_stages = types.MethodType(_forward_stages, net)
    return net


def _stages(net) -> tuple[nn.Module, ...]:
    return net.layer1, net.layer2, net.layer3, net.layer4


def _forward_stages(net, x: torch.Tensor, stage: int, fn) -> torch.Tensor:
    """The pooled features with ``fn`` applied to the maps after ``stage`` (1-based)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    for i, layer in enumerate(_stages(net), 1):
        x = layer(x)
        if i == stage:
            x = fn(x)
    return torch.flatten(net.avgpool(x), 1)


def _spatial_maps(net, x: torch.Tensor) -> torch.Tensor:
    """The maps of layer4 [N, feature_dim, h, w]; their spatial mean is the pooled feature."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


for _arch in ARCHS:
    BACKBONES.register(_arch)(lambda in_channels, arch=_arch: torchvision_backbone(arch, in_channels))
