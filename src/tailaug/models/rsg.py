"""RSG, the rare-class sample generator (Wang et al., CVPR 2021), as a stage module.

After a backbone stage, with the batch's maps x_i [C, H, W] (flattened to D = C*H*W) and labels y_i:

- Centres (centre estimation module): each class has K centres. Sample i is softly assigned
  to the K centres of its class, gamma_i = softmax(pool(x_i) A_{y_i}) with a learnt A_c [C, K];
  centre k of class c is the gamma-weighted mean of the class's maps in the batch,
  c_{c,k} = sum_{y_i=c} gamma_ik x_i / sum_{y_i=c} gamma_ik (re-estimated from every batch).
- CESC loss: sum_k gamma_ik ||x_i - c_{y_i,k}||^2 / D (batch mean), plus the cross-entropy
  of the contrastive module, which predicts from the two maps of a pair (i, i+1 of the batch,
  cyclically) whether they share a class.
- Generation (from ``start_epoch`` on): the classes are frequent (the ``frequent_share``
  most frequent of the training set) or rare. A displacement is a sample minus its nearest
  centre of its class, d_i = x_i - c_{y_i,k*}. The j-th rare sample of the batch gets the
  displacement of the (j mod F)-th frequent sample f(j); the new sample
  x_new = x_rare + T(d_f(j)), T the vector transformation module (a 3x3 convolution), keeps
  the rare label and goes through the rest of the network.
- MV (maximised vector) loss, per new sample: (1 - cos(T(d_f), d_rare)) + |‖T(d_f)‖ - ‖d_f‖| / sqrt(D):
  the transferred displacement points away from the rare centre along the rare sample's own
  displacement (enlarging the rare class's region) and keeps the frequent displacement's size.

Published values (the authors' CIFAR code): after stage 2 of ResNet-32, 15 centres per class,
a contrastive module of 256 channels, the 30% most frequent classes as frequent, generation
from epoch 160 of 200 (epoch_thresh 159), loss = classification + 0.1 CESC + 0.01 MV.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..engine.indexing import pick
from ..registry import STAGE_MODULES, Section
from .stage_modules import StageModule


class RSGConfig(Section):
    name: Literal["rsg"]
    stage: int = 2  # after this backbone stage (1-based); published: stage 2 of ResNet-32
    centers: int = Field(15, ge=1)  # K centres per class (published n_center 15)
    contrastive_dim: int = Field(256, ge=1)  # channels of the contrastive module (published 256)
    frequent_share: float = Field(0.3, gt=0, lt=1)  # share of classes that are frequent (published 0.3)
    start_epoch: int = Field(160, ge=0)  # first epoch (0-based) that generates samples
    cesc_weight: float = Field(0.1, ge=0)  # published 0.1
    mv_weight: float = Field(0.01, ge=0)  # published 0.01


def frequent_classes(class_counts: list[int], share: float) -> torch.Tensor:
    """Bool [C]: the int(share * C) (at least 1) classes with the most training images (ties: lower id)."""
    num = max(1, int(share * len(class_counts)))
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    mask = torch.zeros(len(class_counts), dtype=torch.bool)
    mask[order[:num]] = True
    return mask


@STAGE_MODULES.register("rsg", config=RSGConfig, label="RSG")
class RSG(StageModule):
    def __init__(self, cfg: RSGConfig, channels: int, class_counts: list[int]):
        super().__init__(cfg.stage)
        self.cfg, self.num_classes, self.k = cfg, len(class_counts), cfg.centers
        self.register_buffer("frequent", frequent_classes(class_counts, cfg.frequent_share), persistent=False)
        self.assign = nn.Parameter(torch.randn(self.num_classes, channels, self.k) / math.sqrt(channels))
        self.contrastive = nn.Sequential(
            nn.Conv2d(2 * channels, cfg.contrastive_dim, 3, padding=1, bias=False), nn.BatchNorm2d(cfg.contrastive_dim),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cfg.contrastive_dim, 2),
        )
        self.transform = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def centres(self, maps: torch.Tensor, labels: torch.Tensor):
        """gamma [N, K], the centres [num_classes * K, D], each sample's squared distance to the
        K centres of its class [N, K] and those centres' rows in the centres [N, K]. The
        distances come from one [N, num_classes * K] product (no batch x centres x D tensor), in
        at least float32 also under autocast (|x|^2 - 2 x.c + |c|^2 cancels in 16 bits)."""
        n = len(maps)
        dtype = torch.promote_types(maps.dtype, torch.float32)
        with torch.autocast(maps.device.type, enabled=False):
            flat = maps.flatten(1).to(dtype)
            gamma = torch.softmax(torch.einsum("nc,nck->nk", maps.mean((2, 3)).to(dtype),
                                               self.assign.index_select(0, labels).to(dtype)), 1)
            weights = (F.one_hot(labels, self.num_classes).to(dtype)[:, :, None] * gamma[:, None, :]).reshape(n, -1)
            centres = (weights.T @ flat) / weights.sum(0).clamp_min(1e-12)[:, None]
            rows = labels[:, None] * self.k + torch.arange(self.k, device=labels.device)
            cross = (flat @ centres.T).gather(1, rows)
            dist = ((flat ** 2).sum(1, keepdim=True) - 2 * cross + pick((centres ** 2).sum(1), rows)).clamp_min(0)
        return gamma, centres, dist, rows

    def cesc_loss(self, maps, labels, gamma, dist) -> torch.Tensor:
        centre_term = (gamma * dist).sum(1).mean() / maps[0].numel()
        pairs = self.contrastive(torch.cat([maps, maps.roll(-1, 0)], 1))
        return centre_term + F.cross_entropy(pairs.float(), (labels == labels.roll(-1, 0)).long())

    def generate(self, maps, labels, displacement):
        """New rare samples [M, C, H, W], their labels, the transformed and raw frequent
        displacements and the rare ones; None when the batch lacks rare or frequent samples."""
        frequent = self.frequent[labels]
        rare_idx, freq_idx = torch.nonzero(~frequent).flatten(), torch.nonzero(frequent).flatten()
        if not len(rare_idx) or not len(freq_idx):  # the one host sync: the count sets the shapes
            return None
        partner = freq_idx[torch.arange(len(rare_idx), device=maps.device) % len(freq_idx)]
        d_freq = displacement.index_select(0, partner).view(-1, *maps.shape[1:])
        moved = self.transform(d_freq)
        return (maps.index_select(0, rare_idx) + moved, labels[rare_idx], moved, d_freq,
                displacement.index_select(0, rare_idx))

    @staticmethod
    def mv_loss(moved, d_freq, d_rare) -> torch.Tensor:
        moved, d_freq = moved.flatten(1), d_freq.flatten(1)
        direction = 1 - F.cosine_similarity(moved, d_rare.flatten(1), dim=1)
        size = (moved.norm(dim=1) - d_freq.norm(dim=1)).abs() / math.sqrt(moved.shape[1])
        return (direction + size).mean()

    def forward(self, maps: torch.Tensor, labels: torch.Tensor):
        gamma, centres, dist, rows = self.centres(maps, labels)
        loss = self.cfg.cesc_weight * self.cesc_loss(maps, labels, gamma, dist)
        if self.epoch < self.cfg.start_epoch:
            return maps, None, loss
        nearest = centres.index_select(0, rows.gather(1, dist.argmin(1, keepdim=True)).squeeze(1))
        made = self.generate(maps, labels, (maps.flatten(1) - nearest).to(maps.dtype))
        if made is None:
            return maps, None, loss
        new, new_labels, moved, d_freq, d_rare = made
        loss = loss + self.cfg.mv_weight * self.mv_loss(moved, d_freq, d_rare)
        return torch.cat([maps, new]), new_labels, loss
