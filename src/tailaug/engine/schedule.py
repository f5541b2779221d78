"""Learning-rate schedules: linear warm-up, then multistep, step or cosine decay."""

from __future__ import annotations

import math

from ..config import TrainConfig


def cosine(lr: float, t: float, min_lr: float = 0.0) -> float:
    """The cosine decay from ``lr`` at t = 0 to ``min_lr`` at t = 1."""
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def lr_at(cfg: TrainConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The learning rate for ``step`` (0-based) of ``epoch`` (0-based)."""
    progress = epoch + step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch * steps_per_epoch + step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (epoch // cfg.step_size)
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    t = (progress - cfg.warmup_epochs) / span
    return cosine(cfg.lr, t, cfg.min_lr)
