"""One registry per kind: a method registered in one place is usable from a config."""

from pathlib import Path
from typing import Literal

import pytest
import torch

from tailaug import commands
from tailaug.augment.base import AugmenterOptions, FeatureAugmenter
from tailaug.config import load_config
from tailaug.errors import ConfigError
from tailaug.registry import AUGMENTERS, BACKBONES, CLASSIFIERS, LOSSES, SAMPLERS, Registry, Section

from synthetic import write_fashion_mnist


# --- the whole of a new augmenter: its options, its module, one registration -------------------


class DuplicateTail(AugmenterOptions):
    name: Literal["duplicate_tail"]
    scale: float = 1.0

    def label(self) -> str:
        return f"duplicate tail (x{self.scale:g})"


class DuplicateTailAugmenter(FeatureAugmenter):
    """Appends a scaled copy of every tail row of the batch."""

    calls = 0

    def __init__(self, scale: float = 1.0, targets: str = "tail"):
        super().__init__(targets)
        self.scale = scale

    def forward(self, features, labels, *, generator=None):
        type(self).calls += 1
        rows = self.target_rows(labels)
        return torch.cat([features, self.scale * features[rows]]), torch.cat([labels, labels[rows]])


@pytest.fixture()
def toy_augmenter():
    AUGMENTERS.register("duplicate_tail", config=DuplicateTail)(DuplicateTailAugmenter)
    DuplicateTailAugmenter.calls = 0
    yield
    AUGMENTERS.unregister("duplicate_tail")


def test_a_registered_augmenter_runs_in_stage3_from_yaml(toy_augmenter, tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=60)
    config = tmp_path / "toy.yaml"
    config.write_text(
        "base: {}\n"
        "data: {{root: {}, n_max: 60, imbalance_factor: 10, num_workers: 0}}\n"
        "model: {{arch: resnet20}}\n"
        "train: {{epochs: 1, batch_size: 32, warmup_epochs: 0, mixup_alpha: 0, precision: fp32}}\n"
        "retrain: {{epochs: 3, augmenter: {{name: duplicate_tail, scale: 2}}}}\n"
        "run: {{output_dir: {}, name: toy}}\n".format(
            Path("configs/fmnist_lt/demo.yaml").resolve(), data, tmp_path / "runs"
        )
    )
    results = commands.run(str(config), [], progress=False)
    assert list(results) == ["stage 1", "cRT", "cRT + duplicate tail (x2)"]
    assert DuplicateTailAugmenter.calls > 0
    assert (tmp_path / "runs" / "toy" / "config.yaml").read_text().count("duplicate_tail") == 1


def test_a_registered_augmenter_gets_the_config_checks(toy_augmenter):
    with pytest.raises(ConfigError, match=r"unknown key 'retrain.augmenter.scael': did you mean 'retrain.augmenter.scale'"):
        load_config(None, ["retrain.augmenter={name: duplicate_tail, scael: 2}"])
    with pytest.raises(ConfigError, match=r"retrain.augmenter.scale = 'big'"):
        load_config(None, ["retrain.augmenter={name: duplicate_tail, scale: big}"])
    assert load_config(None, ["retrain.augmenter={name: duplicate_tail}"]).retrain.augmenter == DuplicateTail(
        name="duplicate_tail"
    )


def test_an_unregistered_name_is_unknown_again(toy_augmenter):
    AUGMENTERS.unregister("duplicate_tail")
    with pytest.raises(ConfigError, match=r"unknown augmenter 'duplicate_tail'"):
        load_config(None, ["retrain.augmenter={name: duplicate_tail}"])


# --- the registries themselves ------------------------------------------------------------------


def test_builtin_members_of_every_kind():
    assert {"ce", "focal", "ldam", "balanced_softmax", "supcon"} <= set(LOSSES.names())
    assert {"none", "noise", "dropout", "stg"} <= set(AUGMENTERS.names())
    assert {"resnet20", "resnet32", "resnet50", "resnext50_32x4d"} <= set(BACKBONES.names())
    assert {"instance", "class_balanced", "sqrt", "progressive"} <= set(SAMPLERS.names())
    assert {"crt", "lws", "tau_norm", "ncm"} <= set(CLASSIFIERS.names())


class _Opts(Section):
    name: Literal["x"] = "x"


def test_a_name_is_registered_once():
    reg = Registry("thing", "thing.name", "tailaug.errors")
    reg.register("x", config=_Opts)(int)
    reg.register("x", config=_Opts)(int)  # the same object again is harmless (module re-import)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", config=_Opts)(float)


def test_a_config_model_must_carry_its_name():
    reg = Registry("thing", "thing.name", "tailaug.errors")
    with pytest.raises(ValueError, match=r"name: Literal\['y'\]"):
        reg.register("y", config=_Opts)(int)


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ConfigError, match=r"unknown sampler 'sqr' .*did you mean 'sqrt'\?"):
        SAMPLERS.get("sqr")
