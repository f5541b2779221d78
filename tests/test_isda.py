"""ISDA: online class statistics, the implicit logit term, lambda's ramp, stages 1 and 3."""

import json
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tailaug.augment import class_moments, isda
from tailaug.augment.base import AugmentContext, build_augmenter
from tailaug.augment.class_moments import ClassMoments, Covariance, class_slots
from tailaug.augment.isda import class_quadratic, ramp
from tailaug.config import load_config
from tailaug.engine import distributed
from tailaug.errors import ConfigError
from tailaug.losses import LossInputs
from tailaug.models.heads import CosineHead, LinearHead, linear_form

from synthetic import TINY_STAGE1, train_tiny

KINDS = ["full", "diagonal", "lowrank"]


def _numpy_stats(x, y, num_classes):
    """count, mean, population covariance of every class (zeros for a class not seen)."""
    x = np.asarray(x, dtype=np.float64)
    counts = np.bincount(y, minlength=num_classes)
    means, covs = np.zeros((num_classes, x.shape[1])), np.zeros((num_classes, x.shape[1], x.shape[1]))
    for c in range(num_classes):
        if counts[c]:
            means[c] = x[y == c].mean(0)
            centred = x[y == c] - means[c]
            covs[c] = centred.T @ centred / counts[c]
    return counts, means, covs


def _subspace_features(labels, dim, rank, seed=0):
    """Features of each class in a rank-dim linear subspace (so its covariance has rank <= rank,
    and so has that of the normalised features), with a class-specific offset inside it."""
    g = torch.Generator().manual_seed(seed)
    classes = int(labels.max()) + 1
    basis = torch.randn(classes, rank, dim, generator=g)
    z = torch.randn(len(labels), rank, generator=g) + 2 + torch.arange(classes)[labels, None].float()
    return torch.einsum("nr,nrd->nd", z, basis[labels])


# ---------------------------------------------------------------------------- the statistics


STREAM = [  # uneven batches; class 3 is absent from the first two and class 4 from all
    [0, 0, 1, 2, 0, 1, 0],
    [2, 2, 0],
    [3, 0, 1, 1, 3, 3, 2, 0, 0, 1, 3, 2],
    [1, 3, 0, 3, 2],
]


@pytest.mark.parametrize("kind", KINDS)
def test_online_statistics_after_uneven_batches_are_those_of_all_rows_seen(kind, monkeypatch):
    monkeypatch.setattr(class_moments, "BLOCK", 40)  # several blocks of outer products per batch
    labels = [torch.tensor(b) for b in STREAM]
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(len(b), 6, generator=g) * 2 + 5 for b in labels]
    moments = ClassMoments(kind, rank=2 if kind == "lowrank" else None)
    moments.reset(5, 6)
    for x, y in zip(feats, labels):
        moments.update(x, y)
    x, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    counts, means, covs = _numpy_stats(x, y, 5)
    assert moments.count.tolist() == counts.tolist()
    np.testing.assert_allclose(moments.mean.numpy(), means, atol=1e-5)
    sigma = moments.covariance()
    variances = np.diagonal(covs, axis1=1, axis2=2)
    if kind == "full":
        np.testing.assert_allclose(sigma.full.numpy(), covs, atol=1e-4)
    else:  # the diagonal, and the low-rank form's total diagonal, are the exact variances
        np.testing.assert_allclose(np.diagonal(sigma.dense().numpy(), axis1=1, axis2=2), variances, atol=1e-4)
    if kind == "lowrank":  # the sketch is M Omega exactly; the factor is the Nyström approximation of Sigma
        omega = moments.omega.double().numpy()
        np.testing.assert_allclose(moments.sketch.numpy(), counts[:, None, None] * covs @ omega, atol=1e-3)
        for c in range(4):
            y_c = covs[c] @ omega
            nystrom = y_c @ np.linalg.solve(omega.T @ y_c, y_c.T)
            np.testing.assert_allclose(sigma.factor[c].double().numpy() @ sigma.factor[c].double().numpy().T,
                                       nystrom, atol=1e-3)
        assert (sigma.diagonal >= 0).all()
    assert moments.count[4] == 0 and not sigma.dense()[4].any()  # a class never seen: Sigma = 0


def test_the_low_rank_form_is_exact_on_the_probes_range_and_never_exceeds_sigma():
    moments = ClassMoments("lowrank", rank=3)
    moments.reset(2, 7)
    labels = torch.tensor([0] * 30 + [1] * 20)
    g = torch.Generator().manual_seed(4)
    inside = (torch.randn(30, 3, generator=g) + 2) @ moments.omega.t()  # class 0 in the range of Omega
    x = torch.cat([inside, torch.randn(20, 7, generator=g) * torch.linspace(0.5, 3, 7)])
    moments.fit(x, labels, rows=16)
    _, _, covs = _numpy_stats(x.numpy(), labels.numpy(), 2)
    sigma = moments.covariance()
    low = (sigma.factor @ sigma.factor.transpose(1, 2)).double().numpy()
    np.testing.assert_allclose(low[0], covs[0], atol=1e-4 * np.abs(covs[0]).max())
    assert np.linalg.eigvalsh(covs[1] - low[1]).min() > -1e-4  # the Nyström part is below Sigma
    np.testing.assert_allclose(np.diagonal(sigma.dense().numpy(), axis1=1, axis2=2),
                               np.diagonal(covs, axis1=1, axis2=2), atol=1e-4)


def test_class_slots_put_the_present_classes_first_without_reading_the_labels_on_the_host():
    classes, slot = class_slots(torch.tensor([4, 1, 4, 6]), 8)
    assert classes.tolist() == [1, 4, 6, 0]  # min(B, C) = 4: the present ones, then absent ones
    assert sorted(slot.tolist()) == list(range(8)) and slot[torch.tensor([4, 1, 4, 6])].tolist() == [1, 0, 1, 2]
    classes, _ = class_slots(torch.tensor([2, 2, 0, 2, 1, 0]), 3)
    assert classes.tolist() == [0, 1, 2]


class TwoRanks:
    """torch.distributed as seen from two ranks that are two threads of this process."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=20)
        self.local = threading.local()
        self.slots = [None, None]

    def exchange(self, tensor):
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        both = list(self.slots)
        self.barrier.wait()
        return both

    def all_gather(self, parts, tensor, group=None, async_op=False):
        for part, value in zip(parts, self.exchange(tensor)):
            part.copy_(value)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        first, second = self.exchange(tensor)
        tensor.copy_(first + second)

    def run(self, work):
        """work(rank) in two threads; their results (an error in either is raised)."""
        results, errors = [None, None], []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as exc:  # noqa: BLE001 (re-raised below)
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_split_over_two_ranks_gives_the_statistics_of_the_whole_stream(kind, monkeypatch):
    ranks = TwoRanks()
    monkeypatch.setattr(distributed, "_active", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", ranks.all_gather)
    monkeypatch.setattr(dist, "all_reduce", ranks.all_reduce)
    g = torch.Generator().manual_seed(2)
    batches = [torch.tensor(b) for b in ([0, 1, 0, 0, 2, 1], [3, 3, 0, 1], [2, 0, 0, 0, 1, 3, 3, 2])]
    feats = [torch.randn(len(b), 5, generator=g) + b[:, None] for b in batches]
    rank = 2 if kind == "lowrank" else None

    def work(r):
        moments = ClassMoments(kind, rank)
        moments.reset(5, 5)
        for x, y in zip(feats, batches):  # each rank gets one half of every batch (class 2 only on one rank at first)
            half = len(y) // 2
            moments.update(x[r * half : (r + 1) * half], y[r * half : (r + 1) * half], reduce=True)
        return moments.state_tensors()

    first, second = ranks.run(work)
    whole = ClassMoments(kind, rank)
    whole.reset(5, 5)
    for x, y in zip(feats, batches):
        whole.update(x, y)
    for name, value in whole.state_tensors().items():
        assert torch.equal(first[name], second[name]), name  # both ranks hold the same statistics
        torch.testing.assert_close(first[name], value, atol=1e-4, rtol=1e-5)
    counts, means, _ = _numpy_stats(torch.cat(feats).numpy(), torch.cat(batches).numpy(), 5)
    assert first["count"].tolist() == counts.tolist()
    np.testing.assert_allclose(first["mean"].numpy(), means, atol=1e-5)


# ---------------------------------------------------------------------------- the implicit term


def _fitted(kind, labels, features, lam_epoch=(3, 4), **options):
    aug = build_augmenter({"name": "isda", "lambda0": 0.5, "covariance": kind, **options})
    aug.fit(AugmentContext(features=features, labels=labels, class_counts=torch.bincount(labels, minlength=4),
                           head_classes=[0]))
    aug.set_epoch(*lam_epoch)
    return aug


@pytest.mark.parametrize("head_kind", ["linear", "cosine"])
@pytest.mark.parametrize("kind", KINDS)
def test_augmented_logits_match_a_double_loop_over_samples_and_classes(kind, head_kind, monkeypatch):
    monkeypatch.setattr(isda, "BLOCK", 30)  # the classes' terms in several blocks
    torch.manual_seed(0)
    train_y = torch.tensor([0] * 20 + [1] * 15 + [2] * 12 + [3] * 9)
    train_x = _subspace_features(train_y, dim=6, rank=2)
    options = {"rank": 2} if kind == "lowrank" else {}
    aug = _fitted(kind, train_y, train_x, **options)
    head = LinearHead(6, 4) if head_kind == "linear" else CosineHead(6, 4, scale=5.0)
    x, y = train_x[::5], train_y[::5]
    logits = head(x)
    cosine = head.cosine(x)
    out = aug.adjust_loss_inputs(LossInputs(logits, y, x, cosine), head)

    phi = x if head_kind == "linear" else torch.nn.functional.normalize(x, dim=1)
    train_phi = train_x if head_kind == "linear" else torch.nn.functional.normalize(train_x, dim=1)
    _, _, covs = _numpy_stats(train_phi.numpy(), train_y.numpy(), 4)  # of a / |a| on a cosine head
    if kind == "diagonal":
        covs = np.stack([np.diag(np.diag(c)) for c in covs])
    if kind == "lowrank":  # the term with the augmenter's own Sigma, whose diagonal is exact
        dense = aug.fixed[1].dense().double().numpy()
        np.testing.assert_allclose(np.diagonal(dense, axis1=1, axis2=2), np.diagonal(covs, axis1=1, axis2=2),
                                   rtol=1e-4, atol=1e-6)
        covs = dense
    w = head.weight.detach().double().numpy()
    if head_kind == "cosine":
        w = 5.0 * w / np.linalg.norm(w, axis=1, keepdims=True)
    lam = 0.5 * 3 / 4
    expected = logits.detach().double().numpy().copy()
    for i in range(len(y)):
        for j in range(4):
            if j != y[i]:
                diff = w[j] - w[y[i]]
                expected[i, j] += lam / 2 * diff @ covs[y[i]] @ diff
    assert not np.allclose(expected, logits.detach().numpy())  # the term is not negligible here
    np.testing.assert_allclose(out.logits.detach().numpy(), expected, rtol=2e-4, atol=2e-4)
    assert torch.equal(out.features, x) and torch.equal(out.targets, y)
    if head_kind == "cosine":
        np.testing.assert_allclose(out.cosine.detach().numpy(),
                                   cosine.detach().numpy() + (expected - logits.detach().numpy()) / 5.0,
                                   rtol=2e-4, atol=2e-4)
        assert torch.allclose(phi @ torch.tensor(w, dtype=torch.float32).t(), logits, atol=1e-5)
    else:
        assert out.cosine is None


def test_the_term_is_differentiable_in_the_weights_and_in_sigma():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    full = (a @ a.transpose(1, 2)).requires_grad_()
    factor = torch.randn(2, 3, 1, generator=g, dtype=torch.float64, requires_grad=True)
    diagonal = torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    classes = torch.tensor([2, 0])
    assert torch.autograd.gradcheck(lambda w, s: class_quadratic(w, classes, Covariance(full=s)), (weight, full))
    assert torch.autograd.gradcheck(
        lambda w, d, f: class_quadratic(w, classes, Covariance(diagonal=d, factor=f)), (weight, diagonal, factor))


def test_tail_targets_leave_head_rows_alone():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10 + [3] * 10)
    x = torch.randn(40, 5)
    aug = _fitted("diagonal", labels, x, targets="tail")
    head = LinearHead(5, 4)
    logits = head(x)
    out = aug.adjust_loss_inputs(LossInputs(logits, labels, x), head).logits
    assert torch.equal(out[:10], logits[:10])  # class 0 is the head class
    assert (out[10:] > logits[10:] - 1e-6).all() and not torch.allclose(out[10:], logits[10:])


def test_lws_states_its_class_scales_in_its_linear_form():
    from tailaug.classifiers.lws import LWSClassifier

    weight = torch.randn(3, 4)
    lws = LWSClassifier(weight, cosine_scale=7.0)
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([1.0, 2.0, 0.5]))
    form = linear_form(lws)
    x = torch.randn(5, 4)
    assert form.normalised and form.cosine_scale == 7.0
    assert torch.allclose(torch.nn.functional.normalize(x, dim=1) @ form.weight.t(), lws(x), atol=1e-5)
    form.weight.sum().backward()  # differentiable in the learnt scales
    assert lws.scales.grad is not None


def test_lambda_ramps_linearly_from_zero_over_the_epochs():
    assert [ramp(0.5, e, 10) for e in (0, 1, 5, 9)] == [0.0, 0.05, 0.25, 0.45]
    aug = build_augmenter({"name": "isda"})
    assert aug.lambda0 == 0.5 and aug.covariance == "full"  # the published CIFAR value, the published estimator
    labels = torch.tensor([0, 1, 2, 3] * 3)
    aug.fit(AugmentContext(features=torch.randn(12, 5), labels=labels, class_counts=[3] * 4, head_classes=[]))
    for epoch, lam in ((0, 0.0), (4, 0.1), (19, 0.475)):
        aug.set_epoch(epoch, 20)
        assert aug.after_epoch(None, epoch) == {"isda_lambda": pytest.approx(lam)}
    aug.set_epoch(0, 20)
    x = torch.randn(4, 5)
    inputs = LossInputs(torch.randn(4, 4), labels[:4], x)
    assert aug.adjust_loss_inputs(inputs, LinearHead(5, 4)) is inputs  # lambda 0: the plain loss


# ---------------------------------------------------------------------------- options and errors


def test_bad_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="covariance"):
        load_config(None, ["retrain.augmenter={name: isda, covariance: dense}"])
    with pytest.raises(ConfigError, match="lambda0"):
        load_config(None, ["train.feature_augmenter={name: isda, lambda0: -1}"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["retrain.augmenter={name: isda, rank: 4}"])
    assert "rank is read only with covariance: lowrank (this one is full)" in str(info.value)
    with pytest.raises(ConfigError, match="set train.mixup_alpha=0"):
        load_config(None, ["train.feature_augmenter={name: isda}", "train.mixup_alpha=1"])
    cfg = load_config(None, ["train.feature_augmenter={name: isda, lambda0: 0.25, covariance: lowrank, rank: 3}",
                             "retrain.augmenter={name: isda}"])
    assert cfg.train.feature_augmenter.rank == 3 and cfg.retrain.augmenter.label() == "ISDA"
    aug = build_augmenter({"name": "isda", "covariance": "lowrank", "rank": 5})
    ctx = AugmentContext(features=torch.randn(8, 5), labels=torch.arange(8) % 2, class_counts=[4, 4], head_classes=[])
    with pytest.raises(ConfigError) as info:
        aug.fit(ctx)
    assert str(info.value) == ("retrain.augmenter isda rank 5 must be below the feature dimension 5; lower "
                               "retrain.augmenter.rank, or use covariance: full")
    big = AugmentContext(features=torch.zeros(2, 2048, dtype=torch.float16), labels=torch.tensor([0, 1]),
                         class_counts=[1] * 1000, head_classes=[], online=True)
    with pytest.raises(ConfigError, match="feature_augmenter isda covariance: full would keep 1000 x 2048 x 2048"):
        build_augmenter({"name": "isda"}).fit(big)


def test_an_over_sampler_refuses_an_implicit_augmenter():
    pytest.importorskip("imblearn")
    from tailaug.estimators import FeatureAugmentSampler

    x, y = np.random.default_rng(0).normal(size=(30, 4)), np.repeat([0, 1, 2], [20, 6, 4])
    with pytest.raises(ValueError, match="augments implicitly, in the classifier's loss"):
        FeatureAugmentSampler(augmenter="isda").fit_resample(x, y)


# ---------------------------------------------------------------------------- stage 3


def test_stage3_with_isda_trains_a_classifier_that_beats_chance(tmp_path):
    from synthetic import gaussian_feature_cache

    from tailaug.stages import pipeline

    cache = gaussian_feature_cache()
    cfg = load_config(None, ["retrain.epochs=10", "retrain.lr=0.05",
                             "retrain.augmenter={name: isda, covariance: lowrank, rank: 2}"])
    label, row = pipeline.retrain(cfg, tmp_path, cache, cfg.retrain.augmenter, progress=False)
    assert label == "cRT + ISDA" and row["metrics"]["top1"] > 80  # chance is 33%
    [saved] = (tmp_path / "retrain").glob("crt-isda-*.json")
    history = json.loads(saved.read_text())["history"]
    assert [h["isda_lambda"] for h in history] == pytest.approx([0.05 * e for e in range(10)])


# ---------------------------------------------------------------------------- stage 1

STAGE1 = [*TINY_STAGE1, "data.val_per_class=5",
          "train.feature_augmenter={name: isda, lambda0: 0.5, covariance: full}"]


def _train(root, out, name, resume=False):
    return train_tiny(STAGE1, root, out, name, resume)


def test_stage1_fit_of_isda_runs_no_forward_pass_over_the_training_set(tmp_path, monkeypatch, one_thread):
    """Online ISDA reads only N, d and the labels at fit: no features (nor logits) of the whole
    training set are computed; FASA's fit reads them, so it still gets the forward pass."""
    from synthetic import fit_without_forward_pass

    trainer = fit_without_forward_pass(tmp_path, monkeypatch, STAGE1, "isda")
    cfg = trainer.cfg
    aug = trainer.feature_aug
    assert aug.fitted and aug.online and aug.source is None
    assert aug.moments.scatter.shape == (10, 64, 64) and aug.moments.count.sum() == 0
    assert cfg.train.feature_augmenter.stage1_fit_reads_features is False
    fasa = load_config(None, ["train.feature_augmenter={name: fasa}", "data.val_per_class=5", "train.mixup_alpha=0"])
    assert fasa.train.feature_augmenter.stage1_fit_reads_features is True


@pytest.mark.slow
def test_stage1_with_isda_learns_and_resumes_exactly(tmp_path, monkeypatch, one_thread):
    from synthetic import stop_and_resume, write_fashion_mnist

    root = write_fashion_mnist(tmp_path / "fm", per_class_train=110)
    first = _train(root, tmp_path, "a")
    assert first["top1"] > 30  # chance is 10%
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["isda_lambda"] for r in records] == pytest.approx([0.5 * e / 6 for e in range(6)])
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["feature_augmenter"]
    assert sorted(state) == ["count", "mean", "scatter"] and state["scatter"].shape == (10, 64, 64)
    assert state["count"].min() > 0 and state["count"].sum() % 32 == 0  # every row of every batch of 32
    resumed = stop_and_resume(monkeypatch, lambda resume=False: _train(root, tmp_path, "b", resume), at_epoch=3)
    assert resumed["per_class"] == first["per_class"]
    again = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["feature_augmenter"]
    for name in state:
        assert torch.equal(again[name], state[name]), name


@pytest.mark.slow
def test_torchrun_two_processes_keep_the_statistics_of_the_whole_global_batch(tmp_path):
    """Each rank sees half of every batch of 32; the statistics merge both halves, so the
    checkpointed counts are those of every row of every global batch (one rank's would be half)."""
    from synthetic import torchrun_train, write_fashion_mnist

    from tailaug.config import load_config
    from tailaug.data.datasets import build_data

    root = write_fashion_mnist(tmp_path / "fm", per_class_train=110)
    args = ["configs/fmnist_lt/demo.yaml", *STAGE1, "train.epochs=2", "data.val_per_class=0", f"data.root={root}",
            f"run.output_dir={tmp_path}", "run.name=ddp"]
    proc = torchrun_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["feature_augmenter"]
    images = len(build_data(load_config(args[0], args[1:]).data).train)
    assert state["count"].sum() == 2 * (images // 32) * 32  # 2 epochs of whole global batches (drop_last)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["isda_lambda"] for r in records] == [0.0, 0.25]  # logged without a validation split too
