"""Row arrays [N, d] in memory-mappable shards: written a shard at a time, read by row.

An array is stored as ``<name>-00000.npy``, ``<name>-00001.npy``, ... of ``shard_rows`` rows
each (the last may hold fewer): plain .npy files, each written atomically, described by an
entry of its owner's JSON index, ``{"shape": [N, d], "dtype": "float16", "shards": [{"file":
..., "rows": ..., "bytes": ...}]}``.

- :class:`ShardWriter` takes rows batch by batch and holds at most one shard in memory.
- :class:`ShardedArray` maps the shards read-only (``mmap``) and hands out float32 rows as
  torch tensors on its ``device``: ``a[start:stop]``, ``a[index]`` (an integer tensor or
  array, or a boolean mask of the rows), :meth:`ShardedArray.tensor` (all of it, in memory).
  Nothing is read until asked for. Row ranges are read through the map, whose pages are
  handed back to the kernel (``madvise``) every ``RELEASE_BYTES`` (they stay in the page
  cache); rows by index are read with positional reads (``os.preadv``), which map nothing.
  So the process's resident set stays bounded on any number of rows.
- :func:`dense`: a tensor as it is, a :class:`ShardedArray` in memory.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from .checkpoint import atomic_write, exception_summary

# rows per pass of a streaming statistic (class means, ISDA's moments, test logits), and the
# default features.shard_rows: a 2,048-d float32 chunk is 512 MiB
CHUNK_ROWS = 65536
RELEASE_BYTES = 64 * 2**20  # mapped bytes read between two releases of the mapped pages
DTYPES = {"float32": np.float32, "float16": np.float16}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def shard_file(name: str, number: int) -> str:
    return f"{name}-{number:05d}.npy"


class ShardWriter:
    """Rows appended batch by batch, written as shards of ``shard_rows`` rows in ``dtype``
    ("float32" or "float16") to ``directory``; :meth:`close` writes the last one and returns
    the index entry."""

    def __init__(self, directory: str | Path, name: str, shard_rows: int, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ConfigError(f"the storage dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if shard_rows < 1:
            raise ConfigError(f"shard_rows must be at least 1, got {shard_rows}")
        self.directory, self.name, self.shard_rows, self.dtype = Path(directory), name, int(shard_rows), dtype
        self.block: np.ndarray | None = None  # the shard being filled
        self.filled = self.rows = 0
        self.width: int | None = None
        self.shards: list[dict] = []

    def append(self, rows) -> None:
        rows = rows.detach().float().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if rows.ndim != 2 or (self.width is not None and rows.shape[1] != self.width):
            raise ValueError(f"{self.name}: rows must be [B, {self.width or 'd'}], got shape {rows.shape}")
        if self.dtype == "float16" and rows.size:
            top = float(np.abs(rows[np.isfinite(rows)]).max(initial=0.0))
            if top > FLOAT16_MAX:
                raise ConfigError(f"{self.name} holds values up to {top:.4g}, beyond float16's {FLOAT16_MAX:.0f}; "
                                  "set features.dtype: float32")
        if self.block is None:
            self.width = int(rows.shape[1])
            self.block = np.empty((self.shard_rows, self.width), dtype=DTYPES[self.dtype])
        start = 0
        while start < len(rows):
            take = min(len(rows) - start, self.shard_rows - self.filled)
            self.block[self.filled : self.filled + take] = rows[start : start + take]
            self.filled += take
            start += take
            if self.filled == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        block = self.block[: self.filled]
        path = self.directory / shard_file(self.name, len(self.shards))

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.lib.format.write_array(fh, block, allow_pickle=False)

        atomic_write(path, write)
        self.shards.append({"file": path.name, "rows": int(self.filled), "bytes": path.stat().st_size})
        self.rows += self.filled
        self.filled = 0

    def close(self) -> dict:
        if self.filled:
            self._flush()
        self.block = None
        return {"shape": [self.rows, self.width or 0], "dtype": self.dtype, "shards": self.shards}


def _map_shard(path: Path, rows: int, width: int, dtype: str, size: int, fix: str) -> tuple:
    """(mmap or None, the rows as an array on it, the data's offset in the file) of the shard at
    ``path``, mapped read-only and checked against its index entry."""
    what = f"feature cache shard {path}"
    if not path.is_file():
        raise CheckpointError(f"{what} is missing; {fix}")
    found = path.stat().st_size
    if found != size:
        raise CheckpointError(f"{what} has {found:,} bytes where the index records {size:,} (truncated or "
                              f"overwritten); {fix}")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, stored = read(fh)
            offset = fh.tell()
            if shape != (rows, width) or fortran or stored != np.dtype(DTYPES[dtype]):
                raise CheckpointError(f"{what} holds {shape} {stored} where the index records ({rows}, {width}) "
                                      f"{dtype}; {fix}")
            if offset + rows * width * stored.itemsize != found:
                raise CheckpointError(f"{what} is truncated (its header promises {rows} rows); {fix}")
            if rows * width == 0:
                return None, np.zeros((rows, width), dtype=stored), offset
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged header
        raise CheckpointError(f"{what} is not a readable .npy file ({exception_summary(exc)}); {fix}") from None
    return mapped, np.ndarray((rows, width), dtype=stored, buffer=mapped, offset=offset), offset


class _Store:
    """The mapped shards of one array, shared by its views on other devices."""

    def __init__(self, directory: Path, name: str, entry: dict, fix: str):
        try:
            rows, width = (int(v) for v in entry["shape"])
            dtype, shards = entry["dtype"], entry["shards"]
            counts = [int(s["rows"]) for s in shards]
            files = [(Path(directory) / s["file"], int(s["bytes"])) for s in shards]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the index entry of {name} in {directory} is malformed "
                                  f"({exception_summary(exc)}); {fix}") from None
        if dtype not in DTYPES or sum(counts) != rows:
            raise CheckpointError(f"the index entry of {name} in {directory} is inconsistent (dtype {dtype!r}, "
                                  f"{sum(counts)} rows in shards for {rows}); {fix}")
        mapped = [_map_shard(path, n, width, dtype, size, fix) for (path, size), n in zip(files, counts)]
        self.mmaps = [m for m, _, _ in mapped if m is not None]
        self.arrays = [a for _, a, _ in mapped]
        self.offsets = np.array([o for _, _, o in mapped], dtype=np.int64)
        self.handles: list | None = None  # the shard files, opened for positional reads when first needed
        self.fix = fix
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape, self.dtype, self.files = (rows, width), dtype, [p for p, _ in files]
        self.row_bytes = width * np.dtype(DTYPES[dtype]).itemsize
        self.read_bytes = 0
        self.finite: bool | None = None

    def account(self, rows: int) -> None:
        self.read_bytes += rows * self.row_bytes
        if self.read_bytes >= RELEASE_BYTES:
            self.release()

    def pread(self, shard: int, into: memoryview, position: int) -> None:
        if self.handles is None:
            self.handles = [open(path, "rb", buffering=0) for path in self.files]  # noqa: SIM115 (kept open)
        if os.preadv(self.handles[shard].fileno(), [into], position) != len(into):
            raise CheckpointError(f"feature cache shard {self.files[shard]} ended early (truncated since it was "
                                  f"opened); {self.fix}")

    def release(self) -> None:
        """Hand the mapped pages back to the kernel (they stay in the page cache, and are read
        from there again when next asked for)."""
        self.read_bytes = 0
        if hasattr(mmap, "MADV_DONTNEED"):
            for m in self.mmaps:
                m.madvise(mmap.MADV_DONTNEED)


class ShardedArray:
    """A read-only [N, d] array in memory-mapped .npy shards (see the module). Rows come out
    as float32 tensors on ``device``; ``dtype`` is the storage dtype."""

    ndim = 2

    def __init__(self, store: _Store, device: torch.device | str = "cpu"):
        self._store, self.device = store, torch.device(device)

    @classmethod
    def open(cls, directory: str | Path, name: str, entry: dict, *, fix: str) -> "ShardedArray":
        """The array ``name`` of an index ``entry`` in ``directory``; a CheckpointError naming the
        shard and ``fix`` when a shard is missing, truncated or not what the index says."""
        return cls(_Store(Path(directory), name, entry, fix))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._store.shape)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self._store.dtype)

    @property
    def num_shards(self) -> int:
        return len(self._store.arrays)

    @property
    def files(self) -> list[Path]:
        return list(self._store.files)

    def __len__(self) -> int:
        return self._store.shape[0]

    def __repr__(self) -> str:
        return (f"ShardedArray(shape={tuple(self.shape)}, dtype={self._store.dtype}, shards={self.num_shards}, "
                f"device={self.device})")

    def to(self, device: torch.device | str) -> "ShardedArray":
        """The same mapped rows, handed out on ``device``."""
        return ShardedArray(self._store, device)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a ShardedArray takes slices with step 1")
            return self._out(self._range(start, max(start, stop)))
        index = key.cpu().numpy() if isinstance(key, torch.Tensor) else key
        if isinstance(index, np.ndarray) and index.ndim == 1 and index.dtype == bool and len(index) == len(self):
            index = np.flatnonzero(index)
        if isinstance(index, np.ndarray) and index.ndim == 1 and index.dtype.kind in "iu":
            return self._out(self._gather(index.astype(np.int64, copy=False)))
        raise TypeError("index a ShardedArray with a slice, a 1-D integer tensor of row numbers or a mask of "
                        f"its rows, not {type(key).__name__}")

    def _out(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(rows).to(self.device)

    def _range(self, start: int, stop: int) -> np.ndarray:
        s = self._store
        out = np.empty((stop - start, s.shape[1]), dtype=np.float32)
        first = int(np.searchsorted(s.starts, start, side="right")) - 1
        for k in range(max(first, 0), len(s.arrays)):
            lo, hi = max(start, s.starts[k]), min(stop, s.starts[k + 1])
            if lo >= hi:
                break
            out[lo - start : hi - start] = s.arrays[k][lo - s.starts[k] : hi - s.starts[k]]
            s.account(hi - lo)
        return out

    def _gather(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed), read in ascending order with positional
        reads, a run of consecutive rows at a time: unlike reads through the map, they add
        nothing to the resident set (a fault on a mapped file maps a whole large folio, up to
        2 MiB, per scattered row on Linux 6)."""
        s = self._store
        n = len(self)
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        index = np.where(index < 0, index + n, index)
        order = np.argsort(index, kind="stable")
        rows = index[order]
        stored = np.empty((rows.size, s.shape[1]), dtype=DTYPES[s.dtype])
        if rows.size and s.row_bytes:
            if not hasattr(os, "preadv"):  # no positional reads (Windows): through the map
                for k, array in enumerate(s.arrays):
                    inside = (rows >= s.starts[k]) & (rows < s.starts[k + 1])
                    stored[inside] = array[rows[inside] - s.starts[k]]
            else:
                shard = np.searchsorted(s.starts, rows, side="right") - 1
                position = s.offsets[shard] + (rows - s.starts[shard]) * s.row_bytes
                cuts = np.flatnonzero((np.diff(rows) != 1) | (np.diff(shard) != 0)) + 1
                first, last = np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [rows.size]]).tolist()
                raw = memoryview(stored).cast("B")
                for a, b in zip(first, last):
                    s.pread(int(shard[a]), raw[a * s.row_bytes : b * s.row_bytes], int(position[a]))
        out = np.empty((index.size, s.shape[1]), dtype=np.float32)
        out[order] = stored
        return out

    def chunks(self, rows: int = CHUNK_ROWS):
        """The rows in order, ``rows`` at a time (float32 on ``device``)."""
        for start in range(0, len(self), rows):
            yield self[start : start + rows]

    def tensor(self) -> torch.Tensor:
        """All rows in memory: float32 [N, d] on ``device``."""
        out = self._out(self._range(0, len(self)))
        self.release()
        return out

    def all_finite(self) -> bool:
        """No NaN or inf in any row (one pass over the shards, remembered)."""
        s = self._store
        if s.finite is None:
            s.finite = True
            for array in s.arrays:
                for start in range(0, len(array), CHUNK_ROWS):
                    part = array[start : start + CHUNK_ROWS]
                    s.finite = s.finite and bool(np.isfinite(part).all())
                    s.account(len(part))
            self.release()
        return s.finite

    def release(self) -> None:
        self._store.release()


def dense(value) -> torch.Tensor:
    """``value`` in memory: a :class:`ShardedArray` read whole (float32), anything else as it is."""
    return value.tensor() if isinstance(value, ShardedArray) else value



