"""Config: validation, error messages that name the key and the fix, overrides, hashing, YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tailaug.augment.stg import STGAugmenter
from tailaug.config import Config, apply_override, load_config, parse_override, validate_config
from tailaug.losses.ce import FocalLoss
from tailaug.losses.ldam import LDAMLoss
from tailaug.errors import ConfigError, TailaugError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.yml"))


def error_of(overrides: list[str], path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_defaults_validate_and_equal_empty_config():
    cfg = load_config()
    assert cfg == Config()
    assert validate_config({}) == Config()
    assert cfg.train.epochs == 200 and cfg.train.milestones == [160, 180]
    assert cfg.train.loss[0].name == "ce"
    assert cfg.retrain.augmenter.name == "none"
    assert cfg.retrain.sampler.kind == "class_balanced"
    assert cfg.data.imbalance_factor == 100.0


def test_config_error_is_a_tailaug_error():
    assert issubclass(ConfigError, TailaugError)


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, unknown, suggestion",
    [
        ("train.epchs=5", "train.epchs", "train.epochs"),
        ("run.nme=x", "run.nme", "run.name"),
        ("stg.head.rul=top_k", "stg.head.rul", "stg.head.rule"),
        ("data.shots.manny=5", "data.shots.manny", "data.shots.many"),
        # inside a discriminated union: the path is the one the user wrote, without the tag
        ("train.loss=[{name: focal, gama: 1}]", "train.loss.0.gama", "train.loss.0.gamma"),
        ("train.loss=[{name: ce}, {name: ldam, scael: 2}]", "train.loss.1.scael", "train.loss.1.scale"),
        ("retrain.augmenter={name: stg, lamb: 1}", "retrain.augmenter.lamb", "retrain.augmenter.lam"),
        ("retrain.augmenter={name: noise, sdt: 1}", "retrain.augmenter.sdt", "retrain.augmenter.std"),
    ],
)
def test_misspelt_key_names_key_and_closest_valid_key(override, unknown, suggestion):
    msg = error_of([override])
    assert f"unknown key '{unknown}'" in msg
    assert f"did you mean '{suggestion}'?" in msg
    # the union tag (focal / ldam / stg / noise) is not a path segment the user wrote
    for tag in ("focal.", "ldam.", "stg.", "noise."):
        assert f".{tag}" not in msg


def test_unknown_key_with_no_close_match_lists_valid_keys():
    msg = error_of(["run.zzzzzzzz=1"])
    assert "unknown key 'run.zzzzzzzz'" in msg
    assert "valid keys: name, output_dir, seed, device" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  loss:\n    - name: focal\n      gama: 1\n")
    msg = error_of([], path)
    assert msg.startswith(f"{path} is not valid:")
    assert "unknown key 'train.loss.0.gama': did you mean 'train.loss.0.gamma'?" in msg


def test_bad_value_inside_union_shows_clean_path():
    msg = error_of(["train.loss=[{name: focal, gamma: -1}]"])
    assert "train.loss.0.gamma = -1" in msg and "greater than or equal to 0" in msg
    msg = error_of(["retrain.augmenter={name: stg, t: 2}"])
    assert "retrain.augmenter.t = 2" in msg and "less than or equal to 1" in msg


def test_unknown_union_tag_lists_the_valid_tags():
    msg = error_of(["train.loss=[{name: focl}]"])
    assert "train.loss.0" in msg and "'focl'" in msg
    assert "did you mean 'focal'?" in msg
    for name in ("ce", "focal", "ldam", "balanced_softmax", "sphereface"):
        assert name in msg.split("available: ")[1].split(", ")


def test_every_error_is_reported_at_once():
    msg = error_of(["train.epchs=5", "model.arch=resnet33"])
    assert "train.epchs" in msg and "model.arch" in msg


# --------------------------------------------------------------------------- bad values


def test_imbalance_factor_below_one():
    msg = error_of(["data.imbalance_factor=0.5"])
    assert "data.imbalance_factor = 0.5" in msg
    assert "greater than or equal to 1" in msg


def test_unknown_arch_lists_allowed_archs():
    msg = error_of(["model.arch=resnet33"])
    assert "model.arch = 'resnet33'" in msg
    for arch in ("resnet20", "resnet32", "resnet110", "resnet18", "resnext50_32x4d"):
        assert arch in msg.split("available: ")[1].split(", ")


def test_decreasing_milestones():
    msg = error_of(["train.milestones=[180,160]"])
    assert "milestones [180, 160] must be increasing" in msg
    assert "train" in msg


@pytest.mark.parametrize(
    "override, shown, problem",
    [
        ("train.epochs=true", "train.epochs = True", "expected a number, not the boolean true"),
        ("train.lr=false", "train.lr = False", "expected a number, not the boolean false"),
        ("train.grad_clip=true", "train.grad_clip = True", "expected a number, not the boolean true"),
        ("train.milestones=[10, true]", "train.milestones = [10, True]", "expected a number, not the boolean true"),
        ("train.loss.0.weight=true", "train.loss.0.weight = True", "expected a number, not the boolean true"),
        ("retrain.augmenter={name: stg, lam: true}", "retrain.augmenter.lam = True",
         "expected a number, not the boolean true"),
        ("train.nesterov=1", "train.nesterov = 1", "expected true or false, not int 1"),
        ("data.flip='yes'", "data.flip = 'yes'", "expected true or false, not str 'yes'"),
        ("train.epochs=5.0", "train.epochs = 5.0", "expected a whole number such as 5, not float 5.0"),
        ("train.epochs='5'", "train.epochs = '5'", "expected a whole number such as 5, not str '5'"),
        ("data.n_max=2.5", "data.n_max = 2.5", "expected a whole number such as 5, not float 2.5"),
    ],
)
def test_bools_and_numbers_are_kept_apart(override, shown, problem):
    # lax pydantic would read true as 1 (a 1-epoch run) and 1 as true
    msg = error_of([override])
    assert f"{shown}: {problem}" in msg


def test_strict_values_also_on_assignment():
    cfg = Config()
    with pytest.raises(ValidationError, match="expected a number, not the boolean true"):
        cfg.train.epochs = True
    with pytest.raises(ValidationError, match="expected true or false"):
        cfg.data.flip = 0


def test_numbers_that_stay_accepted():
    # an int for a float field, YAML 1.1's "1e-3" string, null for an optional number, yes/no booleans
    cfg = load_config(None, ["train.lr=1", "train.weight_decay=5e-4", "train.grad_clip=null", "data.flip=no",
                             "data.imbalance_factor=50", "stg.hidden_dims=[8, 4]"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(5e-4)
    assert cfg.train.grad_clip is None and cfg.data.flip is False
    assert cfg.data.imbalance_factor == 50.0 and cfg.stg.hidden_dims == [8, 4]


@pytest.mark.parametrize("value", [".inf", "inf", ".nan", "nan"])
def test_infinite_or_nan_number(value):
    msg = error_of([f"train.lr={value}"])
    assert "train.lr = " in msg and "finite number" in msg


@pytest.mark.parametrize("key", ["run.seed", "data.lt_seed", "retrain.seed"])
def test_seeds_are_bounded_by_numpy(key):
    # numpy's RandomState and np.random.seed overflow at 2**32
    assert load_config(None, [f"{key}={2**32 - 1}"])
    msg = error_of([f"{key}={2**32}"])
    assert f"{key} = 4294967296: Input should be less than 4294967296" in msg


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist", "cifar10", "cifar100"])
def test_num_classes_only_for_image_folders(dataset):
    msg = error_of([f"data.dataset={dataset}", "data.num_classes=5"])
    assert (f"data.num_classes is read for dataset 'image_folder' only; {dataset} has a fixed number of "
            "classes: remove data.num_classes") in msg


@pytest.mark.parametrize("order, problem", [
    ("[1, 8, 9, 5, 7, 3, 0, 2, 4]", "has 9 entries for 10 classes; leaves out class 6"),
    ("[1, 8, 9, 5, 7, 3, 0, 2, 4, 6, 5]", "has 11 entries for 10 classes; lists class 5 more than once"),
    ("[1, 1, 9, 5, 7, 3, 0, 2, 4, 6]", "lists class 1 more than once; leaves out class 8"),
    ("[1, 8, 9, 5, 7, 3, 0, 2, 4, 10]", "names class 10 outside 0..9; leaves out class 6"),
    ("[]", "has 0 entries for 10 classes; leaves out classes 0, 1, 2, 3, 4, 5, 6, 7, ..."),
])
def test_a_class_order_that_is_not_a_permutation_is_a_config_error(order, problem):
    msg = error_of([f"data.class_order={order}"])
    assert msg.splitlines()[1].strip() == (
        f"data.class_order = {order}: {problem}; fashion_mnist has 10 classes: list each of 0..9 exactly once "
        "(profile count i goes to class class_order[i])")


def test_class_order_is_checked_against_the_classes_of_the_dataset():
    order = "[1, 8, 9, 5, 7, 3, 0, 2, 4, 6]"
    assert load_config(None, [f"data.class_order={order}"]).data.class_order == [1, 8, 9, 5, 7, 3, 0, 2, 4, 6]
    msg = error_of(["data.dataset=cifar100", f"data.class_order={order}"])
    assert "has 10 entries for 100 classes; leaves out classes 10, 11" in msg and "cifar100 has 100 classes" in msg
    msg = error_of(["data.class_order=[0, true, 2, 3, 4, 5, 6, 7, 8, 9]"])
    assert "expected a number, not the boolean true" in msg


def test_class_order_is_refused_for_an_image_folder():
    msg = error_of(["data.dataset=image_folder", "data.root=/data", "data.train_split=train.txt",
                    "data.test_split=test.txt", "data.class_order=[1, 0]"])
    assert ("data.class_order = [1, 0]: orders the profile's counts of a built-in dataset; an image folder's "
            "class counts come from its split file: remove data.class_order") in msg


def test_shot_thresholds_out_of_order():
    msg = error_of(["data.shots.few=200"])
    assert "few (200) must not exceed many (100)" in msg


@pytest.mark.parametrize("overrides, scale", [
    (["model.head=cosine", "train.loss=[{name: ldam, scale: 30}]"], 30.0),  # evaluated as trained
    (["model.head=cosine", "train.loss=[{name: cosface, scale: 64}, {name: ce}]"], 64.0),
    (["model.head=cosine", "model.cosine_scale=10", "train.loss=[{name: ldam}]"], 10.0),  # explicit wins
    (["model.head=cosine"], 16.0),  # no margin loss: the default
    (["train.loss=[{name: ldam, scale: 30}]"], 16.0),  # linear head: scale unused
])
def test_cosine_head_scale_follows_its_margin_loss(overrides, scale):
    cfg = load_config(None, overrides)
    assert cfg.model.cosine_scale == scale


def test_cosine_scale_survives_the_saved_config(tmp_path):
    from tailaug.stages.keys import stage1_key

    cfg = load_config(None, ["model.head=cosine", "train.loss=[{name: arcface, scale: 40}]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    again = load_config(saved, [])
    assert again.model.cosine_scale == 40.0
    assert stage1_key(again) == stage1_key(cfg)


def test_margin_losses_at_different_scales_need_an_explicit_cosine_scale():
    msg = error_of(["model.head=cosine", "train.loss=[{name: arcface, scale: 30}, {name: cosface, scale: 64}]"])
    assert msg.endswith("is not valid:\n  the terms of train.loss train the cosine head at scales "
                        "[30.0, 64.0]; set model.cosine_scale to the scale its test logits should have")
    cfg = load_config(None, ["model.head=cosine", "model.cosine_scale=64",
                             "train.loss=[{name: arcface, scale: 30}, {name: cosface, scale: 64}]"])
    assert cfg.model.cosine_scale == 64.0


def test_image_folder_names_missing_keys():
    msg = error_of(["data.dataset=image_folder"])
    assert "needs data.root: a folder with one sub-folder of images per class (root/<class name>/*.jpg)" in msg
    msg = error_of(["data.dataset=image_folder", "data.root=/data", "data.train_split=train.txt"])
    assert "with data.train_split needs data.test_split" in msg


@pytest.mark.parametrize("extra, expected", [
    (["data.test_split=t.txt"], "data.test_split belong to split files, and data.train_split is not set"),
    (["data.train_split=a.txt", "data.test_split=b.txt", "data.test_root=/t"], "data.test_root = '/t': is read "
     "with the folder layout only"),
    (["data.train_split=a.txt", "data.test_split=b.txt", "data.val_per_class=3"], "data.val_per_class = 3: split "
     "files name the validation images in data.val_split"),
])
def test_image_folder_layouts_refuse_the_other_layouts_keys(extra, expected):
    assert expected in error_of(["data.dataset=image_folder", "data.root=/data", *extra])


def test_image_folder_defaults_to_its_own_counts_and_builtins_refuse_as_is():
    assert load_config(None, ["data.dataset=image_folder", "data.root=/d"]).data.profile == "as_is"
    assert load_config(None, ["data.dataset=image_folder", "data.root=/d", "data.profile=step"]).data.profile == "step"
    assert "data.profile = 'as_is': is read for dataset 'image_folder' only; use profile none" in \
        error_of(["data.profile=as_is"])
    assert "data.test_root = '/t': is read for dataset 'image_folder' only" in error_of(["data.test_root=/t"])


@pytest.mark.parametrize("extra, expected", [
    (["model.arch=timm"], "model.name = None: model.arch timm builds the model named here: set model.name"),
    (["model.name=resnet50"], "model.name = 'resnet50': is read by model.arch timm or torchvision, not resnet32"),
    (["model.arch=timm", "model.name=efficientnet_lit0"], "model.name = 'efficientnet_lit0': is not a timm model; "
     "did you mean efficientnet_lite0"),
    (["model.arch=torchvision", "model.name=resnt50"], "is not a torchvision classification model; did you mean "
     "resnet50"),
    (["model.mode=frozen"], "model.mode = 'frozen': keeps the backbone as loaded, and model.weights is not set"),
])
def test_backbone_options_are_checked(extra, expected):
    assert expected in error_of(extra)


def test_validate_assignment():
    cfg = Config()
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        cfg.train.epochs = 0


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("train.epochs=5", ["train", "epochs"], 5),
        ("train.lr=0.05", ["train", "lr"], 0.05),
        ("train.lr=1.0e-3", ["train", "lr"], 1e-3),
        ("train.milestones=[10, 20]", ["train", "milestones"], [10, 20]),
        ("data.flip=false", ["data", "flip"], False),
        ("train.nesterov=true", ["train", "nesterov"], True),
        ("data.root=null", ["data", "root"], None),
        ("data.root=", ["data", "root"], None),
        ("run.name=my run", ["run", "name"], "my run"),
        ("run.name=a=b", ["run", "name"], "a=b"),
        (" train.epochs =7", ["train", "epochs"], 7),
        ("retrain.augmenter={name: stg, lam: 2}", ["retrain", "augmenter"], {"name": "stg", "lam": 2}),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_reach_the_config():
    cfg = load_config(None, [
        "train.epochs=5", "train.lr=0.05", "train.milestones=[2, 4]", "data.flip=false",
        "data.n_max=null", "train.grad_clip=1.5", "retrain.augmenter={name: stg, lam: 2}",
    ])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.05
    assert cfg.train.milestones == [2, 4]
    assert cfg.data.flip is False
    assert cfg.data.n_max is None
    assert cfg.train.grad_clip == 1.5
    assert cfg.retrain.augmenter == STGAugmenter(name="stg", lam=2.0)


def test_yaml_1_1_exponent_without_dot_still_gives_a_float():
    # PyYAML reads 1e-3 as the string "1e-3" (YAML 1.1); pydantic turns it into the float
    assert parse_override("train.lr=1e-3") == (["train", "lr"], "1e-3")
    cfg = load_config(None, ["train.lr=1e-3"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 12\n  lr: 0.2\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.2


def test_override_indexes_into_list_from_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  loss:\n    - name: ce\n    - name: ldam\n      scale: 30\n")
    cfg = load_config(path, ["train.loss.1.scale=20", "train.loss.0.weight=0.5"])
    assert cfg.train.loss[1] == LDAMLoss(name="ldam", scale=20.0)
    assert cfg.train.loss[0].weight == 0.5


def test_override_indexes_into_list_from_earlier_override():
    cfg = load_config(None, ["train.loss=[{name: ldam}, {name: focal}]", "train.loss.0.scale=20",
                             "train.loss.1.gamma=1"])
    assert cfg.train.loss[0] == LDAMLoss(name="ldam", scale=20.0)
    assert cfg.train.loss[1] == FocalLoss(name="focal", gamma=1.0)


def test_override_replaces_whole_list_item():
    cfg = load_config(None, ["train.loss=[{name: ce}]", "train.loss.0={name: focal, gamma: 3}"])
    assert cfg.train.loss == [FocalLoss(name="focal", gamma=3.0)]


@pytest.mark.parametrize("text", ["train.epochs", "=5", "  =5", ""])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="is not of the form section.key=value"):
        parse_override(text)
    with pytest.raises(ConfigError, match=r"e\.g\. train\.epochs=5"):
        load_config(None, [text])


def test_override_value_not_yaml():
    with pytest.raises(ConfigError) as info:
        parse_override("train.milestones=[1, 2")
    assert str(info.value).startswith("override 'train.milestones=[1, 2': the value is not valid YAML")


@pytest.mark.parametrize("index", ["2", "7", "x", "-1"])
def test_override_list_index_out_of_range(index):
    overrides = ["train.loss=[{name: ce}, {name: focal}]", f"train.loss.{index}.weight=2"]
    msg = error_of(overrides)
    assert f"override train.loss.{index}" in msg
    assert f"'{index}' is not an index of a list of length 2" in msg


def test_override_list_index_out_of_range_at_the_leaf():
    msg = error_of(["train.milestones=[1, 2]", "train.milestones.2=3"])
    assert "'2' is not an index of a list of length 2" in msg


def test_override_into_a_value():
    tree = {"train": {"epochs": 5}}
    with pytest.raises(ConfigError, match="train.epochs is a value, not a section"):
        apply_override(tree, ["train", "epochs", "x"], 1)


def test_apply_override_creates_sections():
    tree: dict = {}
    apply_override(tree, ["stg", "head", "rule"], "top_k")
    assert tree == {"stg": {"head": {"rule": "top_k"}}}


# --------------------------------------------------------------------------- files


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = error_of([], path)
    assert str(path) in msg and "does not exist" in msg and "configs/" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_file(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    msg = error_of([], path)
    assert f"{path} must hold a mapping of sections" in msg


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [1, 2\n")
    msg = error_of([], path)
    assert f"{path} is not valid YAML" in msg


@pytest.mark.parametrize("text", ["", "# nothing\n", "{}\n"])
def test_empty_yaml_file_is_an_error(tmp_path, text):
    # an empty file would be a 200-epoch job with every default in ./runs/run
    path = tmp_path / "c.yaml"
    path.write_text(text)
    msg = error_of([], path)
    assert msg.startswith(f"{path} holds no settings") and "configs/fmnist_lt/demo.yaml" in msg


def test_base_only_file_is_not_empty(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 3}\n")
    (tmp_path / "c.yaml").write_text("base: base.yaml\n")
    assert load_config(tmp_path / "c.yaml").train.epochs == 3


@pytest.mark.parametrize("blob", [b"\xff\xfe\x00t\x00r\x00a\x00i\x00n\x00", b"train:\n  epochs: 3\x89PNG\n"])
def test_binary_yaml_file_is_an_error(tmp_path, blob):
    path = tmp_path / "c.yaml"
    path.write_bytes(blob)
    msg = error_of([], path)
    offset = blob.index(b"\xff" if blob[0] == 0xFF else b"\x89")
    assert msg == (f"{path} is not a YAML text file (byte 0x{blob[offset]:02x} at offset {offset} is not UTF-8); "
                   "give a config such as configs/fmnist_lt/demo.yaml, saved as UTF-8 text")


def test_duplicate_yaml_key_names_key_and_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    msg = error_of([], path)
    assert msg.startswith(f"{path} line 4: key 'epochs' is given twice in the same mapping (first on line 2)")
    path.write_text("run: {name: a}\ntrain: {epochs: 3}\nrun: {seed: 1}\n")
    assert error_of([], path).startswith(f"{path} line 3: key 'run' is given twice")


def test_duplicate_key_in_override():
    msg = error_of(["train.loss=[{name: ce, name: focal}]"])
    assert msg == ("override 'train.loss=[{name: ce, name: focal}]': key 'name' is given twice in the same "
                   "mapping; give each key once")


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: &t {epochs: 3, lr: 0.5}\nstg:\n  epochs: 4\nretrain:\n  <<: {epochs: 7, lr: 0.2}\n"
                    "  epochs: 9\n")
    cfg = load_config(path)
    assert (cfg.retrain.epochs, cfg.retrain.lr, cfg.train.epochs) == (9, 0.2, 3)


def test_unreadable_config_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 3}\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert error_of([], path) == f"cannot read config file {path} (Permission denied); check its permissions"


# --------------------------------------------------------------------------- round trip


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(None, [
        "run.name=rt", "train.loss=[{name: ldam, scale: 20}, {name: focal, gamma: 1.5, weight: 0.5}]",
        "retrain.augmenter={name: stg, lam: 2, t: 0.25}", "data.root=/tmp/x", "train.milestones=[3, 9]",
        "model.head=cosine", "train.grad_clip=5", "stg.hidden_dims=[64, 32]",
    ])
    path = tmp_path / "rt.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.model_dump(mode="json") == cfg.model_dump(mode="json")
    assert again.to_yaml() == cfg.to_yaml()


def test_to_yaml_round_trip_defaults(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(Config().to_yaml())
    assert load_config(path) == Config()


# --------------------------------------------------------------------------- shipped configs


def test_there_are_shipped_configs():
    assert SHIPPED, "no YAML files under configs/"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.train.precision == "auto"  # the machine picks its fastest precision, not the config
    # a shipped config survives its own round trip
    assert validate_config(cfg.model_dump(mode="json")) == cfg


def _leaves(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}.{key}" if prefix else key).items()}


@pytest.mark.parametrize("counterpart, hard_tail", [
    ("mixup", "hard_tail"), ("ce", "hard_tail_ce"), ("balanced_softmax", "hard_tail_balanced_softmax"),
    ("ldam_drw", "hard_tail_ldam_drw"),
])
def test_hard_tail_configs_are_their_counterparts_on_the_hard_tail_order(counterpart, hard_tail):
    folder = REPO / "configs" / "fmnist_lt"
    a = _leaves(load_config(folder / f"{counterpart}.yaml").model_dump(mode="json"))
    b = _leaves(load_config(folder / f"{hard_tail}.yaml").model_dump(mode="json"))
    assert {k for k in a if a[k] != b[k]} == {"run.name", "data.class_order", "data.val_per_class"}
    assert (b["data.class_order"], b["data.val_per_class"]) == ([1, 8, 9, 5, 7, 3, 0, 2, 4, 6], 20)


def test_hard_tail_select_shares_the_stage1_model_of_hard_tail():
    from tailaug.stages.keys import features_key, generator_key

    folder = REPO / "configs" / "fmnist_lt"
    plain, select = load_config(folder / "hard_tail.yaml"), load_config(folder / "hard_tail_select.yaml")
    assert plain.run.name == select.run.name
    assert (features_key(plain), generator_key(plain)) == (features_key(select), generator_key(select))
    assert select.retrain.select.grid == {"augmenter.lam": [0.5, 1.0, 1.5], "lr": [0.001, 0.0003]}


def test_override_indexes_into_default_list():
    cfg = load_config(None, ["train.loss.0.label_smoothing=0.1"])
    assert cfg.train.loss[0].label_smoothing == 0.1
