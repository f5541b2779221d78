"""Models: CIFAR ResNets, torchvision backbones, heads and loading backbone weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tailaug.config import ModelConfig
from tailaug.errors import CheckpointError, ConfigError
from tailaug.models import (
    CosineHead,
    LinearHead,
    Network,
    Output,
    build_backbone,
    build_head,
    build_model,
    load_backbone_weights,
)
from tailaug.models.cifar_resnet import CifarResNet


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cifar_backbone_params(depth: int, in_channels: int) -> int:
    """Parameters of a 6n+2 CIFAR ResNet backbone with option-A shortcuts, counted by hand."""
    n = (depth - 2) // 6
    conv = lambda cin, cout: cin * cout * 9  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(in_channels, 16) + bn(16)
    cin = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, planes) + bn(planes) + conv(planes, planes) + bn(planes)
            cin = planes
    return total


# --------------------------------------------------------------------------- CIFAR ResNets


def test_resnet32_parameter_count():
    model = build_model(ModelConfig(arch="resnet32"), num_classes=10, in_channels=3)
    total = n_params(model)
    assert total == 464_154  # measured: backbone 463,504 + linear head 64*10+10
    assert 450_000 <= total <= 480_000  # "about 0.46M" (He et al. 2016)
    assert n_params(model.backbone) == 463_504 == cifar_backbone_params(32, 3)
    assert n_params(model.head) == 64 * 10 + 10


@pytest.mark.parametrize("arch, depth, convs", [("resnet20", 20, 19), ("resnet32", 32, 31), ("resnet56", 56, 55)])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_cifar_depths(arch, depth, convs, in_channels):
    backbone = build_backbone(arch, in_channels)
    assert isinstance(backbone, CifarResNet)
    assert len(backbone.layers) == 3 * (depth - 2) // 6
    # depth = number of conv layers + the linear classifier
    assert sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) == convs == depth - 1
    assert backbone.conv1.in_channels == in_channels
    assert n_params(backbone) == cifar_backbone_params(depth, in_channels)
    assert backbone.feature_dim == 64


def test_cifar_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="depth must be 6n\\+2, got 33"):
        CifarResNet(33)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_resnet32_output_shapes(in_channels, size):
    model = build_model(ModelConfig(arch="resnet32"), num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(3, in_channels, size, size))
    assert isinstance(out, Output)
    assert out.features.shape == (3, 64)
    assert out.logits.shape == (3, 7)
    assert model.feature_dim == 64
    # the logits are the head applied to the features
    torch.testing.assert_close(out.logits, model.head(out.features))
    # pooled after a ReLU: features are non-negative
    assert (out.features >= 0).all()


def test_model_in_channels_must_agree_with_the_dataset():
    # the network sees the dataset's images, so a different model.in_channels could only fail in
    # the first convolution
    model = build_model(ModelConfig(arch="resnet20", in_channels=1), num_classes=3, in_channels=1)
    assert model.backbone.conv1.in_channels == 1
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(arch="resnet20", in_channels=1), num_classes=3, in_channels=3)
    assert str(info.value) == ("model.in_channels is 1 but the dataset's images have 3 channel(s); set "
                               "model.in_channels=3 or remove it (it defaults to the dataset's)")


def test_option_a_shortcut_pads_channels_and_subsamples():
    block = build_backbone("resnet20", 3).layers[3]  # first block of stage 2: 16 -> 32, stride 2
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert (s[:, :8] == 0).all() and (s[:, 24:] == 0).all()


# --------------------------------------------------------------------------- torchvision


def test_torchvision_resnet18_one_channel():
    model = build_model(ModelConfig(arch="resnet18"), num_classes=5, in_channels=1).eval()
    assert model.feature_dim == 512
    assert model.backbone.conv1.in_channels == 1
    assert isinstance(model.backbone.fc, nn.Identity)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32))
    assert out.features.shape == (1, 512)
    assert out.logits.shape == (1, 5)


# --------------------------------------------------------------------------- heads


def test_cosine_head_by_hand():
    head = CosineHead(2, 3, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, -3.0]]))
    f = torch.tensor([[3.0, 4.0], [-1.0, 0.0]])
    # cos(f, w) = f.w / (|f| |w|)
    expected = torch.tensor([
        [3 / 5, 8 / (5 * 2), -21 / (5 * 3 * math.sqrt(2))],
        [-1.0, 0.0, 3 / (3 * math.sqrt(2))],
    ])
    cos = head.cosine(f)
    torch.testing.assert_close(cos, expected)
    torch.testing.assert_close(head(f), 10.0 * expected)


def test_cosine_head_bounds_and_scale():
    head = build_head("cosine", 16, 9, scale=16.0)
    assert isinstance(head, CosineHead) and head.scale == 16.0
    f = torch.randn(50, 16) * 100
    cos = head.cosine(f)
    assert cos.shape == (50, 9)
    assert cos.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(head(f), 16.0 * cos)
    # scale-invariant in the features
    torch.testing.assert_close(head.cosine(f * 0.01), cos)


def test_model_config_cosine_scale_reaches_head():
    model = build_model(ModelConfig(arch="resnet20", head="cosine", cosine_scale=30), num_classes=4, in_channels=3)
    assert isinstance(model.head, CosineHead) and model.head.scale == 30


def test_linear_head():
    head = build_head("linear", 4, 3)
    assert isinstance(head, LinearHead)
    f = torch.randn(2, 4)
    assert head.cosine(f) is None
    torch.testing.assert_close(head(f), f @ head.weight.t() + head.bias)


def test_unknown_head():
    with pytest.raises(ValueError, match="unknown head 'arc'; use linear or cosine"):
        build_head("arc", 4, 3)


# --------------------------------------------------------------------------- weights


def _features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(x)


@pytest.fixture
def trained_backbone():
    """A resnet20 whose BN running stats differ from a fresh one (so loading them matters)."""
    torch.manual_seed(1)
    backbone = build_backbone("resnet20", 3)
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(8, 3, 16, 16) * 3 + 1)
    return backbone


def test_weights_from_safetensors(tmp_path, trained_backbone):
    path = tmp_path / "w.safetensors"
    save_file(trained_backbone.state_dict(), str(path))
    x = torch.randn(2, 3, 32, 32)
    fresh = build_backbone("resnet20", 3)
    assert not torch.allclose(_features(fresh, x), _features(trained_backbone, x))
    load_backbone_weights(fresh, path)
    torch.testing.assert_close(_features(fresh, x), _features(trained_backbone, x), rtol=0, atol=0)


def test_weights_from_torch_file_with_prefix_and_classifier(tmp_path, trained_backbone):
    state = {f"module.{k}": v for k, v in trained_backbone.state_dict().items()}
    state["module.fc.weight"] = torch.randn(10, 64)
    state["module.fc.bias"] = torch.randn(10)
    pt = tmp_path / "w.pt"
    torch.save(state, pt)
    st = tmp_path / "w.safetensors"
    save_file(trained_backbone.state_dict(), str(st))

    x = torch.randn(2, 3, 32, 32)
    from_pt, from_st = build_backbone("resnet20", 3), build_backbone("resnet20", 3)
    load_backbone_weights(from_pt, pt)
    load_backbone_weights(from_st, st)
    torch.testing.assert_close(_features(from_pt, x), _features(from_st, x), rtol=0, atol=0)
    torch.testing.assert_close(_features(from_pt, x), _features(trained_backbone, x), rtol=0, atol=0)


def test_weights_from_tailaug_checkpoint(tmp_path, trained_backbone):
    net = Network(trained_backbone, LinearHead(64, 3))
    pt = tmp_path / "last.pt"
    torch.save({"epoch": 3, "model": net.state_dict()}, pt)
    model = build_model(ModelConfig(arch="resnet20", weights=str(pt)), num_classes=5, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(model.backbone, x), _features(trained_backbone, x), rtol=0, atol=0)


def test_weights_for_another_arch(tmp_path, trained_backbone):
    path = tmp_path / "r20.safetensors"
    save_file(trained_backbone.state_dict(), str(path))
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(build_backbone("resnet32", 3), path)
    msg = str(info.value)
    assert f"weights in {path} do not fit this backbone" in msg
    assert "missing keys" in msg and "shape mismatch" in msg
    assert "check model.arch and model.in_channels" in msg


def test_weights_for_other_in_channels(tmp_path, trained_backbone):
    path = tmp_path / "r20.safetensors"
    save_file(trained_backbone.state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"0 missing keys .*shape mismatch in \['conv1.weight'\]"):
        load_backbone_weights(build_backbone("resnet20", 1), path)


def test_weights_file_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; give a local .safetensors or .pt file"):
        load_backbone_weights(build_backbone("resnet20", 3), tmp_path / "nope.safetensors")


def test_weights_file_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_backbone_weights(build_backbone("resnet20", 3), path)


# --------------------------------------------------------------------------- memory format


def test_channels_last_matches_contiguous():
    model = build_model(ModelConfig(arch="resnet20"), num_classes=4, in_channels=3).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert model_cl.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.features, ref.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
