"""Run directories: a safe name, a writable place, one command at a time.

``run.name`` names one directory under ``run.output_dir``; it must be a plain name, so a
run never writes outside ``output_dir`` or straight into it. A command that writes holds an
advisory lock (``fcntl.flock`` on ``<run dir>/.lock``, which records its process id): a
second command on the same run directory fails at once instead of training on top of the
first. A command that created the directory and then fails leaves no empty directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator

from ..errors import TailaugError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

LOCK_NAME = ".lock"
MAX_NAME = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,@-]*")


def check_run_name(name: str) -> str:
    if len(name) <= MAX_NAME and _NAME.fullmatch(name):
        return name
    shown = repr(name) if len(name) <= 60 else repr(name[:60]) + f"... ({len(name)} characters)"
    raise TailaugError(
        f"run.name {shown} is not a plain directory name; use 1-{MAX_NAME} letters, digits and . _ - + = , @ "
        "(starting with a letter or digit), e.g. run.name=fmnist_ce_s0: it names the run's directory "
        "under run.output_dir"
    )


def run_dir_path(output_dir: str, name: str) -> Path:
    """``output_dir/name`` with ``name`` checked by :func:`check_run_name`."""
    return Path(output_dir) / check_run_name(name)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@contextlib.contextmanager
def open_run_dir(run_dir: str | Path, *, create: bool, lock: bool = True) -> Iterator[Path]:
    """Hold ``run_dir`` for one command (created first when ``create``).

    Raises a one-line :class:`TailaugError` when the directory cannot be created or written,
    or when another command holds it. When this call created the directory and the command
    fails, the directory is removed again if the command left nothing in it.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TailaugError(f"{run_dir} exists and is not a directory; choose another run.name or "
                           "run.output_dir (nothing was changed)")
    created = False
    if create and not run_dir.exists():
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            pass  # made by another process meanwhile: the lock below decides
        except (OSError, ValueError) as exc:
            reason = _reason(exc) if isinstance(exc, OSError) else str(exc)
            raise TailaugError(f"cannot create the run directory {run_dir} ({reason}); set run.output_dir "
                               "to a directory you can write to") from None
        else:
            created = True
    fd = None
    if lock:
        fd = _acquire(run_dir, created)
    try:
        yield run_dir
    except BaseException:
        if created:
            _remove_if_empty(run_dir)
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _acquire(run_dir: Path, created: bool) -> int:
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if created:
            _remove_if_empty(run_dir)
        raise TailaugError(f"cannot write in the run directory {run_dir} ({_reason(exc)}); set "
                           "run.output_dir to a directory you can write to (nothing was changed)") from None
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return fd  # the file system has no locks: go on unlocked
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" (process {holder})" if holder.isdigit() else ""
        raise TailaugError(f"{run_dir} is in use by another tailaug command{who}; wait for it to finish, "
                           "or give this command another run.name (nothing was changed)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _remove_if_empty(run_dir: Path) -> None:
    """Remove a directory a failed command created, when it holds only the lock file."""
    with contextlib.suppress(OSError):
        entries = {p.name for p in run_dir.iterdir()}
        if entries <= {LOCK_NAME}:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            run_dir.rmdir()
