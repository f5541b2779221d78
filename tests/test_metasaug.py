"""MetaSAug: the meta gradient with respect to Sigma, the functional virtual step, the meta
set, stage 1 (learning, exact resume) and stage 3."""

import contextlib
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tailaug.augment import metasaug
from tailaug.augment.base import AugmentContext, build_augmenter
from tailaug.augment.class_moments import Covariance, class_slots
from tailaug.augment.isda import implicit_shift
from tailaug.augment.meta import MetaStep, meta_indices, replay, rng_snapshot, trainable
from tailaug.config import load_config
from tailaug.errors import ConfigError
from tailaug.losses import LossInputs
from tailaug.models import Network
from tailaug.models.heads import LinearHead

from synthetic import TINY_STAGE1, train_tiny


def _tiny(dtype=torch.float64):
    """A network with a BatchNorm layer: 3-d inputs, 4-d features, 3 classes."""
    torch.manual_seed(3)
    backbone = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh())
    backbone.feature_dim = 4
    return Network(backbone, LinearHead(4, 3)).to(dtype).train()


def _batch(rows, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(rows) % 3
    return torch.randn(rows, 3, generator=g, dtype=dtype) + y[:, None].to(dtype), y


def _augmenter(**options):
    aug = metasaug.MetaSAugAugmenter(**{"lambda0": 1.0, "meta_lr": 0.5, **options})
    ctx = AugmentContext(features=torch.zeros(3, 4), labels=torch.arange(3), class_counts=[5, 3, 1],
                         head_classes=[], validation=(torch.zeros(6, 4), torch.arange(6) % 3), online=True)
    aug.fit(ctx)
    aug.set_epoch(1, 2)  # lambda = 0.5
    return aug


def _sigma(classes, dim=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(len(classes), dim, dim, generator=g, dtype=torch.float64)
    return a @ a.transpose(1, 2) / dim


@pytest.mark.parametrize("meta_params", ["all", "head"])
def test_the_meta_gradient_of_sigma_matches_finite_differences_of_a_copied_model(meta_params):
    """float64: (Sigma - refined) / meta_lr against central differences of Sigma -> CE on the
    meta batch of a deep copy of the model whose (``meta_params``: all or the head's) parameters
    took one SGD step of the ISDA loss."""
    model, lr, lam = _tiny(), 0.3, 0.5
    x, y = _batch(6, 0)
    meta_x, meta_y = _batch(9, 1)
    classes, slot = class_slots(y, 3)
    sigma = _sigma(classes)

    def augment_for(net, feats_logits):
        feats, logits = feats_logits
        def augment(cov):
            shift = implicit_shift(net.head.weight, y, classes, slot, cov, lam)
            return LossInputs(logits + shift, y, feats)
        return augment

    def loss(inputs):
        return F.cross_entropy(inputs.logits, inputs.targets)

    out = model(x)
    aug = _augmenter(meta_params=meta_params)
    meta = MetaStep(module=model, params=trainable(model), loss=loss, lr=lr, meta_images=meta_x,
                    meta_labels=meta_y, logits_of=lambda o: o.logits, head_prefix="head.", batch=x,
                    features=out.features)
    refined = aug.refine(Covariance(full=sigma), augment_for(model, (out.features, out.logits)), meta)
    grad = (sigma - refined.full) / 0.5

    def meta_loss(s):  # the copy-based reference: what the functional call must equal
        net = copy.deepcopy(model)
        o = net(x)
        inner = loss(augment_for(net, (o.features, o.logits))(Covariance(full=s)))
        moved = list(net.parameters() if meta_params == "all" else net.head.parameters())
        grads = torch.autograd.grad(inner, moved)
        with torch.no_grad():
            for p, g in zip(moved, grads):
                p -= lr * g
        return F.cross_entropy(net(meta_x).logits, meta_y).item()

    eps, fd = 1e-6, torch.zeros_like(sigma)
    for idx in np.ndindex(*sigma.shape):
        up, down = sigma.clone(), sigma.clone()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (meta_loss(up) - meta_loss(down)) / (2 * eps)
    assert fd.abs().max() > 1e-4  # the meta loss does depend on Sigma
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    assert aug.meta_steps == 1 and float(aug.meta_loss_sum) == pytest.approx(meta_loss(sigma), rel=1e-12)


def _second_order_refinement(model, x, y, meta_x, meta_y, sigma, lr, lam, moved):
    """The reference: the meta gradient by differentiating through the virtual step's graph
    (create_graph), on the graph of one forward pass of ``x``."""
    classes, slot = class_slots(y, 3)
    leaf = sigma.clone().requires_grad_()
    out = model(x)
    shift = implicit_shift(model.head.weight, y, classes, slot, Covariance(full=leaf), lam)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(out.logits + shift, y), [params[n] for n in moved], create_graph=True)
    stepped = {**params, **{n: params[n] - lr * g for n, g in zip(moved, grads)}}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    meta_loss = F.cross_entropy(torch.func.functional_call(model, {**buffers, **stepped}, (meta_x,)).logits, meta_y)
    return torch.autograd.grad(meta_loss, leaf)[0]


@pytest.mark.parametrize("meta_params", ["all", "head"])
def test_the_forward_mode_meta_gradient_equals_differentiating_through_the_virtual_step(meta_params):
    """float64, a network with BatchNorm and dropout: refine's gradient (one backward pass,
    a forward-mode derivative of the features, second order only in the classifier) equals the
    reference's second-order pass through the whole network, the dropout masks replayed."""
    torch.manual_seed(3)
    backbone = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 4))
    backbone.feature_dim = 4
    model = Network(backbone, LinearHead(4, 3)).double().train()
    x, y = _batch(12, 0)
    meta_x, meta_y = _batch(9, 1)
    classes, slot = class_slots(y, 3)
    sigma, lr, lam = _sigma(classes), 0.3, 0.5
    moved = [n for n, _ in model.named_parameters() if meta_params == "all" or n.startswith("head.")]

    torch.manual_seed(11)  # the dropout masks of the reference's forward pass
    expected = _second_order_refinement(model, x, y, meta_x, meta_y, sigma, lr, lam, moved)
    torch.manual_seed(11)
    rng = rng_snapshot("cpu")
    out = model(x)
    aug = _augmenter(meta_params=meta_params)
    meta = MetaStep(module=model, params=trainable(model), lr=lr, meta_images=meta_x, meta_labels=meta_y,
                    loss=lambda i: F.cross_entropy(i.logits, i.targets), logits_of=lambda o: o.logits,
                    head_prefix="head.", batch=x, features=out.features, rng=rng)

    def augment(cov):
        return LossInputs(out.logits + implicit_shift(model.head.weight, y, classes, slot, cov, lam), y, out.features)

    refined = aug.refine(Covariance(full=sigma), augment, meta)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close((sigma - refined.full) / aug.meta_lr, expected, rtol=1e-9, atol=1e-12)
    if meta_params == "all":  # without the replay other masks: another (wrong) gradient
        meta.rng = None
        stray = aug.refine(Covariance(full=sigma), augment, meta)
        assert not torch.allclose(stray.full, refined.full)


def test_feature_tangent_is_the_directional_derivative_and_leaves_buffers_alone():
    model = _tiny()
    x, _ = _batch(8, 0)
    out = model(x)
    bn = model.backbone[1]
    running = bn.running_mean.clone()
    meta = MetaStep(module=model, params=trainable(model), loss=None, lr=0.1, meta_images=x, meta_labels=None,
                    head_prefix="head.", batch=x, features=out.features, rng=rng_snapshot("cpu"))
    direction = {"backbone.0.weight": torch.randn(4, 3, dtype=torch.float64), "backbone.1.bias": torch.ones(4, dtype=torch.float64)}
    torch.rand(5)  # the generator moves on; the replay sets it back for the call and returns it after
    state = torch.get_rng_state()
    tangent = meta.feature_tangent(direction)
    eps = 1e-6

    def at(sign):
        params = {n: p.detach() + sign * eps * direction.get(n, 0) for n, p in meta.params.items()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return torch.func.functional_call(model, {**buffers, **params}, (x,)).features

    torch.testing.assert_close(tangent, (at(1) - at(-1)) / (2 * eps), rtol=1e-6, atol=1e-8)
    assert torch.equal(bn.running_mean, running) and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(meta.feature_tangent({"head.bias": torch.ones(3, dtype=torch.float64)}), torch.zeros(8, 4,
                                                                                                           dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the training batch"):
        dataclasses.replace(meta, batch=None).feature_tangent(direction)


def test_the_rng_snapshot_of_a_cuda_step_holds_and_replays_that_device(monkeypatch):
    """No GPU here: the CUDA calls are recorded. A CUDA step's snapshot holds that device's
    generator state beside the CPU's, and the replay forks and sets exactly that device."""
    import torch.random

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or "state")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", state, device)))
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: calls.append(("fork", devices)) or contextlib.nullcontext())
    cpu_only = rng_snapshot("cpu")
    assert cpu_only[2] is None and not calls
    snap = rng_snapshot("cuda:1")
    assert snap[1] == torch.device("cuda:1") and calls == [("get", torch.device("cuda:1"))]
    with replay(snap):
        pass
    assert calls[1:] == [("fork", [torch.device("cuda:1")]), ("set", "state", torch.device("cuda:1"))]


def test_the_virtual_step_leaves_parameters_and_batchnorm_buffers_alone_and_refines_the_term():
    model = _tiny(torch.float32)
    x, y = _batch(12, 0, torch.float32)
    meta_x, meta_y = _batch(9, 1, torch.float32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {}
    for meta_lr in (0.0, 0.5):
        aug = _augmenter(meta_lr=meta_lr)
        out = model(x)  # the real forward (updates BatchNorm once, as a training step does)
        after_real = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert aug.meta_rows() == aug.meta_batch == 100
        aug.set_meta_step(MetaStep(module=model, params=trainable(model), lr=0.1, meta_images=meta_x,
                                   meta_labels=meta_y, logits_of=lambda o: o.logits, head_prefix="head.",
                                   loss=lambda i: F.cross_entropy(i.logits, i.targets), batch=x,
                                   features=out.features))
        inputs = aug.adjust_loss_inputs(LossInputs(out.logits, y, out.features), model.head)
        for k, v in model.state_dict().items():  # nothing changed by the meta step
            assert torch.equal(v, after_real[k]), k
        assert aug.pending is None  # consumed by this step
        results[meta_lr] = inputs.logits.detach()
        model.load_state_dict(before)
    plain = _augmenter(meta_lr=0.0)
    out = model(x)
    isda_logits = plain.adjust_loss_inputs(LossInputs(out.logits, y, out.features), model.head).logits
    torch.testing.assert_close(results[0.0], isda_logits.detach())  # meta_lr 0: ISDA's term
    assert (results[0.5] - results[0.0]).abs().max() > 1e-6  # the refined Sigma changes the term


def test_meta_logits_is_the_module_at_the_given_parameters():
    model = _tiny()
    meta_x, meta_y = _batch(8, 2)
    meta = MetaStep(module=model, params=trainable(model), loss=None, lr=0.1, meta_images=meta_x,
                    meta_labels=meta_y, logits_of=lambda o: o.logits)
    bn = model.backbone[1]
    running, tracked = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    shifted = {k: v + 1 if k == "head.bias" else v for k, v in meta.params.items()}
    own, moved = meta.meta_logits(meta.params), meta.meta_logits(shifted)
    assert torch.equal(bn.running_mean, running) and torch.equal(bn.num_batches_tracked, tracked)
    assert meta.params["head.bias"] is model.head.bias  # the real parameters, not a copy
    torch.testing.assert_close(own, model(meta_x).logits)  # training mode: the meta batch's statistics
    torch.testing.assert_close(moved, own + 1)
    assert not torch.equal(bn.running_mean, running)  # (a plain call does update them)


def test_meta_batches_are_seeded_by_seed_epoch_and_step():
    a = meta_indices(100, 30, 0, 2, 5)
    assert torch.equal(a, meta_indices(100, 30, 0, 2, 5)) and len(set(a.tolist())) == 30
    assert not torch.equal(a, meta_indices(100, 30, 0, 2, 6)) and not torch.equal(a, meta_indices(100, 30, 1, 2, 5))
    assert sorted(meta_indices(20, 30, 0, 0, 0).tolist()) == list(range(20))  # the whole set when smaller


# ---------------------------------------------------------------------------- options and errors


def test_config_errors_are_one_line_and_name_the_fix():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.feature_augmenter={name: metasaug}"])
    assert str(info.value).splitlines()[-1].strip() == (
        "train.feature_augmenter metasaug reads the validation split (never the test set), and this config has "
        "none: set data.val_per_class (e.g. 20: a balanced split held out of the training images)")
    with pytest.raises(ConfigError, match="retrain.augmenter metasaug reads the validation split"):
        load_config(None, ["retrain.augmenter={name: metasaug}"])
    with pytest.raises(ConfigError, match="meta_batch"):
        load_config(None, ["train.feature_augmenter={name: metasaug, meta_batch: 0}", "data.val_per_class=10"])
    with pytest.raises(ConfigError, match="set train.mixup_alpha=0"):
        load_config(None, ["train.feature_augmenter={name: metasaug}", "data.val_per_class=10", "train.mixup_alpha=1"])
    cfg = load_config(None, ["train.feature_augmenter={name: metasaug, start_epoch: 3, meta_lr: 0.2}",
                             "data.val_per_class=10"])
    opts = cfg.train.feature_augmenter
    assert (opts.start_epoch, opts.meta_lr, opts.meta_batch, opts.lambda0, opts.meta_params, opts.label()) == \
        (3, 0.2, 100, 0.75, "all", "MetaSAug")
    with pytest.raises(ConfigError, match="meta_params"):
        load_config(None, ["retrain.augmenter={name: metasaug, meta_params: backbone}", "data.val_per_class=10"])
    aug = build_augmenter({"name": "metasaug", "start_epoch": 5})
    ctx = AugmentContext(features=torch.zeros(3, 4), labels=torch.arange(3), class_counts=[1, 1, 1], head_classes=[])
    with pytest.raises(ConfigError) as info:
        aug.fit(ctx)
    assert str(info.value) == ("retrain.augmenter metasaug takes its meta step on the validation split (never the "
                               "test set), and there is none: set data.val_per_class (e.g. 10), or data.val_split for "
                               "split files")
    ctx.validation = (torch.zeros(3, 4), torch.arange(3))
    aug.fit(ctx)
    with pytest.raises(ConfigError, match="start_epoch 5 is not below the 5 epochs, so no meta step would run"):
        aug.set_epoch(0, 5)
    aug.set_epoch(5, 6)
    assert aug.meta_rows() == 100
    aug.set_epoch(4, 6)
    assert aug.meta_rows() == 0  # plain ISDA before start_epoch


def test_fitting_prints_the_meta_set_counts(capsys):
    _augmenter()
    assert "metasaug: meta set = the validation split, 6 images (2 per class, 3 classes), held out of the 3 " \
           "training rows; meta batches of 6" in capsys.readouterr().out


# ---------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, where):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _tiny()
        net = DistributedDataParallel(model)
        aug = _augmenter()
        refined, refine = [], aug.refine
        aug.refine = lambda *args: refined.append(refine(*args)) or refined[-1]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        meta_x, meta_y = _batch(9, 1)  # the same meta batch on both processes
        ce = lambda i: F.cross_entropy(i.logits, i.targets)  # noqa: E731
        for step in range(3):
            x, y = _batch(6, 10 * step + rank)  # each process its own share of the batch
            out = net(x)
            aug.set_meta_step(MetaStep(module=model, params=trainable(model), loss=ce, lr=0.1, meta_images=meta_x,
                                       meta_labels=meta_y, logits_of=lambda o: o.logits, head_prefix="head.",
                                       batch=x, features=out.features))
            loss = ce(aug.adjust_loss_inputs(LossInputs(out.logits, y, out.features), model.head))
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"params": {k: v.detach() for k, v in model.named_parameters()},  # (buffers: each its own)
                    "sigma": [c.full for c in refined], "meta_loss": aug.meta_loss_sum, "steps": aug.meta_steps}, where / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_stay_in_step_under_ddp(tmp_path):
    """The virtual gradient (autograd.grad on the DDP graph) leaves DDP's all-reduce to the
    real backward pass: after three MetaSAug steps on different batches both processes hold
    the same parameters, and these moved; both refined Sigma alike at every step."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert a["steps"] == b["steps"] == 3 and torch.isfinite(a["meta_loss"])
    start = dict(_tiny().named_parameters())
    for name, value in a["params"].items():
        torch.testing.assert_close(value, b["params"][name], rtol=0, atol=1e-12)
    moved = {k for k in start if not torch.allclose(a["params"][k], start[k])}
    assert moved >= {"backbone.0.weight", "backbone.1.weight", "head.weight", "head.bias"}
    assert len(a["sigma"]) == 3  # every step refined Sigma, alike on both processes (mean Sigma-gradient)
    for mine, theirs in zip(a["sigma"], b["sigma"]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- stage 3


def test_stage3_with_metasaug_trains_a_classifier_that_beats_chance(tmp_path):
    from synthetic import gaussian_feature_cache

    from tailaug.stages import pipeline

    cache = gaussian_feature_cache(10)
    cfg = load_config(None, ["retrain.epochs=8", "retrain.lr=0.05", "data.val_per_class=10",
                             "retrain.augmenter={name: metasaug, start_epoch: 2, meta_batch: 12}"])
    label, row = pipeline.retrain(cfg, tmp_path, cache, cfg.retrain.augmenter, progress=False)
    assert label == "cRT + MetaSAug" and row["metrics"]["top1"] > 80  # chance is 33%
    [saved] = (tmp_path / "retrain").glob("crt-metasaug-*.json")
    history = json.loads(saved.read_text())["history"]
    assert ["metasaug_meta_loss" in h for h in history] == [False, False] + [True] * 6
    assert all(np.isfinite(h["metasaug_meta_loss"]) for h in history[2:])


# ---------------------------------------------------------------------------- stage 1

STAGE1 = [*TINY_STAGE1, "data.val_per_class=10",
          "train.feature_augmenter={name: metasaug, lambda0: 0.5, start_epoch: 3, meta_batch: 20}"]


def _train(root, out, name, resume=False):
    return train_tiny(STAGE1, root, out, name, resume)


def test_the_meta_set_is_the_validation_split_disjoint_from_training(tmp_path, one_thread):
    from synthetic import write_fashion_mnist

    from tailaug.stages.representation import Trainer

    root = write_fashion_mnist(tmp_path / "fm", per_class_train=110, per_class_test=5)
    cfg = load_config("configs/fmnist_lt/demo.yaml", [*STAGE1, f"data.root={root}", f"run.output_dir={tmp_path}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    data = trainer.data
    flat = lambda images: {bytes(img.numpy().tobytes()) for img in images}  # noqa: E731 (noisy images are unique)
    assert not flat(data.val.images) & flat(data.train.images) and not flat(data.val.images) & flat(data.test.images)
    assert np.bincount(data.val.labels).tolist() == [10] * 10
    meta = trainer.meta_step(20, 2, 7)
    idx = meta_indices(len(data.val), 20, cfg.run.seed, 2, 7)
    assert torch.equal(meta.meta_images, trainer.transform(data.val.images[idx]))
    assert meta.meta_labels.tolist() == data.val.labels[idx.numpy()].tolist()
    assert meta.module is trainer.model and meta.lr == trainer.optimizer.param_groups[0]["lr"]
    assert set(meta.params) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_stage1_fit_reads_the_meta_set_sizes_without_a_forward_pass(tmp_path, monkeypatch, one_thread, capsys):
    from synthetic import fit_without_forward_pass

    trainer = fit_without_forward_pass(tmp_path, monkeypatch, STAGE1, "metasaug")
    train = len(trainer.data.train)
    assert trainer.feature_aug.fitted and trainer.feature_aug.moments.mean.shape == (10, 64)
    assert (f"meta set = the validation split, 100 images (10 per class, 10 classes), held out of the {train} "
            "training rows; meta batches of 20") in capsys.readouterr().out


@pytest.mark.slow
def test_stage1_with_metasaug_learns_and_resumes_exactly(tmp_path, monkeypatch, one_thread, capsys):
    from synthetic import stop_and_resume, write_fashion_mnist

    root = write_fashion_mnist(tmp_path / "fm", per_class_train=110)
    first = _train(root, tmp_path, "a")
    assert first["top1"] > 30  # chance is 10%
    assert "metasaug: meta set = the validation split, 100 images (10 per class, 10 classes)" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert ["metasaug_meta_loss" in r for r in records] == [False] * 3 + [True] * 3
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["feature_augmenter"]
    resumed = stop_and_resume(monkeypatch, lambda resume=False: _train(root, tmp_path, "b", resume), at_epoch=4)
    assert resumed["per_class"] == first["per_class"]
    again = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["feature_augmenter"]
    for name in state:
        assert torch.equal(again[name], state[name]), name
    resumed_records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    loss = lambda rs: [r.get("metasaug_meta_loss") for r in rs]  # noqa: E731
    assert loss(resumed_records) == loss(records)
