"""Long-tailed train/val/test splits built from a config.

Balanced sources (CIFAR, Fashion-MNIST, MNIST) are cut to a class-count profile with the
protocol of methods.md section 1; image folders come long-tailed already through their
split files, and so do the published benchmarks (``published.py``: ImageNet-LT, Places-LT,
iNaturalist 2018).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .profiles import long_tail_indices, ordered_counts, profile_counts
from .published import PUBLISHED
from .transforms import MEAN_STD

# Per-class size of the balanced training set (n_max of the profile). MNIST's smallest
# class has 5,421 training images, so that is the largest n_max every class can give.
BALANCED_SIZE = {"cifar10": 5000, "cifar100": 500, "fashion_mnist": 6000, "mnist": 5421}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10, "mnist": 10}
# class names by label, for reports (datasets whose labels are not self-explanatory)
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


@dataclass
class Split:
    """Labels plus either in-memory uint8 images [N,C,H,W] or a Dataset of (image, label)."""

    labels: np.ndarray
    images: torch.Tensor | None = None
    dataset: torch.utils.data.Dataset | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LTData:
    name: str
    num_classes: int
    in_channels: int
    class_counts: list[int]
    train: Split
    test: Split
    val: Split | None = None
    mean: tuple = field(default=(0.5,))
    std: tuple = field(default=(0.5,))
    class_names: list[str] | None = None  # by label; None: the labels are the names
    notes: list[str] = field(default_factory=list)  # decisions taken on the data, to print


def normalisation(dataset: str) -> tuple[tuple, tuple]:
    """(mean, std) per channel of the images of ``dataset``."""
    return PUBLISHED[dataset].mean_std if dataset in PUBLISHED else MEAN_STD[dataset]


def class_names_of(cfg: DataConfig) -> list[str] | None:
    """The names of the classes of a built-in dataset (None when it has none)."""
    names = CLASS_NAMES.get(cfg.dataset)
    return list(names) if names else None


def planned_counts(cfg: DataConfig) -> list[int]:
    """Training-set class counts of the config, computed without loading any image."""
    return planned_classes(cfg)[0]


def planned_classes(cfg: DataConfig) -> tuple[list[int], list[str] | None, list[str]]:
    """(training-set class counts, class names or None, notes), without decoding any image."""
    if cfg.dataset in PUBLISHED:  # from the split files: no image is opened
        data = build_data(cfg)
        return list(data.class_counts), data.class_names, data.notes
    if cfg.dataset == "embeddings":
        from .embeddings import load_embeddings

        data = load_embeddings(cfg)
        return list(data.class_counts), data.class_names, data.notes
    if cfg.dataset == "image_folder" and cfg.train_split is None:
        from .image_folders import folder_splits

        splits = folder_splits(cfg, check_images=False)
        counts = np.bincount(splits.train[1], minlength=len(splits.class_names)).tolist()
        return counts, splits.class_names, splits.notes
    return _planned_counts(cfg), class_names_of(cfg), []


def _planned_counts(cfg: DataConfig) -> list[int]:
    if cfg.dataset == "image_folder":
        from .sources import read_split_file

        _, labels = read_split_file(cfg.root, cfg.train_split, cfg.num_classes)
        return np.bincount(labels, minlength=cfg.num_classes or 0).tolist()
    counts = long_tail_counts(cfg)
    if cfg.val_per_class:
        counts = [n - max(0, cfg.val_per_class - (BALANCED_SIZE[cfg.dataset] - n)) for n in counts]
    return counts


def long_tail_counts(cfg: DataConfig) -> list[int]:
    """Per-class counts of the long-tailed draw of a built-in dataset (before the validation
    split): the profile's counts, given to the classes in ``data.class_order``."""
    n_max = cfg.n_max or BALANCED_SIZE[cfg.dataset]
    counts = profile_counts(cfg.profile, n_max, NUM_CLASSES[cfg.dataset], cfg.imbalance_factor)
    return ordered_counts(counts, cfg.class_order)


def build_data(cfg: DataConfig) -> LTData:
    if cfg.dataset == "image_folder":
        return _image_folder(cfg)
    if cfg.dataset in PUBLISHED:
        from .published import read_published

        parts, num_classes, notes, train_file = read_published(cfg)
        return _split_files_data(cfg, parts, num_classes, train_file, notes)
    from .sources import load_cifar, load_idx

    if cfg.dataset.startswith("cifar"):
        load = lambda train: load_cifar(cfg.root, NUM_CLASSES[cfg.dataset], train, cfg.download)  # noqa: E731
    else:
        load = lambda train: load_idx(cfg.root, cfg.dataset, train, cfg.download)  # noqa: E731
    train_x, train_y = load(True)
    test_x, test_y = load(False)
    _check_splits(cfg, train_x, test_x)
    num_classes = NUM_CLASSES[cfg.dataset]
    train_y, test_y = train_y.numpy(), test_y.numpy()
    keep = long_tail_indices(train_y, long_tail_counts(cfg), cfg.lt_seed)
    val = None
    if cfg.val_per_class:
        keep, val_idx = _hold_out_validation(train_y, keep, cfg.val_per_class, cfg.lt_seed)
        val = Split(train_y[val_idx], train_x[val_idx])
    if cfg.test_per_class:
        have = np.bincount(test_y, minlength=num_classes)
        fewest = int(have.min())
        if fewest < cfg.test_per_class:
            lower = f"lower data.test_per_class to at most {fewest}, or " if fewest else ""
            raise DataError(
                f"data.test_per_class is {cfg.test_per_class} but class {int(have.argmin())} has only "
                f"{fewest} test images; {lower}remove data.test_per_class to use the whole test set"
            )
        test_idx = long_tail_indices(test_y, [cfg.test_per_class] * num_classes, cfg.lt_seed)
        test_x, test_y = test_x[test_idx], test_y[test_idx]
    mean, std = MEAN_STD[cfg.dataset]
    train_labels = train_y[keep]
    return LTData(
        name=cfg.dataset, num_classes=num_classes, in_channels=train_x.shape[1],
        class_counts=np.bincount(train_labels, minlength=num_classes).tolist(),
        train=Split(train_labels, train_x[torch.from_numpy(keep)]), test=Split(test_y, test_x),
        val=val, mean=mean, std=std, class_names=class_names_of(cfg),
    )


def _check_splits(cfg: DataConfig, train_x: torch.Tensor, test_x: torch.Tensor) -> None:
    """Refuse, before any training, a test set the final report could not use."""
    where = f"the {cfg.dataset} files under {cfg.root}" if cfg.root else f"the {cfg.dataset} files"
    if len(test_x) == 0:
        raise DataError(f"{where} hold no test images, and every run ends with a test report; "
                        "replace the test files with intact ones")
    if train_x.shape[1:] != test_x.shape[1:]:
        shape = lambda x: "x".join(map(str, x.shape[1:]))  # noqa: E731
        raise DataError(
            f"{where}: the training images are {shape(train_x)} but the test images {shape(test_x)} "
            "(channels x height x width); the files come from different datasets: replace them with a "
            "matching set"
        )


def _hold_out_validation(labels: np.ndarray, keep: np.ndarray, per_class: int, seed: int):
    """A balanced validation split, disjoint from train and test.

    Decision: it is drawn from the training images the long-tail draw left unused; a class
    with fewer unused images than ``per_class`` (the largest class has none) gives up the
    missing ones from the end of its long-tailed subset.
    """
    rng = np.random.RandomState(seed + 1)
    in_train = np.zeros(len(labels), dtype=bool)
    in_train[keep] = True
    val, removed = [], set()
    for c in range(int(labels.max()) + 1):
        unused = np.where((labels == c) & ~in_train)[0]
        rng.shuffle(unused)
        take = list(unused[:per_class])
        short = per_class - len(take)
        if short:
            mine = keep[labels[keep] == c]
            if short >= len(mine):
                raise DataError(
                    f"class {c} has too few images for a validation split of {per_class} per class; "
                    "lower data.val_per_class"
                )
            take += list(mine[-short:])
            removed.update(mine[-short:].tolist())
        val.extend(take)
    kept = np.array([i for i in keep if i not in removed], dtype=np.int64)
    return kept, np.array(val, dtype=np.int64)


def image_files_dataset(cfg: DataConfig, paths, labels, fix: str | None = None):
    """The Dataset of image files ``paths`` with the config's pipeline (``data.transforms``):
    natural views (``natural.NaturalTransform``, optionally decoded on the GPU) or small ones."""
    from .natural import NaturalTransform, pipeline
    from .sources import ImageFolderDataset

    natural = NaturalTransform.from_config(cfg) if pipeline(cfg) == "natural" else None
    kw = {} if fix is None else {"fix": fix}
    return ImageFolderDataset(paths, labels, cfg.image_size, natural=natural,
                              gpu_decode=cfg.gpu_decode and natural is not None, **kw)


def _folder_layout(cfg: DataConfig) -> LTData:
    from .image_folders import folder_splits

    splits = folder_splits(cfg)
    fix = "remove it from its class folder or replace it with an intact image"

    def split(part):
        if part is None:
            return None
        paths, labels = part
        return Split(labels, dataset=image_files_dataset(cfg, paths, labels, fix))

    mean, std = MEAN_STD["image_folder"]
    counts = np.bincount(splits.train[1], minlength=len(splits.class_names))
    return LTData(
        name="image_folder", num_classes=len(splits.class_names), in_channels=3, class_counts=counts.tolist(),
        train=split(splits.train), test=split(splits.test), val=split(splits.val), mean=mean, std=std,
        class_names=splits.class_names, notes=splits.notes,
    )


def _image_folder(cfg: DataConfig) -> LTData:
    if cfg.train_split is None:
        return _folder_layout(cfg)
    from .sources import read_split_file

    parts = {split: None if path is None else read_split_file(cfg.root, path, cfg.num_classes)
             for split, path in (("train", cfg.train_split), ("val", cfg.val_split), ("test", cfg.test_split))}
    num_classes = cfg.num_classes or int(parts["train"][1].max()) + 1
    return _split_files_data(cfg, parts, num_classes, cfg.train_split)


def _split_files_data(cfg: DataConfig, parts: dict, num_classes: int, train_file, notes: list[str] = ()) -> LTData:
    """The LTData of splits read from split files: ``parts`` maps train, val, test to
    (image paths, labels) or None; the classes are 0..num_classes-1 as listed."""

    def split(part):
        if part is None:
            return None
        paths, labels = part
        return Split(labels, dataset=image_files_dataset(cfg, paths, labels))

    counts = np.bincount(parts["train"][1], minlength=num_classes)
    empty = np.where(counts == 0)[0]
    if len(empty):
        fix = "every class needs at least one" + (" (or set data.num_classes to the number of classes present)"
                                                  if cfg.dataset == "image_folder" else "")
        raise DataError(f"classes {empty[:10].tolist()} have no training images in {train_file}; {fix}")
    mean, std = normalisation(cfg.dataset)
    return LTData(
        name=cfg.dataset, num_classes=num_classes, in_channels=3, class_counts=counts.tolist(),
        train=split(parts["train"]), test=split(parts["test"]), val=split(parts["val"]), mean=mean, std=std,
        notes=list(notes),
    )
