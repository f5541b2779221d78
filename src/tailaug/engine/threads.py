"""CPU threads of a process: how many, and how idle OpenMP threads wait.

PyTorch's CPU kernels run on an OpenMP pool (GNU libgomp in the Linux wheels; Intel's in
some builds). By default an idle pool thread spins for a while before it sleeps; with
several PyTorch processes on a few cores the spinning threads take the cores from the
threads doing work, and a run slows down many times over (benchmarks/README.md,
``shared_machine.py``). The CLI therefore asks for a passive wait policy, and every command
sets the intra-op thread count from ``run.threads``.

This module imports torch only inside :func:`apply_threads`, so that
:func:`set_passive_wait` can run before the OpenMP runtime starts.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# GNU libgomp reads OMP_WAIT_POLICY, Intel's OpenMP KMP_BLOCKTIME (ms of spinning), once at start-up.
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def set_passive_wait(environ: MutableMapping[str, str] = os.environ) -> None:
    """Let idle OpenMP threads sleep instead of spinning; values already set win.

    Effective only before torch is imported (the OpenMP runtime reads them when it loads),
    which is why the CLI entry point calls it first; child processes inherit it.
    """
    for key, value in PASSIVE_WAIT.items():
        environ.setdefault(key, value)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not all the machine's cores."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(environ: MutableMapping[str, str] = os.environ, cores: int | None = None) -> int:
    """``run.threads`` when unset: OMP_NUM_THREADS when set, else the available cores shared
    by the processes torchrun started on this machine (LOCAL_WORLD_SIZE)."""
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = available_cores() if cores is None else cores
    local = environ.get("LOCAL_WORLD_SIZE", "").strip()
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, cores // processes)


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads`); returns it."""
    import torch

    n = threads if threads is not None else default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
