"""File paths held as one bytes buffer and int64 offsets, decoded one at a time.

A Python list of 437,513 str (iNaturalist 2018's training split) is 437,513 objects; with
forked DataLoader workers reference counting writes to every one of them, so each worker
ends up with its own copy of the pages. A :class:`PathTable` is two numpy arrays (the
concatenated ``os.fsencode`` bytes and the offsets of each path into them), which workers
share with the parent. Offsets rather than a fixed-width ``np.bytes_`` array: they cost 8
bytes a path whatever the lengths, where fixed width pads every path to the longest one. The
paths' common prefix (the data root, e.g. ``/data/inat2018/train_val2018/``) is held once.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


class PathTable(Sequence):
    """A read-only sequence of str paths: ``table[i]`` decodes path i (``os.fsdecode``, so any
    name the file system returned round-trips), a slice gives a list of str."""

    __slots__ = ("prefix", "data", "offsets")

    def __init__(self, paths: Iterable[str | os.PathLike]):
        encoded = [os.fsencode(p) for p in paths]  # transient: freed when the buffer is built
        self.prefix = os.path.commonprefix(encoded) if encoded else b""
        k = len(self.prefix)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(e) - k for e in encoded), dtype=np.int64, count=len(encoded)),
                  out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(e[k:] for e in encoded), dtype=np.uint8)  # read-only, one object

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        i %= n
        return os.fsdecode(self.prefix + self.data[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return len(self.prefix) + self.data.nbytes + self.offsets.nbytes

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths, {self.nbytes:,} bytes)"
