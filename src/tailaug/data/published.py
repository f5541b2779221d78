"""The published long-tailed benchmarks, read from their released split files.

``data.dataset: imagenet_lt | places_lt | inat2018``: ``data.root`` is the image root the
split files' paths are relative to. Each split is the file ``data.<split>_split`` names, or
else the first published file name of :data:`PUBLISHED` found in ``data.root``. A text
file has lines ``relative/path label``; a ``.json`` file is read as COCO-style annotations
(iNaturalist 2018's train2018.json / val2018.json). The labels are the classes as listed.

Count check (``data.count_check``): every split must have the published number of images
and the published number of classes (labels 0..C-1, each present); ``strict`` (the
default) refuses any other file, ``warn`` takes it as a variant of the set and says so in
the notes that ``run`` and ``datasets describe`` print.

A fourth set is one more entry of :data:`PUBLISHED`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PublishedSet:
    title: str
    num_classes: int
    # images per split as published; a split left out has no published file (iNat: no validation split)
    sizes: dict[str, int]
    # per split, the published file names looked for in data.root, the first found is read
    files: dict[str, tuple[str, ...]]
    shots: tuple[int, int] = (100, 20)  # (many, few): many-shot n_c > many, few-shot n_c < few
    notes: tuple[str, ...] = ()
    mean_std: tuple = field(default=IMAGENET_MEAN_STD)


# Sizes from the papers and the released split files: ImageNet-LT and Places-LT (Liu et al.
# 2019, OLTR), iNaturalist 2018 (Van Horn et al. 2018). Shot groups as in OLTR for all three.
PUBLISHED: dict[str, PublishedSet] = {
    "imagenet_lt": PublishedSet(
        "ImageNet-LT", 1000, {"train": 115_846, "val": 20_000, "test": 50_000},
        {s: (f"ImageNet_LT_{s}.txt",) for s in SPLITS}),
    "places_lt": PublishedSet(
        "Places-LT", 365, {"train": 62_500, "val": 7_300, "test": 36_500},
        {s: (f"Places_LT_{s}.txt",) for s in SPLITS}),
    "inat2018": PublishedSet(
        "iNaturalist 2018", 8142, {"train": 437_513, "test": 24_426},
        {"train": ("iNaturalist18_train.txt", "train2018.json"), "test": ("iNaturalist18_val.txt", "val2018.json")},
        notes=("test set: the published validation split (3 images per class), on which the papers report; "
               "iNaturalist 2018 publishes no other validation split (data.val_split may name one of yours)",)),
}

# settings that do not apply to a set with published splits, and what to do instead
_NOT_READ = {
    "num_classes": "the number of classes is published",
    "test_root": "data.test_split names the test split file",
    "val_per_class": "data.val_split names the validation split file",
    "test_per_class": "the published test split is used whole",
    "class_order": "the split files' labels are the classes",
    "imbalance_factor": "the split files give the class counts (profile as_is)",
    "lt_seed": "no subset is drawn, the split files list the images",
}


def data_config_problem(d) -> tuple[str, object, str] | None:
    """(field, value, message) for a DataConfig whose published-set settings cannot work;
    fills in the set's shot thresholds and ``data.profile: as_is`` when they are not given."""
    if d.dataset not in PUBLISHED:
        if d.count_check != "strict":
            return ("count_check", d.count_check, f"is read for the published sets ({', '.join(PUBLISHED)}) only; "
                    "remove it")
        return None
    entry = PUBLISHED[d.dataset]
    for key, instead in _NOT_READ.items():  # not "set": a saved config.yaml lists every key with its default
        if getattr(d, key) != type(d).model_fields[key].default:
            return (key, getattr(d, key), f"is not read for dataset {d.dataset}: {instead}; remove it")
    if "profile" not in d.model_fields_set:
        d.profile = "as_is"
    if d.profile != "as_is":
        return ("profile", d.profile, f"{d.dataset} is used with its published class counts (profile as_is): "
                "remove data.profile")
    if "shots" not in d.model_fields_set:
        d.shots = type(d.shots)(many=entry.shots[0], few=entry.shots[1])
    return None


def has_validation(d) -> bool:
    """Whether a config of a published set has a validation split."""
    return d.val_split is not None or "val" in PUBLISHED[d.dataset].files


def no_validation_fix(d) -> str:
    return (f"data.val_split (a split file of validation images; {PUBLISHED[d.dataset].title} publishes none, "
            "its validation file is the test set)")


def split_file(d, split: str, root: Path) -> Path | None:
    """The file of ``split`` (train, val, test): ``data.<split>_split`` if set (as given, or
    relative to ``root``), else the first published name found in ``root``; None for a
    split the set does not publish and the config does not name."""
    from .sources import find_split_file

    entry = PUBLISHED[d.dataset]
    given = getattr(d, f"{split}_split")
    if given is not None:
        return find_split_file(root, given)
    names = entry.files.get(split)
    if names is None:
        return None
    for name in names:
        if (root / name).is_file():
            return root / name
    looked = " and ".join(str(root / n) for n in names)
    raise DataError(f"the {entry.title} {split} split file is not in data.root (looked for {looked}); put the "
                    f"published file there, or name yours with data.{split}_split")


def count_problem(entry: PublishedSet, split: str, path: Path, labels, *, own: bool = False) -> str | None:
    """How the ``split`` file ``path`` (its labels) differs from the published counts, or None.
    ``own``: a file of the user's in place of a published one (a validation file named with
    data.val_split), of which only the labels are checked."""
    classes = f"the published {entry.title} {entry.num_classes:,} classes (labels 0..{entry.num_classes - 1:,})"
    published = None if own else entry.sizes.get(split)
    if published is None:  # a split the set does not publish (iNaturalist's validation), or yours: only its labels
        top = int(labels.max())
        return f"{path} has label {top:,}, {classes}" if top >= entry.num_classes else None
    problems = []
    if len(labels) != published:
        problems.append(f"lists {len(labels):,} images, the published {entry.title} {split} split {published:,}")
    distinct, top = len(set(labels.tolist())), int(labels.max())
    if distinct != entry.num_classes or top != entry.num_classes - 1:
        problems.append(f"has {distinct:,} distinct labels (largest {top:,}), {classes}")
    return f"{path} {' and '.join(problems)}" if problems else None


def read_published(d) -> tuple[dict, int, list[str], Path]:
    """({split: (paths, labels) or None}, number of classes, notes, the training file) of a
    published set, from its split files alone: every listed image is checked to exist (one
    directory listing per folder), none is opened."""
    from .sources import check_listed_files, given_root, read_split_entries

    entry = PUBLISHED[d.dataset]
    root = given_root(d.root)
    if root is None or not root.is_dir():
        state = "is not set" if root is None else "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data.root {root or ''} {state}; set data.root to the {entry.title} image root (the folder "
                        "the split files' paths are relative to)".replace("  ", " "))
    parts, notes, files, listings = {}, list(entry.notes), {}, {}
    for split in SPLITS:
        path = files[split] = split_file(d, split, root)
        if path is None:
            parts[split] = None
            continue
        if split == "test" and files["val"] is not None and files["val"].resolve() == path.resolve():
            raise DataError(f"the validation and the test split are both {path}; choosing on it would choose on "
                            "the test set: name another validation file with data.val_split, or remove it")
        paths, labels, where = read_split_entries(path, root)
        problem = count_problem(entry, split, path, labels, own=split == "val" and d.val_split is not None)
        if problem and d.count_check == "strict":
            raise DataError(f"{problem}; give the published file, or set data.count_check: warn to use a variant "
                            "of the set")
        if problem:
            notes.append(f"warning: {problem}: a variant of {entry.title} (data.count_check: warn), not comparable "
                         "with the published results")
        check_listed_files(path, root, paths, where, listings)  # each folder listed once for all splits
        parts[split] = (paths, labels)
        notes.append(f"{split}: {len(labels):,} images from {path}")
    num_classes = int(parts["train"][1].max()) + 1
    for split in ("val", "test"):
        if parts[split] is not None and parts[split][1].max() >= num_classes:
            raise DataError(f"the {split} split has label {int(parts[split][1].max())}, and the training split's "
                            f"classes are 0..{num_classes - 1}; give {split} and train files of the same set")
    return parts, num_classes, notes, files["train"]
