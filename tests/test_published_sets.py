"""ImageNet-LT, Places-LT and iNaturalist 2018 from their published split files, on stand-ins.

Each stand-in is a few hundred 16x16 JPEGs in the set's own path layout with split files in
its published format (ImageNet-LT / Places-LT text lines, iNaturalist text lines and
COCO-style JSON). The count check compares against the published sizes; to test it
passing, the fixture ``standin_sizes`` monkeypatches the table entry of the set to the
stand-in's sizes (6 classes, 395 / 12 / 18 images), everything else reads the real table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tailaug.cli import main
from tailaug.config import DataConfig, load_config, validate_config
from tailaug.data import published
from tailaug.data.classes import shot_groups
from tailaug.data.datasets import build_data, planned_classes
from tailaug.data.loaders import Batches
from tailaug.data.sources import missing_files
from tailaug.data.transforms import BatchTransform
from tailaug.errors import ConfigError, DataError

# training images per label, as listed (not sorted: the labels are the classes as given);
# shot groups (many > 100, few < 20): many 1, 3; medium 4, 5 (20 and 100 are medium); few 0, 2
TRAIN = [5, 150, 19, 101, 20, 100]
VAL, TEST = 2, 3  # per class
SIZES = {"train": sum(TRAIN), "val": VAL * len(TRAIN), "test": TEST * len(TRAIN)}


def _layout(name: str, split: str, label: int, i: int) -> str:
    """The relative image path of image i of class ``label`` in ``split``, in the set's layout."""
    if name == "imagenet_lt":
        wnid = f"n{label + 1440764:08d}"
        return f"val/{wnid}/ILSVRC2012_val_{label}{i:05d}.JPEG" if split == "test" else \
            f"train/{wnid}/{wnid}_{split}{i}.JPEG"
    if name == "places_lt":
        return f"data_256/{'abcdef'[label]}/class{label}/{split}{i:08d}.jpg"
    return f"train_val2018/Plantae/{label}/{split}{i:032x}.jpg"


def _color(label: int) -> tuple[int, int, int]:
    return (40 * label + 20, 200 - 30 * label, 90)


def write_standin(root, name: str, inat_json: bool = False) -> dict[str, list[tuple[str, int]]]:
    """The stand-in of ``name`` under ``root``: images (one solid colour per class) and the
    published split files; returns {split: [(relative path, label)] in file order}."""
    rng = np.random.RandomState(0)
    per_class = {"train": TRAIN, "val": [VAL] * 6, "test": [TEST] * 6}
    if name == "inat2018":  # published: train and val, and the papers test on val
        per_class = {"train": TRAIN, "val": [TEST] * 6}
    listed = {}
    for split, counts in per_class.items():
        entries = [(_layout(name, split, c, i), c) for c in range(6) for i in range(counts[c])]
        entries = [entries[k] for k in rng.permutation(len(entries))]  # classes interleaved
        for rel, c in entries:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), _color(c)).save(root / rel, "JPEG", quality=95)
        listed[split] = entries
    for split, entries in listed.items():
        if name == "inat2018" and inat_json:
            images = [{"id": 1000 + k, "file_name": rel, "width": 16, "height": 16}
                      for k, (rel, _) in enumerate(entries)]
            anns = [{"id": k, "image_id": 1000 + k, "category_id": c} for k, (_, c) in enumerate(entries)]
            anns.reverse()  # annotations need not follow the images' order
            tree = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"s{c}"} for c in range(6)]}
            (root / f"{split}2018.json").write_text(json.dumps(tree))
        else:
            file = {"imagenet_lt": f"ImageNet_LT_{split}.txt", "places_lt": f"Places_LT_{split}.txt",
                    "inat2018": f"iNaturalist18_{split}.txt"}[name]
            (root / file).write_text("".join(f"{rel} {c}\n" for rel, c in entries))
    if name == "inat2018":
        listed["test"], listed["val"] = listed.pop("val"), None
    return listed


FORMATS = [("imagenet_lt", False), ("places_lt", False), ("inat2018", False), ("inat2018", True)]
FORMAT_IDS = ["imagenet_lt", "places_lt", "inat2018-txt", "inat2018-json"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    out = {}
    for name, as_json in FORMATS:
        root = tmp_path_factory.mktemp(f"{name}{'_json' if as_json else ''}")
        out[(name, as_json)] = (root, write_standin(root, name, as_json))
    return out


@pytest.fixture
def standin_sizes(monkeypatch):
    """The table entries of the three sets with the stand-ins' sizes (nothing else changed)."""
    for name, entry in list(published.PUBLISHED.items()):
        sizes = {split: SIZES["test" if name == "inat2018" and split == "test" else split] for split in entry.sizes}
        monkeypatch.setitem(published.PUBLISHED, name, dataclasses.replace(entry, num_classes=6, sizes=sizes))


def cfg_of(name, root, **kw) -> DataConfig:
    return DataConfig(dataset=name, root=str(root), image_size=16, **kw)


@pytest.mark.parametrize("name, as_json", FORMATS, ids=FORMAT_IDS)
def test_splits_counts_class_order_and_shot_groups(standins, standin_sizes, name, as_json):
    root, listed = standins[(name, as_json)]
    data = build_data(cfg_of(name, root))
    assert data.name == name and data.num_classes == 6 and data.in_channels == 3
    assert data.class_counts == TRAIN
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        if listed[split] is None:
            assert part is None  # iNaturalist publishes no validation split besides its val (= test)
            continue
        assert part.labels.tolist() == [c for _, c in listed[split]]  # in file order, labels as listed
        assert list(part.dataset.paths) == [str(root / rel) for rel, _ in listed[split]]
    assert shot_groups(data.class_counts) == {"many": [1, 3], "medium": [4, 5], "few": [0, 2]}
    image, label = data.train.dataset[7]  # the image behind a line is the one its label names
    assert label == listed["train"][7][1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert (image[:, 8, 8].int() - torch.tensor(_color(label))).abs().max() <= 6
    if name == "inat2018":
        assert data.notes[0].startswith("test set: the published validation split (3 images per class)")
        test_file = "val2018.json" if as_json else "iNaturalist18_val.txt"
        assert data.notes[-1] == f"test: 18 images from {root / test_file}"
    else:
        assert data.notes[-3:] == [f"{s}: {SIZES[s]} images from {root / f}" for s, f in zip(
            ("train", "val", "test"), (f"{'ImageNet_LT' if name == 'imagenet_lt' else 'Places_LT'}_{s}.txt"
                                       for s in ("train", "val", "test")))]


def test_inat_txt_and_json_give_the_same_splits(standins, standin_sizes):
    (root_t, _), (root_j, _) = standins[("inat2018", False)], standins[("inat2018", True)]
    txt, js = build_data(cfg_of("inat2018", root_t)), build_data(cfg_of("inat2018", root_j))
    for split in ("train", "test"):
        a, b = getattr(txt, split), getattr(js, split)
        assert a.labels.tolist() == b.labels.tolist()
        assert [p.replace(str(root_t), "") for p in a.dataset.paths] == \
            [p.replace(str(root_j), "") for p in b.dataset.paths]
    # a JSON named by the config is read as COCO-style too, whatever the other files
    named = build_data(cfg_of("inat2018", root_t, train_split=str(root_j / "train2018.json")))
    assert named.train.labels.tolist() == txt.train.labels.tolist()


def test_describe_reads_the_split_files_only(standins, standin_sizes, monkeypatch, tmp_path, capsys):
    def no_decoding(*args, **kwargs):
        raise AssertionError("describe opened an image")

    monkeypatch.setattr(Image, "open", no_decoding)
    monkeypatch.setattr("tailaug.data.sources.read_image", no_decoding)
    root, _ = standins[("imagenet_lt", False)]
    config = tmp_path / "c.yaml"
    config.write_text("data: {dataset: imagenet_lt}\n")
    assert main(["datasets", "describe", str(config), f"data.root={root}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "dataset imagenet_lt  profile as_is  classes 6"
    assert [line.split() for line in out[2:8]] == [["0", "5", "few"], ["1", "150", "many"], ["2", "19", "few"],
                                                   ["3", "101", "many"], ["4", "20", "medium"], ["5", "100", "medium"]]
    assert out[8] == "total 395 training images; max 150, min 5, ratio 30.0"
    assert out[9] == "shot groups (many > 100, few < 20): many 2 classes, medium 2 classes, few 2 classes"
    assert out[10:] == [f"train: 395 images from {root / 'ImageNet_LT_train.txt'}",
                        f"val: 12 images from {root / 'ImageNet_LT_val.txt'}",
                        f"test: 18 images from {root / 'ImageNet_LT_test.txt'}"]
    with pytest.raises(AssertionError, match="opened an image"):  # the patch is live
        build_data(cfg_of("imagenet_lt", root)).train.dataset[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_jpeg_is_one_line_naming_the_file(tmp_path, standin_sizes, workers):
    listed = write_standin(tmp_path, "places_lt")
    bad = tmp_path / listed["train"][3][0]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG: the header opens, the pixels do not
    data = build_data(cfg_of("places_lt", tmp_path))  # split files only: nothing decoded yet
    transform = BatchTransform(data.mean, data.std, padding=0, flip=False)
    batches = Batches(data.train, 8, transform, torch.device("cpu"), num_workers=workers)
    with pytest.raises(DataError) as caught:
        list(batches)
    message = str(caught.value)
    assert message.startswith(f"cannot decode image {bad} (OSError: ")
    assert message.endswith("remove it from the split file or replace it with an intact image")
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("name, as_json", FORMATS, ids=FORMAT_IDS)
def test_the_count_check_against_the_published_sizes(standins, name, as_json):
    root, _ = standins[(name, as_json)]
    entry = published.PUBLISHED[name]
    file = {"imagenet_lt": "ImageNet_LT_train.txt", "places_lt": "Places_LT_train.txt",
            "inat2018": "train2018.json" if as_json else "iNaturalist18_train.txt"}[name]
    problem = (f"{root / file} lists 395 images, the published {entry.title} train split {entry.sizes['train']:,} "
               f"and has 6 distinct labels (largest 5), the published {entry.title} {entry.num_classes:,} classes "
               f"(labels 0..{entry.num_classes - 1:,})")
    with pytest.raises(DataError) as caught:
        build_data(cfg_of(name, root))
    fix = "give the published file, or set data.count_check: warn to use a variant of the set"
    assert str(caught.value) == f"{problem}; {fix}"
    data = build_data(cfg_of(name, root, count_check="warn"))
    assert data.class_counts == TRAIN
    warning = (f"warning: {problem}: a variant of {entry.title} (data.count_check: warn), not comparable with the "
               "published results")
    assert warning in data.notes


def test_one_line_more_or_less_fails_the_check(tmp_path, standin_sizes):
    write_standin(tmp_path, "imagenet_lt")
    assert build_data(cfg_of("imagenet_lt", tmp_path)).class_counts == TRAIN  # the stand-in's sizes pass
    lines = (tmp_path / "ImageNet_LT_test.txt").read_text().splitlines()
    (tmp_path / "ImageNet_LT_test.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=r"ImageNet_LT_test\.txt lists 17 images, the published ImageNet-LT test "
                                        r"split 18; give the published file"):
        build_data(cfg_of("imagenet_lt", tmp_path))
    only_five = [line for line in lines if not line.endswith(" 5")]
    (tmp_path / "ImageNet_LT_test.txt").write_text("\n".join(only_five + only_five[:3]) + "\n")  # 18 lines, 5 classes
    with pytest.raises(DataError, match=r"ImageNet_LT_test\.txt has 5 distinct labels \(largest 4\), the "
                                        r"published ImageNet-LT 6 classes \(labels 0\.\.5\); give"):
        build_data(cfg_of("imagenet_lt", tmp_path))
    assert build_data(cfg_of("imagenet_lt", tmp_path, count_check="warn")).test.labels.max() == 4


@pytest.mark.parametrize("name, file", [("imagenet_lt", "ImageNet_LT_val.txt"), ("places_lt", "Places_LT_val.txt")])
def test_a_validation_file_of_yours_has_only_its_labels_checked(tmp_path, standin_sizes, name, file):
    write_standin(tmp_path, name)
    lines = (tmp_path / file).read_text().splitlines()
    (tmp_path / file).write_text("\n".join(lines[:-1]) + "\n")  # the published default file: its size is checked
    with pytest.raises(DataError, match=rf"{file} lists 11 images, the published .* val split 12; give the "):
        build_data(cfg_of(name, tmp_path))
    mine = [line for line in lines if line.endswith((" 0", " 4"))][:3]  # 3 images of 2 classes
    (tmp_path / "mine.txt").write_text("\n".join(mine) + "\n")
    data = build_data(cfg_of(name, tmp_path, val_split="mine.txt"))
    assert data.val.labels.tolist() == [int(line[-1]) for line in mine] and len(data.test) == 18
    assert not any(note.startswith("warning") for note in data.notes)
    (tmp_path / "mine.txt").write_text(mine[0][:-1] + "6\n")
    with pytest.raises(DataError, match=r"mine\.txt has label 6, the published .* 6 classes \(labels 0\.\.5\)"):
        build_data(cfg_of(name, tmp_path, val_split="mine.txt"))


def test_missing_split_files_and_images(tmp_path, standin_sizes):
    write_standin(tmp_path, "inat2018")
    (tmp_path / "iNaturalist18_val.txt").unlink()
    with pytest.raises(DataError) as caught:
        build_data(cfg_of("inat2018", tmp_path))
    assert str(caught.value) == (
        f"the iNaturalist 2018 test split file is not in data.root (looked for {tmp_path / 'iNaturalist18_val.txt'} "
        f"and {tmp_path / 'val2018.json'}); put the published file there, or name yours with data.test_split")
    with pytest.raises(DataError, match=r"split file mine\.txt not found \(looked at mine\.txt and .*mine\.txt\)"):
        build_data(cfg_of("inat2018", tmp_path, test_split="mine.txt"))
    with pytest.raises(DataError, match=r"data\.root .*nowhere does not exist; set data\.root to the iNaturalist "
                                        r"2018 image root \(the folder the split files' paths are relative to\)$"):
        build_data(cfg_of("inat2018", tmp_path / "nowhere"))
    lines = (tmp_path / "iNaturalist18_train.txt").read_text().splitlines()
    gone = tmp_path / lines[10].rsplit(" ", 1)[0]
    gone.unlink()
    with pytest.raises(DataError, match=rf"iNaturalist18_train\.txt: 1 listed image\(s\) do not exist under "
                                        rf"{tmp_path} \(line 11: {gone}\); set data\.root"):
        build_data(cfg_of("inat2018", tmp_path, test_split="iNaturalist18_train.txt", count_check="warn"))


def test_missing_files_lists_each_folder_once(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    for name in ("x.jpg", "y.jpg"):
        (tmp_path / "a" / name).write_bytes(b"")
    (tmp_path / "a" / "dir.jpg").mkdir()
    paths = [tmp_path / "a" / n for n in ("x.jpg", "dir.jpg", "y.jpg", "z.jpg")] + [tmp_path / "b" / "x.jpg"]
    scanned = []
    real = os.scandir

    def counting(folder):
        scanned.append(folder)
        return real(folder)

    monkeypatch.setattr("tailaug.data.sources.os.scandir", counting)
    assert missing_files(paths * 3) == [1, 3, 4, 6, 8, 9, 11, 13, 14]
    assert sorted(scanned) == [str(tmp_path / "a"), str(tmp_path / "b")]
    listings: dict = {}  # kept across calls (the splits of a set): no folder is listed again
    assert missing_files(paths[:2], listings) == [1] and missing_files(paths[2:], listings) == [1, 2]
    assert sorted(scanned) == sorted([str(tmp_path / "a"), str(tmp_path / "b")] * 2)
    assert listings == {str(tmp_path / "a"): {"x.jpg", "y.jpg"}, str(tmp_path / "b"): set()}


def test_missing_files_splits_split_file_paths_at_slashes_under_windows_rules(tmp_path, monkeypatch):
    """A split file's paths join root and a "/"-separated relative path; on Windows (os.sep "\\",
    ntpath) every folder must still be found, not each whole path taken for a name in "."."""
    import ntpath

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    paths = [f"{tmp_path}/a/x.jpg", f"{tmp_path}/a/y.jpg", "x.jpg"]
    with monkeypatch.context() as windows:
        windows.setattr(os, "sep", "\\")
        windows.setattr(os, "path", ntpath)
        windows.chdir(tmp_path / "a")  # the bare name is looked up in the working directory
        missing = missing_files(paths)
    assert missing == [1]


def test_json_annotation_errors(tmp_path, standin_sizes):
    write_standin(tmp_path, "inat2018", inat_json=True)
    tree = json.loads((tmp_path / "train2018.json").read_text())
    tree["annotations"] = tree["annotations"][1:]  # the last image (the list was reversed) loses its class
    (tmp_path / "mine.json").write_text(json.dumps(tree))
    last = len(tree["images"]) - 1
    with pytest.raises(DataError, match=rf"mine\.json images\[{last}\] \(train_val2018/.*\.jpg\) has no annotation"):
        build_data(cfg_of("inat2018", tmp_path, train_split="mine.json"))
    (tmp_path / "mine.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=r"mine\.json is not a COCO-style annotation file"):
        build_data(cfg_of("inat2018", tmp_path, train_split="mine.json"))


def test_unknown_dataset_names_and_settings_that_do_not_apply():
    with pytest.raises(ConfigError, match=r"data.dataset = 'imagenet-lt': unknown dataset; did you mean "
                                          r"'imagenet_lt'\? \(choose one of .*places_lt, inat2018\)"):
        load_config(None, ["data.dataset=imagenet-lt"])
    with pytest.raises(ConfigError, match=r"data.dataset = 'inaturalist': unknown dataset \(choose one of"):
        load_config(None, ["data.dataset=inaturalist"])
    with pytest.raises(ConfigError, match=r"data.val_per_class = 20: is not read for dataset places_lt: "
                                          r"data.val_split names the validation split file; remove it"):
        load_config(None, ["data.dataset=places_lt", "data.val_per_class=20"])
    with pytest.raises(ConfigError, match=r"data.imbalance_factor = 50.0: is not read for dataset imagenet_lt: "
                                          r"the split files give the class counts \(profile as_is\); remove it"):
        load_config(None, ["data.dataset=imagenet_lt", "data.imbalance_factor=50"])
    with pytest.raises(ConfigError, match=r"data.lt_seed = 3: is not read for dataset inat2018: no subset is drawn"):
        load_config(None, ["data.dataset=inat2018", "data.lt_seed=3"])
    saved = load_config(None, ["data.dataset=places_lt"])  # a saved config.yaml lists the defaults: accepted
    assert validate_config(yaml.safe_load(saved.to_yaml())).data == saved.data
    with pytest.raises(ConfigError, match=r"data.count_check = 'warn': is read for the published sets"):
        load_config(None, ["data.count_check=warn"])
    with pytest.raises(ConfigError, match=r"and this config has none: set data.val_split \(a split file of "
                                          r"validation images; iNaturalist 2018 publishes none"):
        load_config(None, ["data.dataset=inat2018", "retrain.select={grid: {lr: [0.1, 0.2]}}"])
    d = load_config(None, ["data.dataset=inat2018"]).data
    assert (d.profile, d.shots.many, d.shots.few, d.count_check) == ("as_is", 100, 20, "strict")


def test_an_inat_validation_split_is_yours_and_never_the_test_file(tmp_path, standin_sizes):
    write_standin(tmp_path, "inat2018")
    with pytest.raises(DataError, match=r"the validation and the test split are both .*iNaturalist18_val\.txt; "
                                        r"choosing on it would choose on the test set"):
        build_data(cfg_of("inat2018", tmp_path, val_split="iNaturalist18_val.txt"))
    train = (tmp_path / "iNaturalist18_train.txt").read_text().splitlines()
    mine = [line for line in train if line.endswith((" 1", " 3"))][:7]  # no published size or classes to match
    (tmp_path / "mine.txt").write_text("\n".join(mine) + "\n")
    data = build_data(cfg_of("inat2018", tmp_path, val_split="mine.txt"))
    assert data.val.labels.tolist() == [int(line[-1]) for line in mine] and len(data.test) == 18
    (tmp_path / "mine.txt").write_text(mine[0][:-1] + "6\n")
    with pytest.raises(DataError, match=r"mine\.txt has label 6, the published iNaturalist 2018 6 classes "
                                        r"\(labels 0\.\.5\); give the published file"):
        build_data(cfg_of("inat2018", tmp_path, val_split="mine.txt"))


def test_planned_classes_agree_with_build_data(standins, standin_sizes):
    root, _ = standins[("places_lt", False)]
    counts, names, notes = planned_classes(cfg_of("places_lt", root))
    assert counts == TRAIN and names is None and notes == build_data(cfg_of("places_lt", root)).notes


# --------------------------------------------------------------------------- the shipped configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("config, name, as_json", [
    ("imagenet_lt/base.yaml", "imagenet_lt", False), ("places_lt/base.yaml", "places_lt", False),
    ("inat2018/base.yaml", "inat2018", True),
], ids=["imagenet_lt", "places_lt", "inat2018-json"])
def test_shipped_configs_describe_their_stand_in(standins, standin_sizes, capsys, config, name, as_json):
    root, _ = standins[(name, as_json)]
    assert main(["datasets", "describe", str(CONFIGS / config), f"data.root={root}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"dataset {name}  profile as_is  classes 6"
    assert out[8] == "total 395 training images; max 150, min 5, ratio 30.0"


def test_shipped_imagenet_lt_recipe_runs_end_to_end_on_its_stand_in(standins, standin_sizes, tmp_path, capsys):
    """configs/imagenet_lt/base.yaml as shipped (natural pipeline, float16 feature shards,
    stage 3 streamed from them, cosine stage-3 schedule), shrunk only in model, sizes and
    stage-3 batch (a 6-class stand-in gives stage 3 one batch an epoch otherwise)."""
    root, _ = standins[("imagenet_lt", False)]
    overrides = [f"data.root={root}", f"run.output_dir={tmp_path}", "model.arch=resnet32", "data.image_size=16",
                 "data.num_workers=0", "train.epochs=4", "train.batch_size=64", "stg.epochs=2", "retrain.epochs=2",
                 "features.shard_rows=100", "run.device=cpu", "retrain.batch_size=32", "retrain.epochs=10",
                 "retrain.lr=0.01"]
    assert main(["run", str(CONFIGS / "imagenet_lt/base.yaml"), *overrides]) == 0
    run_dir = tmp_path / "imagenet_lt_r50"
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert {"stage 1", "cRT", "cRT + STG (lambda 1.5)"} <= set(rows)
    cache = next((run_dir / "features").glob("*/index.json"))
    index = json.loads(cache.read_text())
    assert index["arrays"]["train_features"]["dtype"] == "float16"
    assert len(index["arrays"]["train_features"]["shards"]) == 4  # 395 rows in shards of 100
    assert rows["cRT"]["metrics"]["top1"] > 100 / 3  # one solid colour per class: above twice chance (1/6)
