"""Seeding: every random draw in tailaug comes from a seed in the config."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def torch_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from a tuple of integers (e.g. seed, epoch), stable across runs."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
