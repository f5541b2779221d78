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


_WORD = 1 << 64


def _signed(value: int) -> int:
    return value - _WORD if value >= _WORD >> 1 else value


def _halves(value: int) -> list[int]:
    """A 128-bit integer as two int64 words (high, low), two's complement."""
    return [_signed(value >> 64), _signed(value & (_WORD - 1))]


def _joined(high: int, low: int) -> int:
    return ((high % _WORD) << 64) | (low % _WORD)


def stream_state(generators: list[torch.Generator], rng: np.random.Generator) -> torch.Tensor:
    """The states of ``generators`` and of the numpy generator ``rng`` (PCG64, ``default_rng``)
    packed in one int64 vector on the CPU (a tensor, so processes can gather it and a
    checkpoint holds it under ``weights_only``); :func:`set_stream_state` restores them."""
    parts = []
    for gen in generators:
        state = gen.get_state()
        parts.append(torch.cat([state, state.new_zeros(-len(state) % 8)]).view(torch.int64))
    state = rng.bit_generator.state
    if state["bit_generator"] != "PCG64":
        raise TypeError(f"stream_state packs PCG64 numpy generators, not {state['bit_generator']}")
    words = [*_halves(state["state"]["state"]), *_halves(state["state"]["inc"]),
             int(state["has_uint32"]), int(state["uinteger"])]
    return torch.cat([*parts, torch.tensor(words, dtype=torch.int64)])


def set_stream_state(packed: torch.Tensor, generators: list[torch.Generator], rng: np.random.Generator) -> None:
    """Set ``generators`` and ``rng`` to the states :func:`stream_state` packed; a ValueError
    when ``packed`` does not fit them (other generators, e.g. saved on another device type)."""
    packed, at, states = packed.cpu(), 0, []
    for gen in generators:
        size = gen.get_state().numel()
        words = -(-size // 8)
        states.append(packed[at : at + words].clone().view(torch.uint8)[:size].clone())
        at += words
    if at + 6 != packed.numel():
        raise ValueError(f"the packed streams hold {packed.numel()} words, and these generators need {at + 6}")
    for gen, state in zip(generators, states):
        gen.set_state(state)
    w = packed[at:].tolist()
    rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": _joined(w[0], w[1]),
                                                                   "inc": _joined(w[2], w[3])},
                               "has_uint32": w[4], "uinteger": w[5]}
