"""``data.dataset: embeddings``: features and labels from files instead of images.

Readers (one per extension), each returning (features, raw labels) for :func:`check_arrays`:

- ``.npz``: arrays named by ``features_name``/``labels_name``, else the first of
  ``FEATURE_NAMES`` and of ``LABEL_NAMES`` the file holds (never unpickled).
- ``.npy``: a features file; the labels are a second ``.npy`` file (``train_labels``,
  ``test_labels``).
- ``.parquet`` (pyarrow): a label column; the features are a list-of-floats column (named as
  above) or, without one, every other column, one per dimension.
- ``.safetensors``: tensors named as above (integer labels only: the format holds no strings).

Labels are integers (class ids 0..C-1) or strings (class names; ids in sorted order, or in
the order of ``data.embeddings.class_names``). Decisions: the data are used as given
(``data.profile`` defaults to ``as_is``; ``exponential``/``step`` cut a long-tailed subset
from the training rows with ``n_max`` defaulting to the smallest class); without a test
file a stratified split holds out ``test_fraction`` of every class (at least one row of a
class with two or more, never its last), seeded by ``data.lt_seed``; the validation split
(``data.val_per_class``) is taken as for the built-in datasets (rows the profile left unused
first); ``data.test_per_class`` keeps at most that many test rows per class.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

FEATURE_NAMES = ("features", "embeddings", "embedding", "x", "X")
LABEL_NAMES = ("labels", "label", "y")
EXTENSIONS = (".npz", ".npy", ".parquet", ".safetensors")

# keys of the image pipeline that mean nothing for given embeddings and would silently do nothing
_NOT_READ = {
    "train_split": "data.embeddings.train", "val_split": "data.val_per_class", "test_split": "data.embeddings.test",
    "num_classes": "data.embeddings.class_names (the classes come from the labels)",
}


def data_config_problem(d) -> tuple[str, object, str] | None:
    """(field, value, message) for a DataConfig whose embeddings settings cannot work."""
    if d.dataset != "embeddings":
        if d.embeddings is not None:
            return ("embeddings", "...", f"is read for dataset 'embeddings' only, and data.dataset is "
                    f"{d.dataset}: set data.dataset: embeddings or remove data.embeddings")
        return None
    if d.embeddings is None:
        return ("embeddings", None, "dataset 'embeddings' needs data.embeddings.train: a .npz, .npy, .parquet or "
                ".safetensors file of features and labels (see configs/embeddings/example.yaml)")
    for key, instead in _NOT_READ.items():
        if getattr(d, key) is not None:
            return (key, getattr(d, key), f"is not read for dataset 'embeddings': remove it (use {instead})")
    if "profile" not in d.model_fields_set:
        d.profile = "as_is"  # embeddings are used as given unless a profile is asked for
    if d.profile == "as_is":
        for key in ("imbalance_factor", "n_max", "class_order"):  # not "set": a saved config.yaml lists defaults
            if getattr(d, key) != type(d).model_fields[key].default:
                return (key, getattr(d, key), "re-profiles the embeddings, which are used as given (data.profile "
                        "as_is): set data.profile: exponential (or step) too, or remove it")
    return None


def config_problem(cfg) -> str | None:
    """What a config with given embeddings sets that the linear stage 1 cannot do."""
    if cfg.model.weights is not None:
        return ("model.weights loads a backbone, and dataset 'embeddings' has none (stage 1 is a linear head on "
                "the embeddings): remove model.weights")
    if cfg.train.remix is not None:
        return "train.remix re-labels mixed images; stage 1 on embeddings mixes none: remove train.remix"
    if cfg.train.mixup_alpha > 0:
        return "train.mixup_alpha mixes images; stage 1 on embeddings has none: set train.mixup_alpha=0"
    if cfg.train.grad_clip is not None:
        return "train.grad_clip is not read by the linear stage 1 on embeddings (Adam): remove it"
    if cfg.train.checkpoint_every_steps:
        return ("train.checkpoint_every_steps checkpoints a backbone's training within an epoch; stage 1 on "
                "embeddings (a linear head, seconds) keeps no checkpoint: remove it")
    if cfg.features.views:
        return ("features.views adds augmented views of images; embeddings are cached as given: set "
                "features.views=0")
    if cfg.train.feature_augmenter.name != "none":
        return (f"train.feature_augmenter {cfg.train.feature_augmenter.name} augments a backbone's features while it "
                "learns; stage 1 on embeddings has no backbone: set train.feature_augmenter={name: none} (and use "
                "retrain.augmenter on the embeddings)")
    if any(term.name == "supcon" for term in cfg.train.loss):
        return ("train.loss supcon needs two augmented views of each image; embeddings have one: use ce, focal, "
                "balanced_softmax, logit_adjust, label_aware_smoothing or (with model.head: cosine) a margin loss")
    return None


# --------------------------------------------------------------------------- reading


def resolve(path: str, root: str | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else Path(root).expanduser() / p


def _pick(names, wanted: str | None, default: tuple[str, ...], what: str, path: Path, key: str,
          optional: bool = False) -> str | None:
    """The name of the array/column/tensor to read; None when ``optional`` and there is none."""
    names = list(names)
    if optional and (wanted if wanted is not None else next((n for n in default if n in names), None)) not in names:
        return None
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"{path} has no {what} named {wanted!r} (it has {', '.join(map(repr, names)) or 'none'}); "
                            f"fix data.embeddings.{key}")
        return wanted
    found = next((n for n in default if n in names), None)
    if found is None:
        raise DataError(f"{path} has no {what} named {' or '.join(default)} (it has "
                        f"{', '.join(map(repr, names)) or 'none'}); name it with data.embeddings.{key}")
    return found


def read_embeddings(path: Path, labels_path: Path | None = None, *, features_name: str | None = None,
                    labels_name: str | None = None, labels_key: str = "train_labels",
                    labels_optional: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(features [N, d], labels [N]) of one file (and its labels file for .npy), checked.
    ``labels_optional`` (files to predict on): labels None when the file holds none."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}: unknown embeddings file type {suffix or '(none)'!r}; save the features as "
                        f"{', '.join(EXTENSIONS)}")
    if not path.is_file():
        raise DataError(f"embeddings file {path} does not exist; check the path (relative paths start at "
                        "data.root when it is set, else at the working directory)")
    if suffix == ".npy" and labels_path is None and not labels_optional:
        raise DataError(f"{path} is a .npy features file; give its labels as a second .npy file in "
                        f"data.embeddings.{labels_key}")
    if suffix != ".npy" and labels_path is not None:
        raise DataError(f"data.embeddings.{labels_key} pairs a labels file with a .npy features file, and {path} "
                        f"holds its own labels: remove data.embeddings.{labels_key}")
    names = dict(features_name=features_name, labels_name=labels_name, labels_optional=labels_optional)
    try:
        if suffix == ".npz":
            features, labels = _read_npz(path, **names)
        elif suffix == ".npy":
            features, labels = _load_npy(path), labels_path and _load_npy(Path(labels_path))
        elif suffix == ".parquet":
            features, labels = _read_parquet(path, **names)
        else:
            features, labels = _read_safetensors(path, **names)
    except DataError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise DataError(f"{path} is not a readable {suffix} file ({type(exc).__name__}: {exc}); "
                        "write it again") from None
    return check_arrays(features, labels, path)


@contextmanager
def _no_object_arrays(path: Path):
    """numpy's refusal to unpickle an object array, as a DataError that says what to save instead."""
    try:
        yield
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: an array is an object array (ragged rows or Python objects); save a "
                            "rectangular numeric array (np.stack the rows), or strings for labels") from None
        raise


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist; check data.embeddings.train_labels/test_labels")
    if path.suffix.lower() != ".npy":
        raise DataError(f"{path}: the labels of a .npy features file must be a .npy file too")
    with _no_object_arrays(path):
        return np.load(path, allow_pickle=False)


def _read_npz(path: Path, *, features_name, labels_name, labels_optional):
    with np.load(path, allow_pickle=False) as z:
        f = _pick(z.files, features_name, FEATURE_NAMES, "array", path, "features_name")
        y = _pick(z.files, labels_name, LABEL_NAMES, "array", path, "labels_name", labels_optional)
        with _no_object_arrays(path):
            return z[f], None if y is None else z[y]


def _read_safetensors(path: Path, *, features_name, labels_name, labels_optional):
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    f = _pick(tensors, features_name, FEATURE_NAMES, "tensor", path, "features_name")
    y = _pick(tensors, labels_name, LABEL_NAMES, "tensor", path, "labels_name", labels_optional)
    return tensors[f], None if y is None else tensors[y]


def _read_parquet(path: Path, *, features_name, labels_name, labels_optional):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = table.column_names
    y = _pick(columns, labels_name, LABEL_NAMES, "column", path, "labels_name", labels_optional)
    listed = features_name or next((n for n in FEATURE_NAMES if n in columns), None)
    if listed is not None and listed not in columns:
        _pick(columns, features_name, FEATURE_NAMES, "column", path, "features_name")  # raises
    labels = None if y is None else table.column(y).to_numpy(zero_copy_only=False)
    kind = table.schema.field(listed).type if listed is not None else None
    if kind is not None and (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        column = table.column(listed).combine_chunks()
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        if column.null_count:
            raise DataError(f"{path}: column {listed!r} has {column.null_count} empty (null) rows; every row needs "
                            "a feature vector")
        if len(set(lengths.tolist())) > 1:
            raise DataError(f"{path}: column {listed!r} is ragged (rows of {int(lengths.min())} to "
                            f"{int(lengths.max())} values); every feature vector needs the same length")
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(column), -1 if len(column) else 0), labels
    rest = [listed] if listed is not None else [c for c in columns if c != y]
    if not rest:
        raise DataError(f"{path} has no feature columns besides the labels {y!r}; add a list-of-floats column "
                        "'features' or one column per dimension")
    bad = [c for c in rest if not (pa.types.is_integer(table.schema.field(c).type)
                                   or pa.types.is_floating(table.schema.field(c).type))]
    if bad:
        raise DataError(f"{path}: feature column(s) {bad[:5]} are of type {table.schema.field(bad[0]).type}, not "
                        "numbers; give one numeric column per dimension or a list-of-floats column 'features' "
                        "(other columns: drop them)")
    return np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in rest], axis=1), labels


def check_arrays(features: np.ndarray, labels: np.ndarray | None, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [N, d] features and 1-D labels (integers or strings; None: no labels); a DataError otherwise."""
    features = np.asarray(features)
    if features.dtype == object:
        raise DataError(f"{path}: the features are an object array (ragged rows?); save a rectangular numeric "
                        "array [N, d] (np.stack the rows)")
    if features.dtype.kind not in "fiu":
        raise DataError(f"{path}: the features have dtype {features.dtype}, not numbers; save them as float32")
    if features.ndim == 1:
        raise DataError(f"{path}: the features are 1-D (shape {features.shape}); they must be [N, d], one row per "
                        "sample (a single feature per sample: save features[:, None])")
    if features.ndim != 2:
        raise DataError(f"{path}: the features have shape {features.shape}; flatten them to [N, d]")
    if len(features) == 0 or features.shape[1] == 0:
        raise DataError(f"{path} holds no features (shape {features.shape})")
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} feature row(s) hold NaN or inf (first: row {int(np.argmax(bad))}); "
                        "re-extract them or drop those rows")
    if labels is None:
        return features.astype(np.float32, copy=False), None
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{path}: the labels have shape {labels.shape}; give one label per row, 1-D")
    if len(features) != len(labels):
        raise DataError(f"{path}: {len(features)} feature rows but {len(labels)} labels; give one label per row")
    if labels.dtype.kind == "f":
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise DataError(f"{path}: the labels are floats that are not whole numbers; give integer class ids "
                            "or class names")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind == "O":
        if not all(isinstance(v, str) for v in labels):
            raise DataError(f"{path}: the labels mix types or hold missing values; give integer class ids or "
                            "class names (strings) for every row")
        labels = labels.astype(str)
    elif labels.dtype.kind == "S":
        labels = labels.astype(str)
    elif labels.dtype.kind not in "iuU":
        raise DataError(f"{path}: the labels have dtype {labels.dtype}; give integer class ids or class names")
    return features.astype(np.float32, copy=False), labels


# --------------------------------------------------------------------------- labels


def encode_labels(train: np.ndarray, test: np.ndarray | None, class_names, train_path, test_path):
    """(train ids, test ids, names or None, C): strings are names, integers ids 0..C-1."""
    is_text = train.dtype.kind == "U"
    if test is not None and (test.dtype.kind == "U") != is_text:
        raise DataError(f"{train_path} has {'string' if is_text else 'integer'} labels but {test_path} "
                        f"{'integer' if is_text else 'string'} ones; use the same kind in both files")
    if is_text:
        names = list(class_names) if class_names is not None else sorted(set(train.tolist()))
        index = {n: i for i, n in enumerate(names)}
        for labels, path in ((train, train_path), (test, test_path)):
            if labels is None:
                continue
            unknown = sorted(set(labels.tolist()) - index.keys())
            if unknown:
                fix = ("add them to data.embeddings.class_names" if class_names is not None else
                       "every test class needs training samples: drop those rows or add training samples")
                known = "data.embeddings.class_names" if class_names is not None else "the training labels"
                raise DataError(f"{path}: label(s) {unknown[:5]} are not in {known}; {fix}")
        ids = [np.array([index[v] for v in labels.tolist()], dtype=np.int64) if labels is not None else None
               for labels in (train, test)]
        return ids[0], ids[1], names, len(names)
    ids = [labels.astype(np.int64) if labels is not None else None for labels in (train, test)]
    for labels, path in ((ids[0], train_path), (ids[1], test_path)):
        if labels is not None and labels.size and labels.min() < 0:
            raise DataError(f"{path}: labels must be class ids 0..C-1, and {int(labels.min())} is negative; "
                            "renumber them")
    num_classes = int(max(ids[0].max(), ids[1].max() if ids[1] is not None and ids[1].size else 0)) + 1
    if class_names is not None:
        if len(class_names) < num_classes:
            raise DataError(f"data.embeddings.class_names has {len(class_names)} names for class ids up to "
                            f"{num_classes - 1}; give one name per class")
        num_classes = len(class_names)
    return ids[0], ids[1], None if class_names is None else list(class_names), num_classes


# --------------------------------------------------------------------------- splits


@dataclass
class EmbeddingsData:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    class_names: list[str] | None = None
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)  # what was done to the data, for the user

    @property
    def class_counts(self) -> list[int]:
        return np.bincount(self.train_y, minlength=self.num_classes).tolist()


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): ``fraction`` of every class held out (rounded; at least one row
    of a class with two or more, never its last), per class from ``RandomState(seed)``."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in range(int(labels.max()) + 1):
        rows = np.where(labels == c)[0]
        rng.shuffle(rows)
        n_test = min(max(int(round(fraction * len(rows))), 1), len(rows) - 1) if len(rows) > 1 else 0
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_embeddings(d) -> EmbeddingsData:
    """The splits of a ``data.dataset: embeddings`` DataConfig (see the module doc)."""
    from .classes import check_counts, class_order_problem
    from .datasets import _hold_out_validation
    from .profiles import long_tail_indices, ordered_counts, profile_counts

    e = d.embeddings
    names = dict(features_name=e.features_name, labels_name=e.labels_name)
    train_path = resolve(e.train, d.root)
    train_x, train_raw = read_embeddings(train_path, e.train_labels and resolve(e.train_labels, d.root), **names)
    test_path = test_x = test_raw = None
    if e.test is not None:
        test_path = resolve(e.test, d.root)
        test_x, test_raw = read_embeddings(test_path, e.test_labels and resolve(e.test_labels, d.root),
                                           labels_key="test_labels", **names)
        if test_x.shape[1] != train_x.shape[1]:
            raise DataError(f"{test_path} holds {test_x.shape[1]}-d features but {train_path} {train_x.shape[1]}-d; "
                            "extract both with the same model")
    train_y, test_y, class_names, num_classes = encode_labels(train_raw, test_raw, e.class_names, train_path, test_path)
    counts = np.bincount(train_y, minlength=num_classes)
    empty = np.where(counts == 0)[0].tolist()
    if empty:
        shown = [f"{c} ({class_names[c]})" if class_names else str(c) for c in empty[:8]]
        raise DataError(f"{train_path}: class(es) {', '.join(shown)} have no training samples; every class needs at "
                        "least one: add samples, renumber the labels 0..C-1 without gaps, or drop the name from "
                        "data.embeddings.class_names")
    notes = []
    if test_path is None:
        keep, held = stratified_split(train_y, e.test_fraction, d.lt_seed)
        test_x, test_y = train_x[held], train_y[held]
        train_x, train_y = train_x[keep], train_y[keep]
        per_class = np.bincount(test_y, minlength=num_classes).tolist()
        notes.append(f"no test file (data.embeddings.test): held out {e.test_fraction:g} of each class of "
                     f"{train_path.name} as the test set, seeded by data.lt_seed={d.lt_seed}; test rows per class "
                     f"{per_class}")
    if d.profile != "as_is":
        have = np.bincount(train_y, minlength=num_classes)
        n_max = d.n_max or int(have.min())
        if d.class_order is not None:
            problem = class_order_problem(d.class_order, num_classes)
            if problem:
                raise DataError(f"data.class_order {problem}; the embeddings have {num_classes} classes: list each "
                                f"of 0..{num_classes - 1} exactly once")
        wanted = ordered_counts(profile_counts(d.profile, n_max, num_classes, d.imbalance_factor), d.class_order)
        short = [c for c in range(num_classes) if have[c] < wanted[c]]
        if short:
            c = short[0]
            raise DataError(f"class {c} has {int(have[c])} training rows but the {d.profile} profile asks for "
                            f"{wanted[c]}; lower data.n_max (it defaults to the smallest class, {int(have.min())})")
        keep = long_tail_indices(train_y, wanted, d.lt_seed)
        notes.append(f"data.profile {d.profile}: kept {len(keep):,} of {len(train_y):,} training rows "
                     f"(n_max {n_max}, imbalance factor {d.imbalance_factor:g})")
    else:
        keep = np.random.RandomState(d.lt_seed).permutation(len(train_y))
    val_x = val_y = None
    if d.val_per_class:
        keep, val_idx = _hold_out_validation(train_y, keep, d.val_per_class, d.lt_seed)
        val_x, val_y = train_x[val_idx], train_y[val_idx]
    keep = np.sort(keep)
    train_x, train_y = train_x[keep], train_y[keep]
    if d.test_per_class:
        rng = np.random.RandomState(d.lt_seed)
        rows = [rng.permutation(np.where(test_y == c)[0])[: d.test_per_class] for c in range(num_classes)]
        rows = np.sort(np.concatenate(rows))
        test_x, test_y = test_x[rows], test_y[rows]
    check_counts(np.bincount(train_y, minlength=num_classes).tolist(), "training rows per class")
    if e.normalize:
        train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
        val_x = None if val_x is None else l2_normalize(val_x)
    return EmbeddingsData(train_x, train_y, test_x, test_y, num_classes, class_names, val_x, val_y, notes)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(x, requirements=("C", "W")))  # a read-only array (pyarrow) is copied
