"""Distributed data parallel through torchrun (NCCL on CUDA, gloo on the CPU).

Every collective here takes tensors on the process's device (NCCL reduces only CUDA
tensors) of a dtype in :data:`COLLECTIVE_DTYPES`, which both NCCL and gloo support.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# float64 keeps sums of counts and losses exact; NCCL supports all three (not bool).
COLLECTIVE_DTYPES = (torch.float32, torch.float64, torch.int64)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), local_rank()
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    return DistInfo(rank, world, local)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_active() -> bool:
    """True inside an initialised process group (the collectives here then communicate)."""
    return _active()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (a tensor on the process's device)."""
    if _active():
        dist.all_reduce(tensor)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0 (rank order)."""
    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each forward pass, so after the last training step
    every rank holds its own update; evaluating in shards needs one model everywhere: rank 0's,
    the one its checkpoint holds.
    """
    if _active():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """The indices of ``n`` items that ``rank`` handles: a contiguous block of ceil(n / world_size).

    The last blocks are padded with indices from the start (modulo ``n``), so every rank
    holds the same number of rows for :func:`all_gather_cat`, and the first ``n`` rows of
    the gathered result are items 0 .. n-1 in order.
    """
    per = -(-n // world_size)
    return np.arange(rank * per, (rank + 1) * per) % max(n, 1)


def barrier() -> None:
    if not _active():
        return
    if dist.get_backend() == "nccl":  # tell NCCL which GPU this rank uses instead of letting it guess
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()

