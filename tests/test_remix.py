"""Remix (augment/remix.py): its label weights on hand-made pairs, the per-sample weighted loss
against hand computations, mixup unchanged, a tiny stage 1 that learns and resumes exactly,
and the config errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tailaug import commands
from tailaug.augment.mixup import mixed_loss
from tailaug.augment.remix import Remix
from tailaug.config import TrainConfig, load_config
from tailaug.errors import ConfigError, TailaugError
from tailaug.losses import LossInputs, build_loss
from tailaug.registry import LOSSES
from tailaug.stages.keys import stage1_key
from tailaug.stages.representation import Trainer

from synthetic import stop_and_resume, torchrun_train, write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- label weights

COUNTS = (90, 30, 10, 29, 31)
# pairs (y_i, y_j) and n_i / n_j:  3 (= kappa), 1/3, 9, 2.9, 10/29, 3.1, 1, 1/9
Y_A = torch.tensor([0, 1, 0, 3, 2, 4, 1, 2])
Y_B = torch.tensor([1, 0, 2, 2, 3, 2, 1, 0])


@pytest.mark.parametrize("lam, expected", [
    (0.3, [0, 0.3, 0, 0.3, 0.3, 0, 0.3, 0.3]),  # lam < tau: the majority label y_i gets 0 where n_i/n_j >= 3
    (0.8, [0.8, 1, 0.8, 0.8, 0.8, 0.8, 0.8, 1]),  # 1 - lam < tau: the minority label y_i gets 1 where n_i/n_j <= 1/3
    (0.5, [0.5] * 8),  # lam = tau and 1 - lam = tau: neither strict inequality holds, mixup's lam
])
def test_label_weights_at_the_published_kappa_and_tau(lam, expected):
    weights = Remix(COUNTS, kappa=3.0, tau=0.5)(lam, Y_A, Y_B)
    assert weights.dtype == torch.float64 and weights.shape == (8,)
    assert weights.tolist() == expected


@pytest.mark.parametrize("kappa, tau, lam, expected", [
    # tau boundaries (exact binary fractions): lam = tau and 1 - lam = tau keep lam
    (3.0, 0.25, 0.25, [0.25] * 8),
    (3.0, 0.25, 0.75, [0.75] * 8),
    (3.0, 0.25, 0.125, [0, 0.125, 0, 0.125, 0.125, 0, 0.125, 0.125]),
    (3.0, 0.25, 0.875, [0.875, 1, 0.875, 0.875, 0.875, 0.875, 0.875, 1]),
    # kappa 3.1: the ratio 31/10 is on the boundary (>= holds), 90/30 = 3 is now below it
    (3.1, 0.5, 0.25, [0.25, 0.25, 0, 0.25, 0.25, 0, 0.25, 0.25]),
    (3.1, 0.5, 0.75, [0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 1]),
    # tau 0: never re-labels (mixup); tau 1: always, for pairs far enough apart
    (3.0, 0.0, 0.01, [0.01] * 8),
    (3.0, 1.0, 0.99, [0, 1, 0, 0.99, 0.99, 0, 0.99, 1]),
])
def test_label_weights_at_the_boundaries(kappa, tau, lam, expected):
    assert Remix(COUNTS, kappa=kappa, tau=tau)(lam, Y_A, Y_B).tolist() == expected


def test_swapping_the_pair_gives_the_other_label_its_weight():
    remix = Remix(COUNTS)
    for lam in (0.1, 0.3, 0.7, 0.9):
        torch.testing.assert_close(remix(lam, Y_A, Y_B), 1 - remix(1 - lam, Y_B, Y_A), rtol=0, atol=1e-15)


def test_remix_refuses_a_kappa_or_tau_without_meaning():
    with pytest.raises(ValueError, match="kappa > 1"):
        Remix(COUNTS, kappa=1.0)
    with pytest.raises(ValueError, match=r"tau in \[0, 1\]"):
        Remix(COUNTS, tau=1.5)


# ---------------------------------------------------------------------------- per-sample weighted loss

N, C = 6, 5
A = torch.tensor([0, 1, 2, 0, 4, 3])
PERM = torch.tensor([2, 0, 1, 5, 3, 4])
B = A[PERM]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    cosine = torch.tanh(torch.randn(N, C, generator=g, dtype=torch.float64))
    features = torch.randn(N, 4, generator=g, dtype=torch.float64)
    return LossInputs(logits, A, features, cosine)


def loss_fn(terms, reweight=None):
    return build_loss(TrainConfig.model_validate({"loss": terms, "reweight": reweight or {}}), COUNTS)


def nll(row, c):
    return math.log(sum(math.exp(v) for v in row)) - row[c]


def hand_mixture(per_label_loss, s, w):
    """sum_i [s_i w[a_i] l_i(a_i) + (1 - s_i) w[b_i] l_i(b_i)] / sum_i w[a_i] in plain Python."""
    a, b = A.tolist(), B.tolist()
    top = sum(s[i] * w[a[i]] * per_label_loss(i, a[i]) + (1 - s[i]) * w[b[i]] * per_label_loss(i, b[i])
              for i in range(N))
    return top / sum(w[c] for c in a)


def inverse_frequency(counts):
    raw = [1 / n for n in counts]
    return [r * len(counts) / sum(raw) for r in raw]


def effective_number(counts, beta):
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    return [r * len(counts) / sum(raw) for r in raw]


@pytest.mark.parametrize("lam", [0.2, 0.8])
def test_remix_ce_loss_is_the_per_sample_mixture(lam):
    inputs = batch()
    s = Remix(COUNTS)(lam, A, B)
    assert set(s.tolist()) == {lam, 0.0 if lam < 0.5 else 1.0}  # both kinds of sample are in the batch
    z = inputs.logits.tolist()
    got = mixed_loss(loss_fn([{"name": "ce"}]), inputs, B, lam, s)
    assert got.item() == pytest.approx(hand_mixture(lambda i, c: nll(z[i], c), s.tolist(), [1.0] * C), rel=1e-12)
    # with DRW's class weights: each label's loss weighted by its class, over sum_i w[a_i]
    fn = loss_fn([{"name": "ce"}], {"scheme": "inverse_frequency", "start_epoch": 2})
    fn.set_epoch(1)  # before start_epoch: unweighted
    assert mixed_loss(fn, inputs, B, lam, s).item() == pytest.approx(got.item(), rel=1e-12)
    fn.set_epoch(2)
    want = hand_mixture(lambda i, c: nll(z[i], c), s.tolist(), inverse_frequency(COUNTS))
    assert mixed_loss(fn, inputs, B, lam, s).item() == pytest.approx(want, rel=1e-6)  # weights held in float32


def test_remix_ldam_drw_loss_is_the_per_sample_mixture():
    inputs, lam = batch(1), 0.3
    s = Remix(COUNTS)(lam, A, B)
    fn = loss_fn([{"name": "ldam", "max_margin": 0.5, "scale": 30}], {"scheme": "effective_number", "beta": 0.999})
    cos = inputs.cosine.tolist()
    raw = [n ** -0.25 for n in COUNTS]
    margin = [0.5 * r / max(raw) for r in raw]

    def ldam(i, c):
        return nll([30 * (v - (margin[c] if k == c else 0.0)) for k, v in enumerate(cos[i])], c)

    want = hand_mixture(ldam, s.tolist(), effective_number(COUNTS, 0.999))
    assert mixed_loss(fn, inputs, B, lam, s).item() == pytest.approx(want, rel=1e-5)  # float32 margins and weights


WEIGHTED_TERMS = sorted(n for n in LOSSES.names() if LOSSES.get(n).obj.takes_sample_weight)


def test_every_term_but_supcon_takes_sample_weights():
    assert set(LOSSES.names()) - set(WEIGHTED_TERMS) == {"supcon"}


@pytest.mark.parametrize("name", WEIGHTED_TERMS)
@pytest.mark.parametrize("reweight", [{}, {"scheme": "inverse_frequency"}])
def test_each_term_reduces_sample_weights_as_a_weighted_mean(name, reweight):
    """Mixup through the weighted path (s = lam everywhere) equals lam L(a) + (1 - lam) L(b); the
    loss is linear in s (one-hot weights sum to the unweighted loss), as sum_i s_i w_i l_i / sum_i w_i."""
    if reweight and not LOSSES.get(name).obj.uses_class_weights:
        reweight = {}
    fn = loss_fn([{"name": name}], reweight)
    inputs, lam = batch(2), 0.35
    old = lam * fn(inputs) + (1 - lam) * fn(LossInputs(inputs.logits, B, inputs.features, inputs.cosine))
    assert torch.equal(mixed_loss(fn, inputs, B, lam), old)  # mixup's own path: today's formula, bit for bit
    through_weights = mixed_loss(fn, inputs, B, lam, torch.full((N,), lam, dtype=torch.float64))
    assert through_weights.item() == pytest.approx(old.item(), rel=1e-12)
    plain = fn(inputs)
    one_hot = [fn(LossInputs(inputs.logits, A, inputs.features, inputs.cosine, torch.eye(N)[k])) for k in range(N)]
    assert sum(one_hot).item() == pytest.approx(plain.item(), rel=1e-12)
    s = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.75, 0.1], dtype=torch.float64)
    weighted = fn(LossInputs(inputs.logits, A, inputs.features, inputs.cosine, s))
    assert weighted.item() == pytest.approx(sum(s[k] * one_hot[k] for k in range(N)).item(), rel=1e-12)
    assert not math.isclose(weighted.item(), plain.item())


def test_a_weighted_batch_is_refused_by_supcon_and_checked_for_shape():
    fn = loss_fn([{"name": "ce"}, {"name": "supcon"}])
    inputs = batch()
    with pytest.raises(TailaugError, match=r"the loss term\(s\) supcon cannot weight single samples"):
        fn(LossInputs(inputs.logits, A, inputs.features, inputs.cosine, torch.ones(N)))
    with pytest.raises(TailaugError, match=r"sample_weight has shape \(5,\) but targets \(6,\)"):
        loss_fn([{"name": "ce"}])(LossInputs(inputs.logits, A, sample_weight=torch.ones(5)))


# ---------------------------------------------------------------------------- config

def test_remix_config_errors_are_one_line_each():
    cases = [
        (["train.remix={}"], re.escape("train.remix re-labels mixup's images, and train.mixup_alpha is 0 (no "
                                       "mixup): set train.mixup_alpha > 0")),
        (["train.mixup_alpha=1", "train.remix={}", "model.head=cosine",
          "train.loss=[{name: ldam, weight: 0.1}, {name: supcon, weight: 0.9}]"],
         r"the loss term\(s\) supcon cannot .*drop them from train.loss, or remove train.remix"),
        (["data.dataset=embeddings", "data.embeddings={train: a.npz}", "train.remix={}"],
         "train.remix re-labels mixed images; stage 1 on embeddings mixes none: remove train.remix"),
        (["train.mixup_alpha=1", "train.remix.kappa=1"], "train.remix.kappa = 1"),
        (["train.mixup_alpha=1", "train.remix.tau=1.5"], "train.remix.tau = 1.5"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, overrides)
        problems = str(err.value).splitlines()[1:]
        assert len(problems) == 1, str(err.value)


def test_remix_is_off_by_default_and_in_the_stage1_key_only_when_on():
    plain = load_config(None, ["train.mixup_alpha=1"])
    assert plain.train.remix is None
    on = load_config(None, ["train.mixup_alpha=1", "train.remix={}"])
    assert (on.train.remix.kappa, on.train.remix.tau) == (3.0, 0.5)
    other = load_config(None, ["train.mixup_alpha=1", "train.remix.tau=0.4"])
    assert len({stage1_key(plain), stage1_key(on), stage1_key(other)}) == 3
    assert stage1_key(plain) == stage1_key(load_config(None, ["train.mixup_alpha=1", "train.remix=null"]))


@pytest.mark.parametrize("path", ["fmnist_lt/remix.yaml", "cifar10_lt/remix.yaml", "cifar100_lt/remix_drw.yaml"])
def test_shipped_remix_configs_use_the_published_values(path):
    cfg = load_config(REPO / "configs" / path)
    assert (cfg.train.remix.kappa, cfg.train.remix.tau, cfg.train.mixup_alpha) == (3.0, 0.5, 1.0)
    assert cfg.train.epochs == (30 if path.startswith("fmnist") else 200)
    assert (cfg.train.reweight.scheme, cfg.train.reweight.start_epoch) == (
        ("effective_number", 160) if "drw" in path else ("none", 0))


# ---------------------------------------------------------------------------- training

TINY = [
    "data.n_max=100", "data.imbalance_factor=10", "data.num_workers=0", "model.arch=resnet20",
    "train.epochs=6", "train.batch_size=32", "train.warmup_epochs=1", "train.lr=0.1",
    "train.schedule=cosine", "train.precision=fp32", "train.mixup_alpha=1", "train.remix={}",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), per_class_train=100)


def train(root, out, name, resume=False):
    args = [str(REPO / "configs/fmnist_lt/demo.yaml"), *TINY, f"data.root={root}", f"run.output_dir={out}",
            f"run.name={name}"]
    return commands.train(args[0], args[1:], resume=resume, progress=False)


@pytest.mark.slow
def test_stage1_with_remix_learns_and_resumes_exactly(data_root, tmp_path, monkeypatch, one_thread):
    seen = []
    real_forward = Remix.forward

    def spy(self, lam, y_a, y_b):
        weights = real_forward(self, lam, y_a, y_b)
        seen.append((lam, weights))
        return weights

    monkeypatch.setattr(Remix, "forward", spy)
    first = train(data_root, tmp_path, "a")
    assert first["top1"] > 40  # chance: 10%
    assert len(seen) == 6 * 12  # every step of 6 epochs of 12 batches
    assert any(bool((w != lam).any()) for lam, w in seen)  # some labels moved to the rarer class
    for lam, w in seen:  # 0 only while lam < tau, 1 only while 1 - lam < tau
        allowed = {lam, *([0.0] if lam < 0.5 else []), *([1.0] if 1 - lam < 0.5 else [])}
        assert set(w.tolist()) <= allowed

    resumed = stop_and_resume(monkeypatch, lambda resume=False: train(data_root, tmp_path, "b", resume), at_epoch=3)
    assert resumed["per_class"] == first["per_class"] and resumed["ece"] == first["ece"]


def test_remix_step_keeps_to_the_process_device(data_root, tmp_path, one_thread):
    """An epoch with the default device set to ``meta``: a tensor Remix made without naming the
    labels' device would land there and fail the step."""
    cfg = load_config(REPO / "configs/fmnist_lt/demo.yaml", [
        *TINY, f"data.root={data_root}", "data.n_max=30", "train.epochs=1", "train.batch_size=16",
        f"run.output_dir={tmp_path}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    torch.set_default_device("meta")
    try:
        record = trainer.train_epoch(0)
    finally:
        torch.set_default_device(None)
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0


@pytest.mark.slow
def test_torchrun_two_processes_train_with_remix(data_root, tmp_path):
    """Remix keeps no state across ranks: each rank re-labels its own half of the batch; the
    run trains to the end under DDP and rank 0 writes it."""
    args = [str(REPO / "configs/fmnist_lt/demo.yaml"), *TINY, "train.epochs=2", f"data.root={data_root}",
            f"run.output_dir={tmp_path}", "run.name=ddp"]
    proc = torchrun_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert "remix" in (tmp_path / "ddp" / "config.yaml").read_text()
