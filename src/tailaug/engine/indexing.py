"""Row selection whose backward is deterministic on the CPU."""

from __future__ import annotations

import torch


def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` (rows of ``values`` by an integer tensor of any shape) through
    ``index_select``, whose backward (an index_add) is deterministic on the CPU. The backward of
    advanced indexing (``index_put_`` with accumulate) is not, unless
    ``torch.use_deterministic_algorithms`` is on: with it, resumed RSG runs drifted from
    uninterrupted ones. Use it wherever a gradient flows through gathered rows."""
    return values.index_select(0, index.reshape(-1)).view(*index.shape, *values.shape[1:])
