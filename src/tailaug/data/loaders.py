"""Batches for training and inference: (normalised images, labels, dataset indices).

In-memory splits are indexed and augmented a whole batch at a time on the device. Image
files go through one DataLoader per :class:`Batches` (persistent workers, prefetching,
pinned memory on CUDA) that decodes them in its workers: small views at a fixed size (the
batch transform then augments them like the in-memory sets), or natural views
(``data.natural``) augmented per image in the workers by draws of (seed, epoch, rank, index)
and only normalised by the batch transform. With ``data.gpu_decode`` the workers read the
JPEG bytes and the batch is decoded and augmented on the device. :class:`GivenBatches` runs
the same machinery over index batches given one pass at a time (a trainer's meta batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..engine.seed import torch_generator
from ..errors import TailaugError
from .datasets import Split
from .natural import DrawKey, NaturalTransform, check_gpu_decode, collate_encoded, decode_on_device
from .transforms import BatchTransform


class _Failed:
    """A user-fixable error (e.g. a corrupt image) raised in a DataLoader worker, carried to
    the main process as a value: raised there, torch would wrap its one-line message in the
    worker's traceback."""

    def __init__(self, error: TailaugError):
        self.kind, self.message = type(error), str(error)


class _Items(torch.utils.data.Dataset):
    """What the loader's workers run: (index, draw key or None) -> (image, label, index).
    The key makes a natural training view; the small views ignore it."""

    def __init__(self, dataset, encoded: bool):
        self.dataset, self.encoded = dataset, encoded

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        try:
            return self._item(*item)
        except TailaugError as exc:
            return _Failed(exc)

    def _item(self, index, key):
        d = self.dataset
        if self.encoded:
            return d.encoded(index, key), int(d.labels[index]), index
        if hasattr(d, "view"):
            return d.view(index, key), int(d.labels[index]), index
        image, label = d[index]
        return image, label, index


class _Plan:
    """The loader's batch sampler: the index batches of the current epoch, each index with
    the draw key of its natural training view. Holds what it reads itself (not the
    :class:`Batches`), so a Batches and its loader's workers go away with their last reference."""

    def __init__(self, n: int, batch_size: int, order, drop_last: bool, key: DrawKey | None):
        self.n, self.batch_size, self.order, self.drop_last, self.key = n, batch_size, order, drop_last, key
        self.first = 0  # the batch an iteration starts at (a run resumed within an epoch)

    def __len__(self) -> int:
        n = len(self.order) if self.order is not None else self.n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def index_batches(self, first: int = 0) -> Iterator[np.ndarray]:
        order = np.fromiter(self.order, dtype=np.int64) if self.order is not None else np.arange(self.n)
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(first * self.batch_size, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, DrawKey | None]]]:
        key = self.key
        for idx in self.index_batches(self.first):
            yield [(i, key) for i in idx.tolist()]


def _collate(collate):
    """``collate`` of the batch's items, or the first item that failed in a worker."""
    def run(items: list):
        failed = next((item for item in items if isinstance(item, _Failed)), None)
        return failed if failed is not None else collate(items)
    return run


def _checked(batch):
    """A loaded batch, or the error of the item that failed in a worker, raised here."""
    if isinstance(batch, _Failed):
        raise batch.kind(batch.message)
    return batch


def _data_loader(dataset, encoded: bool, batch_sampler, device: torch.device, num_workers: int,
                 prefetch_factor: int) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`_Items` over ``batch_sampler``'s batches of (index, draw key)
    pairs: persistent workers, prefetching, pinned memory on CUDA."""
    return torch.utils.data.DataLoader(
        _Items(dataset, encoded), batch_sampler=batch_sampler, num_workers=num_workers,
        collate_fn=_collate(collate_encoded if encoded else torch.utils.data.default_collate),
        pin_memory=torch.device(device).type == "cuda", persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # the workers' seeds; no draw of the global RNG
    )


class Batches:
    """Iterate a split in batches of ``batch_size`` from ``order`` (an iterable of indices).

    With ``augment`` the crop/flip draws come from (seed, epoch, rank) (and each natural
    view's from its index too), so an epoch is the same whether or not the run was
    interrupted before it, and with any number of loader workers. ``raw(start=k)`` begins at
    the epoch's batch k (a run resumed within the epoch; the skipped batches are not read),
    so whatever a DataLoader worker draws must not depend on the batches before.
    """

    def __init__(self, split: Split, batch_size: int, transform: BatchTransform, device: torch.device,
                 *, order: Iterable[int] | None = None, augment: bool = False, seed: int = 0,
                 rank: int = 0, num_workers: int = 0, drop_last: bool = False, prefetch_factor: int = 4):
        self.split, self.batch_size, self.transform = split, batch_size, transform
        self.device, self.order, self.augment = device, order, augment
        self.seed, self.rank, self.num_workers, self.drop_last = seed, rank, num_workers, drop_last
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self.natural: NaturalTransform | None = getattr(split.dataset, "natural", None)
        self.gpu_decode = bool(getattr(split.dataset, "gpu_decode", False))
        check_gpu_decode(self.gpu_decode, device)
        self.plan = _Plan(len(split), batch_size, order, drop_last, self._key())
        self._loader = None

    def _key(self) -> DrawKey | None:
        return DrawKey(self.seed, self.epoch, self.rank) if self.augment and self.natural is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.plan.key = self._key()
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.plan)

    def loader(self) -> torch.utils.data.DataLoader:
        """The split's DataLoader, made once: its workers persist across epochs."""
        if self._loader is None:
            self._loader = _data_loader(self.split.dataset, self.gpu_decode, self.plan, self.device,
                                        self.num_workers, self.prefetch_factor)
        return self._loader

    def raw(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """uint8 images (on the device), labels and indices, before the transform, from the
        epoch's batch ``start`` (0-based) on."""
        labels = torch.from_numpy(self.split.labels)
        if self.split.images is not None:
            for idx in self.plan.index_batches(start):
                t = torch.from_numpy(idx)
                yield self.split.images[t].to(self.device, non_blocking=True), labels[t].to(self.device), t
            return
        self.plan.first = start  # read by the plan when the loader's iterator starts
        for batch in self.loader():
            images, y, idx = _checked(batch)
            if self.gpu_decode:
                images = decode_on_device(images, self.natural, torch.device(self.device))
            else:
                images = images.to(self.device, non_blocking=True)
            yield images, y.to(self.device, non_blocking=True), idx

    def generator(self) -> torch.Generator | None:
        return torch_generator(self.seed, self.epoch, self.rank) if self.augment else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        gen = self.generator()
        for images, y, idx in self.raw():
            yield self.transform(images, gen), y, idx


class _Given:
    """The batch sampler of :class:`GivenBatches`: the index batches of its current pass, each
    index with no draw key (the evaluation view)."""

    def __init__(self):
        self.batches: Iterable = ()

    def __iter__(self) -> Iterator[list[tuple[int, None]]]:
        for idx in self.batches:
            yield [(i, None) for i in idx.tolist()]


class GivenBatches:
    """The evaluation views (uint8, on the device) and labels of index batches of an
    image-file split, given one pass at a time (e.g. the meta batches of a training epoch's
    steps), decoded ahead by one DataLoader's persistent workers (prefetching, pinned memory
    on CUDA). Each image is ``split.dataset[i]``'s, decoded in a worker (also with
    ``data.gpu_decode``, which the training and evaluation batches use)."""

    def __init__(self, split: Split, device: torch.device, *, num_workers: int = 0, prefetch_factor: int = 4):
        self.split, self.device = split, device
        self.plan = _Given()
        self.loader = _data_loader(split.dataset, False, self.plan, device, num_workers, prefetch_factor)

    def raw(self, batches: Iterable[torch.Tensor | np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device of every index batch of ``batches`` in turn (drawn
        lazily, as the workers need them). The workers start decoding at this call: its
        iterator replaces any earlier one, finished or not."""
        self.plan.batches = batches  # read by the plan when the loader's iterator starts (now)
        loaded = iter(self.loader)

        def run():
            for batch in loaded:
                images, y, _ = _checked(batch)
                yield images.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return run()
