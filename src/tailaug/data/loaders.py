"""Batches for training and inference: (normalised images, labels, dataset indices).

In-memory splits are indexed and augmented a whole batch at a time on the device; image
folders go through a DataLoader with workers and the same batch transform.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..engine.seed import torch_generator
from .datasets import Split
from .transforms import BatchTransform


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, label, i


class Batches:
    """Iterate a split in batches of ``batch_size`` from ``order`` (an iterable of indices).

    With ``augment`` the crop/flip draws come from a generator seeded by (seed, epoch, rank),
    so an epoch is the same whether or not the run was interrupted before it. ``raw(start=k)``
    begins at the epoch's batch k (a run resumed within the epoch; the skipped batches are not
    read), so whatever a DataLoader worker draws must not depend on the batches before.
    """

    def __init__(self, split: Split, batch_size: int, transform: BatchTransform, device: torch.device,
                 *, order: Iterable[int] | None = None, augment: bool = False, seed: int = 0,
                 rank: int = 0, num_workers: int = 0, drop_last: bool = False):
        self.split, self.batch_size, self.transform = split, batch_size, transform
        self.device, self.order, self.augment = device, order, augment
        self.seed, self.rank, self.num_workers, self.drop_last = seed, rank, num_workers, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.order) if self.order is not None else len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _index_batches(self, first: int = 0) -> Iterator[np.ndarray]:
        order = np.fromiter(self.order, dtype=np.int64) if self.order is not None else np.arange(len(self.split))
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(first * self.batch_size, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def raw(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """uint8 images (on the device), labels and indices, before the transform, from the
        epoch's batch ``start`` (0-based) on."""
        labels = torch.from_numpy(self.split.labels)
        if self.split.images is not None:
            for idx in self._index_batches(start):
                t = torch.from_numpy(idx)
                yield self.split.images[t].to(self.device, non_blocking=True), labels[t].to(self.device), t
            return
        batches = list(self._index_batches(start))
        loader = torch.utils.data.DataLoader(
            _Indexed(self.split.dataset), batch_sampler=batches, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        for images, y, idx in loader:
            yield images.to(self.device, non_blocking=True), y.to(self.device), idx

    def generator(self) -> torch.Generator | None:
        return torch_generator(self.seed, self.epoch, self.rank) if self.augment else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        gen = self.generator()
        for images, y, idx in self.raw():
            yield self.transform(images, gen), y, idx
