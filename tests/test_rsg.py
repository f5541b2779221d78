"""RSG (models/rsg.py) as a stage module (models/stage_modules.py): generated rows against the
formula, its losses on hand-made inputs, the switch-on epoch, its absence from the evaluated
model, a tiny stage-1 run with exact resume, and config errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tailaug import commands
from tailaug.config import ModelConfig, load_config
from tailaug.errors import ConfigError
from tailaug.models import Network, build_model, stage_channels, stage_forward
from tailaug.models.heads import LinearHead
from tailaug.models.rsg import RSG, RSGConfig, frequent_classes
from tailaug.models.stage_modules import TrainingNetwork, build_stage_module
from tailaug.stages.keys import stage1_key
from tailaug.stages.stage1_model import build_network, load_finished

from synthetic import stop_and_resume, torchrun_train, write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
COUNTS = [100, 60, 10, 5]  # frequent_share 0.5: classes 0 and 1 are frequent, 2 and 3 rare


def rsg(centers=1, share=0.5, start=0, channels=2, seed=0) -> RSG:
    torch.manual_seed(seed)
    cfg = RSGConfig(name="rsg", centers=centers, frequent_share=share, start_epoch=start, contrastive_dim=4)
    return RSG(cfg, channels, COUNTS).double()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    return maps, torch.tensor([0, 2, 0, 1, 3, 2])  # frequent rows 0, 2, 3; rare rows 1, 4, 5


def test_frequent_classes_are_the_published_share_of_the_most_frequent():
    assert frequent_classes([5, 100, 60, 10], 0.5).tolist() == [False, True, True, False]
    assert frequent_classes(list(range(10, 0, -1)), 0.3).tolist() == [True] * 3 + [False] * 7  # int(0.3 * 10)
    assert frequent_classes([3, 3, 3], 0.3).tolist() == [True, False, False]  # at least one; ties: lower id


def test_one_centre_generated_rows_are_rare_samples_plus_transformed_frequent_displacements():
    m, (maps, y) = rsg(centers=1), batch()
    out, labels, _ = m(maps, y)
    assert labels.tolist() == [2, 3, 2]  # the rare rows' labels, in batch order
    assert torch.equal(out[:6], maps)
    # K = 1: the centre of a class is the mean of its maps in the batch
    d0 = maps[0] - (maps[0] + maps[2]) / 2  # frequent row 0 (class 0: rows 0, 2)
    d2 = maps[2] - (maps[0] + maps[2]) / 2
    d3 = maps[3] - maps[3]  # class 1 has row 3 alone: zero displacement
    w = m.transform.weight
    for new, rare, disp in zip(out[6:], (1, 4, 5), (d0, d2, d3)):  # rare j takes frequent j mod 3
        expected = maps[rare] + F.conv2d(disp[None], w, padding=1)[0]
        torch.testing.assert_close(new, expected)


def test_centres_and_nearest_centre_against_a_loop():
    m, (maps, y) = rsg(centers=3, seed=1), batch(1)
    flat = maps.flatten(1)
    gamma = [torch.softmax(maps[i].mean((1, 2)) @ m.assign[y[i]], 0) for i in range(6)]
    centres = {}
    for c in set(y.tolist()):
        rows = [i for i in range(6) if y[i] == c]
        for k in range(3):
            centres[c, k] = sum(gamma[i][k] * flat[i] for i in rows) / sum(gamma[i][k] for i in rows)
    nearest = [min(range(3), key=lambda k: float(((flat[i].detach() - centres[int(y[i]), k].detach()) ** 2).sum())) for i in range(6)]
    disp = [flat[i] - centres[int(y[i]), nearest[i]] for i in range(6)]
    out, labels, _ = m(maps, y)
    for new, rare, freq in zip(out[6:], (1, 4, 5), (0, 2, 3)):
        expected = maps[rare] + F.conv2d(disp[freq].view(1, 2, 3, 3), m.transform.weight, padding=1)[0]
        torch.testing.assert_close(new, expected)
    # the centre term of the CESC loss: gamma-weighted squared distances / D, batch mean
    got_gamma, _, dist, _ = m.centres(maps, y)
    term = sum(sum(gamma[i][k] * ((flat[i] - centres[int(y[i]), k]) ** 2).sum() for k in range(3)) for i in range(6))
    torch.testing.assert_close((got_gamma * dist).sum(1).mean() / 18, term / 6 / 18)


def test_cesc_loss_pairs_neighbours_and_asks_same_class():
    m, (maps, _) = rsg(centers=1), batch()
    y = torch.tensor([0, 0, 2, 1, 3, 3])
    seen = []
    real = m.contrastive.forward
    m.contrastive.forward = lambda pairs: seen.append(pairs) or real(pairs)
    gamma, _, dist, _ = m.centres(maps, y)
    loss = m.cesc_loss(maps, y, gamma, dist)
    assert torch.equal(seen[0], torch.cat([maps, maps[[1, 2, 3, 4, 5, 0]]], 1))
    same = torch.tensor([1, 0, 0, 0, 1, 0])  # class pairs (0,0) (0,2) (2,1) (1,3) (3,3) (3,0)
    flat = maps.flatten(1)
    means = {c: flat[y == c].mean(0) for c in range(4) if (y == c).any()}
    centre_term = sum(((flat[i] - means[int(y[i])]) ** 2).sum() for i in range(6)) / 6 / 18
    expected = centre_term + F.cross_entropy(real(seen[0]).float(), same)
    torch.testing.assert_close(loss, expected.to(loss.dtype))


def test_mv_loss_on_hand_vectors():
    moved = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0]]).view(2, 1, 2, 2)
    d_rare = torch.tensor([[0.0, 1, 0, 0], [5.0, 0, 0, 0]]).view(2, 1, 2, 2)
    d_freq = torch.tensor([[0.0, 0, 3, 0], [0.0, 0, 0, 4]]).view(2, 1, 2, 2)
    # row 1: orthogonal (1 - cos = 1), sizes 1 vs 3 -> 2 / sqrt(4) = 1; row 2: parallel (0), 2 vs 4 -> 1
    assert RSG.mv_loss(moved, d_freq, d_rare).item() == pytest.approx((2 + 1) / 2)


def test_loss_weights_are_the_published_ones_and_the_switch_on_epoch_is_respected():
    cfg = RSGConfig(name="rsg")
    assert (cfg.cesc_weight, cfg.mv_weight, cfg.stage, cfg.centers, cfg.frequent_share, cfg.start_epoch) == (
        0.1, 0.01, 2, 15, 0.3, 160)
    m, (maps, y) = rsg(centers=2, start=5), batch()
    gamma, _, dist, _ = m.centres(maps, y)
    cesc = m.cesc_loss(maps, y, gamma, dist)
    m.set_epoch(4)
    out, labels, loss = m(maps, y)
    assert labels is None and torch.equal(out, maps)
    torch.testing.assert_close(loss, 0.1 * cesc)
    m.set_epoch(5)
    out, labels, loss = m(maps, y)
    assert labels.tolist() == [2, 3, 2] and len(out) == 9
    flat = maps.flatten(1)  # K = 2: the nearest of the two centres of each sample's class
    centres = m.centres(maps, y)[1].view(4, 2, -1)
    nearest = torch.stack([min(centres[y[i]], key=lambda c: float(((flat[i] - c) ** 2).sum().detach())) for i in range(6)])
    _, _, moved, d_freq, d_rare = m.generate(maps, y, flat - nearest)
    torch.testing.assert_close(loss, 0.1 * cesc + 0.01 * RSG.mv_loss(moved, d_freq, d_rare))
    # a batch without rare (or without frequent) samples generates nothing
    only_frequent = torch.tensor([0, 1, 0, 1, 0, 1])
    assert m(maps, only_frequent)[1] is None


def test_training_network_adds_rows_and_is_the_plain_network_in_eval_mode():
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="resnet20"), 4, 1)
    module = build_stage_module(RSGConfig(name="rsg", start_epoch=0, frequent_share=0.5, contrastive_dim=8), net, COUNTS)
    wrapped = TrainingNetwork(net, module)
    x, y = torch.randn(8, 1, 28, 28), torch.tensor([0, 0, 1, 2, 3, 0, 1, 3])
    out = wrapped.train()(x, labels=y)
    assert out.labels.tolist() == [2, 3, 3] and out.logits.shape == (11, 4) and out.loss.ndim == 0
    wrapped.eval()
    with torch.no_grad():
        a, b = wrapped(x, labels=y), net(x)
    assert a.labels is None and a.loss is None
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)


@pytest.mark.parametrize("arch, channels", [("resnet20", (16, 32, 64)), ("resnet18", (64, 128, 256, 512))])
def test_backbone_stages_with_an_identity_module_are_the_plain_forward(arch, channels):
    torch.manual_seed(0)
    backbone = build_model(ModelConfig(arch=arch), 4, 1).backbone.eval()
    assert stage_channels(backbone) == channels
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        plain = backbone(x)
        for stage in range(1, len(channels) + 1):
            shapes = []
            out = stage_forward(backbone, x, stage, lambda maps: shapes.append(maps.shape) or maps)
            torch.testing.assert_close(out, plain, rtol=0, atol=0)
            assert shapes[0][1] == channels[stage - 1]
        # rows added after a stage are carried to the pooled features
        assert stage_forward(backbone, x, 1, lambda maps: torch.cat([maps, maps[:1]])).shape == (4, plain.shape[1])


# ---------------------------------------------------------------------------- config errors

class NoStages(nn.Module):
    feature_dim = 4

    def forward(self, x):
        return x.flatten(1)[:, :4]


def test_config_errors_are_one_line_each():
    net = build_model(ModelConfig(arch="resnet20"), 4, 1)
    with pytest.raises(ConfigError, match=re.escape("has stages 1..3; set train.stage_module.stage")):
        build_stage_module(RSGConfig(name="rsg", stage=4), net, COUNTS, "resnet20")
    with pytest.raises(ConfigError, match="model.arch toy exposes no stages .*use a CIFAR or torchvision ResNet backbone"):
        build_stage_module(RSGConfig(name="rsg"), Network(NoStages(), LinearHead(4, 4)), COUNTS, "toy")
    cases = [
        (["data.dataset=embeddings", "data.embeddings={train: a.npz}", "train.mixup_alpha=0",
          "train.stage_module={name: rsg}"], "stage 1 on embeddings trains a head only .*remove train.stage_module"),
        (["train.mixup_alpha=1", "train.stage_module={name: rsg}"], "set train.mixup_alpha=0"),
        (["train.stage_module={name: rsg, stage: 0}"], "stages count from 1"),
        (["train.stage_module={name: rsg, centres: 3}"], "did you mean 'train.stage_module.centers'"),
        (["train.stage_module={name: rsg}", "train.feature_augmenter={name: isda}"], "keep one of them"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, overrides)
        assert len(str(err.value).splitlines()[1:]) == 1, str(err.value)


def test_stage_module_is_in_the_stage1_key_only_when_on():
    plain, on = load_config(None, []), load_config(None, ["train.stage_module={name: rsg}"])
    assert plain.train.stage_module is None
    assert stage1_key(plain) == stage1_key(load_config(None, ["train.stage_module=null"]))
    other = load_config(None, ["train.stage_module={name: rsg, start_epoch: 10}"])
    assert len({stage1_key(plain), stage1_key(on), stage1_key(other)}) == 3


@pytest.mark.parametrize("path", ["fmnist_lt/rsg.yaml", "cifar10_lt/rsg.yaml", "cifar100_lt/rsg.yaml"])
def test_shipped_configs_use_the_published_values(path):
    cfg = load_config(REPO / "configs" / path)
    s = cfg.train.stage_module
    assert (s.name, s.stage, s.centers, s.contrastive_dim, s.frequent_share, s.cesc_weight, s.mv_weight) == (
        "rsg", 2, 15, 256, 0.3, 0.1, 0.01)
    assert [t.name for t in cfg.train.loss] == ["ldam"] and cfg.model.arch == "resnet32"
    assert s.start_epoch == cfg.train.reweight.start_epoch == (24 if path.startswith("fmnist") else 160)


# ---------------------------------------------------------------------------- training

TINY = [
    "data.n_max=100", "data.imbalance_factor=10", "data.num_workers=0", "model.arch=resnet20",
    "train.epochs=4", "train.batch_size=32", "train.warmup_epochs=1", "train.lr=0.05", "train.mixup_alpha=0",
    "train.schedule=cosine", "train.precision=fp32",
    "train.stage_module={name: rsg, start_epoch: 2, centers: 3, contrastive_dim: 16}",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), per_class_train=100)


def args(root, out, name):
    return [str(REPO / "configs/fmnist_lt/demo.yaml"), *TINY, f"data.root={root}", f"run.output_dir={out}",
            f"run.name={name}"]


def train(root, out, name, resume=False):
    a = args(root, out, name)
    return commands.train(a[0], a[1:], resume=resume, progress=False)


@pytest.mark.slow
def test_stage1_with_rsg_learns_resumes_exactly_and_leaves_a_plain_model(data_root, tmp_path, monkeypatch,
                                                                          one_thread):
    made = []
    real_generate = RSG.generate

    def spy(self, maps, labels, displacement):
        result = real_generate(self, maps, labels, displacement)
        made.append((self.epoch, None if result is None else result[1]))
        return result

    monkeypatch.setattr(RSG, "generate", spy)
    first = train(data_root, tmp_path, "a")
    assert first["top1"] > 30  # chance: 10%
    assert made and all(epoch >= 2 for epoch, _ in made)  # nothing generated before the switch-on epoch
    rare = set(range(3, 10))  # int(0.3 * 10) = 3 frequent classes: 0, 1, 2 (the most images)
    assert any(labels is not None for _, labels in made)
    assert all(set(labels.tolist()) <= rare for _, labels in made if labels is not None)

    # the evaluated and stored model is the plain network: same parameters, same keys, loads as stage 1
    cfg = load_config(args(data_root, tmp_path, "a")[0], args(data_root, tmp_path, "a")[1:])
    plain_cfg = load_config(args(data_root, tmp_path, "a")[0], [*args(data_root, tmp_path, "a")[1:],
                                                                "train.stage_module=null"])
    finished = load_finished(cfg, tmp_path / "a")
    plain = build_network(plain_cfg, finished.data, torch.device("cpu"))
    assert type(finished.model) is Network and not any("module" in k for k in finished.model.state_dict())
    assert sum(p.numel() for p in finished.model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert list(finished.model.state_dict()) == list(plain.state_dict())
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["model"]) == set(plain.state_dict()) and ckpt["stage_module"]
    plain.load_state_dict(ckpt["model"])
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(finished.model(x).logits, plain.eval()(x).logits, rtol=0, atol=0)

    resumed = stop_and_resume(monkeypatch, lambda resume=False: train(data_root, tmp_path, "b", resume), at_epoch=3)
    assert resumed["per_class"] == first["per_class"] and resumed["ece"] == first["ece"]
    assert math.isfinite(resumed["top1"])


@pytest.mark.slow
def test_torchrun_two_processes_train_with_rsg(data_root, tmp_path):
    """Under DDP the wrapped network carries RSG (parameters unused before the switch-on epoch or
    in a batch without rare samples are allowed); rank 0 writes one plain-model run."""
    proc = torchrun_train([*args(data_root, tmp_path, "ddp"), "train.epochs=2", "data.n_max=40",
                           "train.stage_module.start_epoch=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["stage_module"] and not any("module" in k for k in ckpt["model"])
