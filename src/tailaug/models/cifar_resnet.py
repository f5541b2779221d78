"""ResNets for 32x32 images (He et al. 2016, section 4.2): 3 stages of n basic blocks,
16/32/64 channels, identity shortcuts with zero-padded channels (option A).
ResNet-32 has n = 5 and about 0.46M parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import BACKBONES


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Backbone only: returns globally pooled features of size 64."""

    def __init__(self, depth: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = 64
        self.stage_channels = (16, 32, 64)  # the maps after each stage (models.stage_forward)
        self.stage_ends = (n, 2 * n, 3 * n)  # the stages' last blocks (one flat Sequential keeps the weight names)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def spatial_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature maps [N, 64, h, w]; their spatial mean is :meth:`forward`."""
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.spatial_maps(x), 1), 1)

    def forward_stages(self, x: torch.Tensor, stage: int, fn) -> torch.Tensor:
        """:meth:`forward` with ``fn`` applied to the maps after ``stage`` (1-based)."""
        end = self.stage_ends[stage - 1]
        maps = fn(self.layers[:end](F.relu(self.bn1(self.conv1(x)))))
        return torch.flatten(F.adaptive_avg_pool2d(self.layers[end:](maps), 1), 1)


for _depth in (20, 32, 44, 56, 110):
    BACKBONES.register(f"resnet{_depth}")(lambda in_channels, depth=_depth: CifarResNet(depth, in_channels))
