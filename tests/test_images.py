"""Image folders (root/<class>/*.png): splits, profiles, errors, and `tailaug datasets describe`."""

from __future__ import annotations

import numpy as np
import pytest

from tailaug.cli import main
from tailaug.config import DataConfig
from tailaug.data.datasets import build_data, planned_classes
from tailaug.data.image_folders import folder_splits
from tailaug.errors import DataError

from synthetic import write_class_folders

COUNTS = {"emu": 30, "cat": 22, "dog": 16}  # sorted: cat, dog, emu


def folder_cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="image_folder", root=str(root), image_size=28, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("imgs") / "train", COUNTS, size=28)


def test_classes_are_the_sorted_folders_and_the_default_holds_10_test_images_out(folder):
    splits = folder_splits(folder_cfg(folder))
    assert splits.class_names == ["cat", "dog", "emu"]
    # as_is: every image not held out trains; 10 per class are the test set
    assert np.bincount(splits.train[1]).tolist() == [12, 6, 20]
    assert np.bincount(splits.test[1]).tolist() == [10, 10, 10]
    assert splits.val is None
    assert splits.notes == ["test set: 10 images per class held out of data.root (no data.test_root)"]
    train, test = set(splits.train[0]), set(splits.test[0])
    assert not train & test and len(train | test) == sum(COUNTS.values())
    assert all(p.parent.name == ["cat", "dog", "emu"][y] for p, y in zip(*splits.train))


def test_validation_and_test_hold_outs_are_disjoint_and_seeded(folder):
    cfg = folder_cfg(folder, val_per_class=3, test_per_class=4)
    a, b = folder_splits(cfg), folder_splits(cfg)
    assert a.train[0] == b.train[0] and a.val[0] == b.val[0]  # same seed, same split
    assert np.bincount(a.val[1]).tolist() == [3, 3, 3] and np.bincount(a.test[1]).tolist() == [4, 4, 4]
    assert np.bincount(a.train[1]).tolist() == [15, 9, 23]
    assert len(set(a.train[0]) | set(a.val[0]) | set(a.test[0])) == sum(COUNTS.values())
    other = folder_splits(folder_cfg(folder, val_per_class=3, test_per_class=4, lt_seed=1))
    assert other.val[0] != a.val[0]


def test_a_profile_redraws_the_training_set(folder):
    cfg = folder_cfg(folder, profile="exponential", imbalance_factor=4)
    splits = folder_splits(cfg)
    # n_max defaults to the smallest class's rest (dog: 16 - 10 = 6): 6, int(6 * 0.5), int(6 * 0.25)
    assert np.bincount(splits.train[1]).tolist() == [6, 3, 1]
    assert "exponential profile, n_max 6, imbalance factor 4" in splits.notes[0]
    with pytest.raises(DataError, match="asks for 13 training images of class 'cat', which has 12 left"):
        folder_splits(folder_cfg(folder, profile="exponential", imbalance_factor=4, n_max=13))


def test_a_separate_test_folder(folder, tmp_path):
    test_root = write_class_folders(tmp_path / "test", {"cat": 3, "dog": 4, "emu": 5}, size=28, seed=1)
    splits = folder_splits(folder_cfg(folder, test_root=str(test_root)))
    assert np.bincount(splits.train[1]).tolist() == [22, 16, 30]  # nothing held out
    assert np.bincount(splits.test[1]).tolist() == [3, 4, 5] and splits.notes == []
    assert np.bincount(folder_splits(folder_cfg(folder, test_root=str(test_root), test_per_class=3))
                       .test[1]).tolist() == [3, 3, 3]


@pytest.mark.parametrize("damage, expected", [
    (lambda root: (root / "dog").rename(root.parent / "dog"), "data.root .* has one class folder"),
    (lambda root: (root / "emu").mkdir(),
     r"class folder\(s\) 'emu' in .* hold no images .*; add images or remove the folder"),
    (lambda root: (root / "cat" / "000.png").write_bytes(b"not a png"),
     r"cat/000.png is not a readable image .*; remove it or replace it with an intact image"),
    (lambda root: [p.unlink() for p in sorted((root / "dog").glob("*.png"))[:8]],
     r"class 'dog' has 2 image\(s\); holding out 2 test image\(s\) per class leaves it none to train on"),
])
def test_folder_errors(tmp_path, damage, expected):
    root = write_class_folders(tmp_path / "train", {"cat": 10, "dog": 10}, size=28)
    damage(root)
    with pytest.raises(DataError, match=expected):
        folder_splits(folder_cfg(root, test_per_class=2))


def test_test_folder_must_have_every_class_and_no_other(tmp_path):
    root = write_class_folders(tmp_path / "train", {"cat": 4, "dog": 4}, size=28)
    test = write_class_folders(tmp_path / "test", {"cat": 2}, size=28)
    with pytest.raises(DataError, match=r"class\(es\) 'dog' of data.root have no folder in data.test_root"):
        folder_splits(folder_cfg(root, test_root=str(test)))
    write_class_folders(test, {"dog": 2, "yak": 1}, size=28)
    with pytest.raises(DataError, match=r"has class folder\(s\) 'yak' that data.root lacks"):
        folder_splits(folder_cfg(root, test_root=str(test)))


def test_a_root_without_class_folders(tmp_path):
    write_class_folders(tmp_path, {"x": 1}, size=28)
    (tmp_path / "x" / "000.png").rename(tmp_path / "loose.png")
    (tmp_path / "x").rmdir()
    with pytest.raises(DataError, match=r"has no class sub-folders \(the images lie in it directly\); put the "
                                        r"images of each class in .*/<class name>/"):
        folder_splits(folder_cfg(tmp_path))


def test_build_data_reads_images_with_names(folder):
    data = build_data(folder_cfg(folder, val_per_class=2))
    assert data.class_names == ["cat", "dog", "emu"] and data.num_classes == 3 and data.in_channels == 3
    assert data.class_counts == [10, 4, 18]
    image, label = data.train.dataset[0]
    assert tuple(image.shape) == (3, 28, 28) and label == 0
    assert planned_classes(folder_cfg(folder, val_per_class=2))[:2] == ([10, 4, 18], ["cat", "dog", "emu"])


def test_describe_lists_the_class_names(folder, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{dataset: image_folder, root: {folder}}}\n")
    assert main(["datasets", "describe", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "dataset image_folder  profile as_is  classes 3"
    assert [line.split() for line in out[2:5]] == [["0", "cat", "12", "few"], ["1", "dog", "6", "few"],
                                                   ["2", "emu", "20", "medium"]]
    assert out[-1] == "test set: 10 images per class held out of data.root (no data.test_root)"
