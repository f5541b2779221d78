"""Image folders in the usual layout: ``root/<class name>/*.jpg``.

The classes are the sorted names of the sub-folders of ``data.root`` (images may sit in
deeper folders of a class; hidden files and other extensions are skipped). Each class's
images, sorted by path, are shuffled with ``RandomState(data.lt_seed)`` and cut in this order:

1. the test set: ``data.test_per_class`` images per class (default :data:`HELD_OUT_TEST`),
   unless ``data.test_root`` names a folder of the same layout (every class of root must
   have a folder there, and it must have no other class);
2. the validation set: ``data.val_per_class`` images per class;
3. the training set: the rest as it is (``data.profile: as_is``, the default for image
   folders), or the first n_c of the rest with the counts of ``data.profile`` /
   ``data.imbalance_factor`` (``data.n_max``, default: the smallest class's rest, so every
   class can give its count).

Every problem is a DataError naming the folder or class and the fix; the image headers are
read before training, so a file that is no image fails at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .profiles import profile_counts
from .sources import given_root

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
HELD_OUT_TEST = 10  # decision: test images held out per class when there is no data.test_root


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth), sorted by path."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def class_folders(root, key: str) -> dict[str, list[Path]]:
    """{class name: its image files} of the folder ``root`` (the value of config ``key``)."""
    base = given_root(root)
    if base is None or not base.is_dir():
        state = "is not set" if base is None else "is not a directory" if base.exists() else "does not exist"
        raise DataError(f"{key} {base or ''} {state}; set {key} to a folder with one sub-folder of images per "
                        "class (root/<class name>/*.jpg)".replace("  ", " "))
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = any(is_image_file(p) for p in base.iterdir())
        hint = " (the images lie in it directly)" if loose else ""
        raise DataError(f"{key} {base} has no class sub-folders{hint}; put the images of each class in "
                        f"{base}/<class name>/")
    classes = {p.name: image_files(p) for p in folders}
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(f"class folder(s) {', '.join(map(repr, empty))} in {base} hold no images "
                        f"({'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}); add images or remove the folder(s)")
    if len(classes) < 2 and key == "data.root":  # a test folder is compared with root's classes instead
        raise DataError(f"{key} {base} has one class folder ({folders[0].name!r}); a classifier needs at least two")
    return classes


def check_readable(paths: list[Path]) -> None:
    """Every file opens as an image (its header is read, not the pixels)."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            bad.append((path, exc))
    if bad:
        path, exc = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{path}{more} is not a readable image ({type(exc).__name__}: {exc}); remove it or "
                        "replace it with an intact image")


@dataclass
class FolderSplits:
    class_names: list[str]
    train: tuple[list[Path], np.ndarray]
    test: tuple[list[Path], np.ndarray]
    val: tuple[list[Path], np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)


def _labelled(per_class: list[list[Path]]) -> tuple[list[Path], np.ndarray]:
    paths = [p for files in per_class for p in files]
    labels = np.repeat(np.arange(len(per_class)), [len(files) for files in per_class]).astype(np.int64)
    return paths, labels


def folder_splits(cfg, *, check_images: bool = True) -> FolderSplits:
    """The train/val/test splits of the image folder of ``cfg`` (a DataConfig); see the module."""
    classes = class_folders(cfg.root, "data.root")
    names = list(classes)
    rng = np.random.RandomState(cfg.lt_seed)
    held_test = None if cfg.test_root is not None else (cfg.test_per_class or HELD_OUT_TEST)
    need = (held_test or 0) + cfg.val_per_class + 1
    for name, files in classes.items():
        if len(files) < need:
            parts = [f"{held_test} test" if held_test else "", f"{cfg.val_per_class} validation"
                     if cfg.val_per_class else ""]
            raise DataError(
                f"class {name!r} has {len(files)} image(s); holding out {' and '.join(p for p in parts if p)} "
                f"image(s) per class leaves it none to train on: add images, lower data.val_per_class"
                + (", lower data.test_per_class or give a test folder as data.test_root" if held_test else ""))
    rest, val, test = [], [], []
    for files in classes.values():
        files = [files[i] for i in rng.permutation(len(files))]
        cut = held_test or 0
        test.append(files[:cut])
        val.append(files[cut : cut + cfg.val_per_class])
        rest.append(files[cut + cfg.val_per_class :])
    notes = []
    available = [len(files) for files in rest]
    if cfg.profile == "as_is":
        counts = available
    else:
        n_max = cfg.n_max or min(available)
        counts = profile_counts(cfg.profile, n_max, len(names), cfg.imbalance_factor)
        short = [(names[c], n, have) for c, (n, have) in enumerate(zip(counts, available)) if n > have]
        if short:
            name, n, have = short[0]
            raise DataError(f"data.profile {cfg.profile} asks for {n} training images of class {name!r}, which has "
                            f"{have} left after the held-out splits; lower data.n_max (default: the smallest "
                            "class's count) or use data.profile: as_is")
        notes.append(f"training set: {cfg.profile} profile, n_max {n_max}, imbalance factor "
                     f"{cfg.imbalance_factor:g}, drawn from the images of data.root")
    train = [files[:n] for files, n in zip(rest, counts)]
    if held_test:
        notes.append(f"test set: {held_test} images per class held out of data.root (no data.test_root)")
    else:
        test = _test_folder(cfg, names, rng)
    splits = FolderSplits(names, _labelled(train), _labelled(test), _labelled(val) if cfg.val_per_class else None,
                          notes)
    if check_images:
        check_readable([p for split in (splits.train, splits.test, splits.val) if split for p in split[0]])
    return splits


def _test_folder(cfg, names: list[str], rng: np.random.RandomState) -> list[list[Path]]:
    classes = class_folders(cfg.test_root, "data.test_root")
    missing = [n for n in names if n not in classes]
    if missing:
        raise DataError(f"class(es) {', '.join(map(repr, missing[:5]))} of data.root have no folder in data.test_root "
                        f"{cfg.test_root}; every class needs test images: add the folder(s), or leave data.test_root "
                        "unset to hold test images out of data.root")
    extra = [n for n in classes if n not in names]
    if extra:
        raise DataError(f"data.test_root {cfg.test_root} has class folder(s) {', '.join(map(repr, extra[:5]))} that "
                        "data.root lacks; the model cannot predict a class it never saw: remove them or add "
                        "training images")
    test = [classes[n] for n in names]
    if cfg.test_per_class:
        fewest = min(range(len(names)), key=lambda c: len(test[c]))
        if len(test[fewest]) < cfg.test_per_class:
            raise DataError(f"data.test_per_class is {cfg.test_per_class} but class {names[fewest]!r} has "
                            f"{len(test[fewest])} test images in {cfg.test_root}; lower it or remove it")
        test = [[files[i] for i in sorted(rng.permutation(len(files))[: cfg.test_per_class])] for files in test]
    return test
