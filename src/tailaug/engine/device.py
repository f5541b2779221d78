"""Device and numeric precision: no method logic here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import ConfigError

_announced: set[str] = set()


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device is 'cuda' but no CUDA device is visible; use run.device=auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return frozenset(value.split())
    return frozenset()


def cpu_autocast_dtype(flags: Iterable[str]) -> torch.dtype | None:
    """The fastest precision of CPU training, from the CPU's flags: bf16 only with AMX.

    Measured ResNet-32 training (benchmarks/README.md): with AMX bf16 autocast is about twice
    as fast as float32; with AVX-512 BF16 but no AMX it is slower (321 images/s against 415
    for float32, both channels_last), and without either much slower. A capability check rather than timed
    steps: it costs nothing and gives the same answer on a busy machine, where timings that
    other processes disturb could pick (and cache) the slower setting.
    """
    return torch.bfloat16 if "amx_bf16" in set(flags) else None


def resolve_precision(precision: str, device: torch.device, *, flags: Iterable[str] | None = None) -> torch.dtype | None:
    """The autocast dtype, or None for float32.

    'auto': on CUDA bf16 where supported, else fp16; on the CPU bf16 with AMX, else float32
    (:func:`cpu_autocast_dtype`; ``flags`` default to this CPU's). The choice of 'auto' is
    printed once per process.
    """
    if precision == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            why = "CUDA"
        else:
            flags = cpu_flags() if flags is None else frozenset(flags)
            dtype = cpu_autocast_dtype(flags)
            why = "a CPU with AMX" if dtype is not None else "a CPU without AMX, where bf16 is slower"
        message = f"train.precision auto: {precision_name(dtype)} on {why}"
        if message not in _announced:
            _announced.add(message)
            print(message)
        return dtype
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs CUDA; on the CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """The precision a resolved autocast dtype stands for ('fp32', 'bf16', 'fp16')."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
