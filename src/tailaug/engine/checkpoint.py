"""Atomic checkpoint writes and safe loads (``weights_only=True`` or safetensors)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A reader sees the old file or the new one, never a half-written one. The file is made
    readable by everyone (0644), as run outputs are meant to be shared: the mode is set after
    ``write``, which may replace the temporary file (safetensors' ``save_file`` does, 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX; Windows has no directory handles to sync)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: dict) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def exception_summary(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` in one line of at most ``limit`` characters (a message's first line,
    or its first two when the first only introduces the second), for one-line errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    summary = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


REPLACE = "replace it with an intact copy"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, fix: str = REPLACE) -> Any:
    """What ``torch.save`` wrote to ``path``, loaded with ``weights_only=True``; a
    CheckpointError that names the file and ``fix`` when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the run directory")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # empty or truncated zip, wrong format, disallowed global
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({exception_summary(exc)}); it is truncated or not a "
            f"tailaug checkpoint: {fix}"
        ) from None


def load_state(target: Any, state: Any, path: str | Path, fix: str = REPLACE) -> None:
    """``target.load_state_dict(state)`` (a module, optimizer or grad scaler); a CheckpointError
    naming ``path`` and ``fix`` when the state saved there does not fit ``target``."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CheckpointError(
            f"the {type(target).__name__} state in {path} does not fit ({exception_summary(exc)}); {fix}"
        ) from None


def load_tensors(path: str | Path, *, fix: str = REPLACE) -> dict:
    """Tensors from a .safetensors file or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; give a local .safetensors or .pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({exception_summary(exc)}); {fix}"
            ) from None
    state = load_checkpoint(path, fix=fix)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors; {fix}")
    return state
