"""Class-aware samplers (methods.md section 6; Kang et al. 2019).

Each sampler yields the dataset indices of ONE epoch on one rank and can be passed to a
``torch.utils.data.DataLoader`` as ``sampler=``. The kinds:

``instance``
    every index exactly once per epoch, in a random permutation (without replacement).
    With ``num_samples`` other than N, successive independent permutations are
    concatenated and cut to length, so every index appears floor or ceil(M/N) times.
``class_balanced``
    each draw picks a class uniformly, then an instance of that class uniformly
    (with replacement).
``sqrt``
    class probability proportional to sqrt(n_c), instance uniform within the class.
``progressive``
    p_c(t) = (1 - t/T) n_c/N + (t/T) / C with t = epoch and T = total_epochs - 1
    (T = 0: class balanced). Epochs past T are treated as T (fully balanced).

Determinism and distribution: the global index list of an epoch is a function of
(seed, epoch) only, drawn with ``np.random.default_rng(np.random.SeedSequence([seed, epoch]))``.
All ranks draw the same global list, pad it to a multiple of ``world_size`` by repeating
from its start, and rank r keeps ``global[r::world_size]``. Ranks therefore see disjoint
slices of one draw (up to the padding) and all have the same length. Call
:meth:`ClassAwareSampler.set_epoch` at the start of every epoch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..errors import DataError
from .classes import check_counts, check_labels
from ..registry import SAMPLERS


def class_probabilities(
    kind: str, class_counts: Sequence[int], epoch: int = 0, total_epochs: int = 1
) -> np.ndarray:
    """The probability of drawing each class under sampler ``kind``; shape [C], sums to 1.

    Each kind is a function ``(counts [C] float64, epoch, total_epochs) -> [C] weights``
    registered in ``tailaug.registry.SAMPLERS``. For ``instance`` this is the empirical class
    frequency n_c / N (the class frequencies of one permutation epoch).
    """
    probability = SAMPLERS.get(kind).obj
    probs = probability(np.asarray(check_counts(class_counts), dtype=np.float64), epoch, total_epochs)
    return probs / probs.sum()


@SAMPLERS.register("instance")
def _instance(counts: np.ndarray, epoch: int, total_epochs: int) -> np.ndarray:
    return counts / counts.sum()


@SAMPLERS.register("class_balanced")
def _class_balanced(counts: np.ndarray, epoch: int, total_epochs: int) -> np.ndarray:
    return np.full(counts.size, 1.0 / counts.size)


@SAMPLERS.register("sqrt")
def _sqrt(counts: np.ndarray, epoch: int, total_epochs: int) -> np.ndarray:
    return np.sqrt(counts)


@SAMPLERS.register("progressive")
def _progressive(counts: np.ndarray, epoch: int, total_epochs: int) -> np.ndarray:
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    last = total_epochs - 1
    frac = 1.0 if last == 0 else min(epoch / last, 1.0)
    return (1.0 - frac) * _instance(counts, epoch, total_epochs) + frac * _class_balanced(counts, epoch, total_epochs)


def _as_labels(labels, num_classes: int) -> np.ndarray:
    arr = check_labels(labels, num_classes)
    if arr.size == 0:
        raise DataError("labels are empty: the dataset has no samples to draw")
    return arr


class ClassAwareSampler(Sampler[int]):
    """The dataset indices of one epoch on this rank; see the module docstring."""

    def __init__(
        self,
        labels,
        kind: str,
        num_classes: int,
        *,
        seed: int = 0,
        total_epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        num_samples: int | None = None,
    ):
        super().__init__()
        SAMPLERS.get(kind)  # an unknown kind is a config error naming the registered ones
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
        self.labels = _as_labels(labels, num_classes)
        self.kind = kind
        self.num_classes = int(num_classes)
        self.class_counts = np.asarray(check_counts(np.bincount(self.labels, minlength=num_classes)), dtype=np.int64)
        self.seed = int(seed)
        self.total_epochs = int(total_epochs)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_samples = int(num_samples) if num_samples is not None else len(self.labels)
        self.epoch = 0
        # indices grouped by class: class c owns _by_class[_starts[c] : _starts[c] + n_c]
        self._by_class = np.argsort(self.labels, kind="stable")
        self._starts = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])

    # ---------------------------------------------------------------- public API

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def class_probabilities(self) -> np.ndarray:
        """The class probabilities of the current epoch."""
        return class_probabilities(self.kind, self.class_counts, self.epoch, self.total_epochs)

    def global_indices(self) -> np.ndarray:
        """The whole epoch's draw shared by all ranks, before padding and slicing."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        n = len(self.labels)
        m = self.num_samples
        if self.kind == "instance":
            reps = -(-m // n)
            return np.concatenate([rng.permutation(n) for _ in range(reps)])[:m]
        probs = self.class_probabilities()
        classes = rng.choice(self.num_classes, size=m, p=probs)
        within = rng.integers(0, self.class_counts[classes])
        return self._by_class[self._starts[classes] + within]

    def __iter__(self) -> Iterator[int]:
        glob = self.global_indices()
        padded = np.resize(glob, len(self) * self.world_size)  # repeats from the start
        return iter(padded[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __repr__(self) -> str:
        return (
            f"ClassAwareSampler(kind={self.kind!r}, num_classes={self.num_classes}, "
            f"num_samples={self.num_samples}, rank={self.rank}/{self.world_size}, epoch={self.epoch})"
        )


def build_sampler(
    cfg,
    labels,
    num_classes: int,
    *,
    seed: int,
    total_epochs: int,
    rank: int = 0,
    world_size: int = 1,
) -> ClassAwareSampler:
    """A :class:`ClassAwareSampler` from a :class:`~tailaug.config.SamplerConfig`."""
    return ClassAwareSampler(
        labels,
        cfg.kind,
        num_classes,
        seed=seed,
        total_epochs=total_epochs,
        rank=rank,
        world_size=world_size,
    )
