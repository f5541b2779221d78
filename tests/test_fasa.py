"""FASA: momentum class means, virtual features, sampling rates adapted on the validation loss."""

import json

import numpy as np
import pytest
import torch

from tailaug.augment.base import AugmentContext, build_augmenter
from tailaug.augment.fasa import adapt_rates, momentum_update, per_class_loss
from tailaug.config import load_config
from tailaug.errors import ConfigError

from synthetic import TINY_STAGE1, train_tiny


def _context(with_val=True):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 12 + [1] * 6 + [2] * 3)
    features = torch.randn(len(labels), 4, generator=g) + 3 * torch.eye(3, 4)[labels]
    val = (torch.randn(9, 4, generator=g), torch.arange(3).repeat_interleave(3)) if with_val else None
    return AugmentContext(features=features, labels=labels, class_counts=[12, 6, 3], head_classes=[0],
                          validation=val)


def test_the_running_class_means_match_numpy():
    ctx = _context()
    aug = build_augmenter({"name": "fasa", "momentum": 0.8, "ratio": 0.5})
    aug.fit(ctx)
    x, y = ctx.features.numpy().astype(np.float64), ctx.labels.numpy()
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    variance = np.mean((x - means[y]) ** 2, axis=0)
    gen = torch.Generator().manual_seed(0)
    for batch in ([0, 1, 2, 12, 13], [3, 4, 18, 19, 20], [5, 6, 7, 8]):
        xb, yb = x[batch], y[batch]
        deviation = np.mean((xb - means[yb]) ** 2, axis=0)
        for c in set(yb.tolist()):
            means[c] = 0.8 * means[c] + 0.2 * xb[yb == c].mean(0)
        variance = 0.8 * variance + 0.2 * deviation
        out_x, out_y = aug(ctx.features[batch], ctx.labels[batch], generator=gen)
        assert len(out_y) == len(batch) + round(0.5 * len(batch))
        assert torch.equal(out_x[: len(batch)], ctx.features[batch])
    assert np.allclose(aug.means.numpy(), means, atol=1e-5)
    assert np.allclose(aug.variance.numpy(), variance, atol=1e-5)
    assert torch.allclose(momentum_update(torch.zeros(2, 1), torch.tensor([[2.0], [4.0]]), torch.tensor([1, 1]), 0.5),
                          torch.tensor([[0.0], [1.5]]))


def test_virtual_features_follow_the_class_mean_and_shared_variance():
    ctx = _context()
    aug = build_augmenter({"name": "fasa", "momentum": 0.0, "ratio": 200.0, "targets": "tail"})
    aug.fit(ctx)
    x, y = aug(ctx.features[:20], ctx.labels[:20], generator=torch.Generator().manual_seed(0))
    virtual, classes = x[20:], y[20:]
    assert set(classes.tolist()) == {1, 2}  # targets: tail (class 0 is head)
    for c in (1, 2):
        assert torch.allclose(virtual[classes == c].mean(0), aug.means[c], atol=0.15)
    assert torch.allclose(virtual.var(0) - aug.means[classes].var(0), aug.variance, rtol=0.15, atol=0.05)


def test_a_class_whose_validation_loss_rises_is_sampled_more_and_one_whose_loss_falls_less():
    rates = torch.tensor([1.0, 1.0, 1.0, 0.0])
    new = adapt_rates(rates, torch.tensor([2.0, 1.0, 0.5, 3.0]), torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0, 0.1, 10.0)
    assert new[0] == pytest.approx(np.e) and new[1] == 1.0 and new[2] == pytest.approx(np.exp(-0.5))
    assert new[3] == 0.0  # not a target class
    assert adapt_rates(torch.ones(1), torch.tensor([9.0]), torch.zeros(1), 1.0, 0.1, 10.0).item() == 10.0

    # through the augmenter: a classifier that gets worse on class 0 and better on class 2
    ctx = _context()
    aug = build_augmenter({"name": "fasa"})
    aug.fit(ctx)
    biases = [torch.zeros(3), torch.tensor([-2.0, 0.0, 2.0])]
    records = []
    for epoch, bias in enumerate(biases):
        classifier = torch.nn.Linear(4, 3)
        torch.nn.init.zeros_(classifier.weight)
        classifier.bias.data = bias
        records.append(aug.after_epoch(classifier, epoch))
    assert records[0]["fasa_rates"] == [1.0, 1.0, 1.0]
    r0, r1, r2 = records[1]["fasa_rates"]
    assert r0 > 1.0 and r2 < 1.0
    losses = records[1]["fasa_val_loss"]
    assert losses == pytest.approx(per_class_loss(biases[1].expand(9, 3), ctx.validation[1], 3).tolist())
    json.dumps(records)  # what the stage-3 history stores


def test_the_validation_split_is_disjoint_from_training_and_test(tmp_path):
    from tailaug.data.datasets import _hold_out_validation, build_data

    from synthetic import write_fashion_mnist

    labels = np.repeat(np.arange(3), 10)
    keep = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 20])  # class 0 uses all its images
    kept, val = _hold_out_validation(labels, keep, 2, seed=0)
    assert not set(kept) & set(val) and set(kept) <= set(keep)
    assert np.bincount(labels[val]).tolist() == [2, 2, 2]
    root = write_fashion_mnist(tmp_path / "fm", per_class_train=30, per_class_test=5)
    cfg = load_config(None, [f"data.root={root}", "data.n_max=20", "data.imbalance_factor=10", "data.val_per_class=4"])
    data = build_data(cfg.data)
    flat = lambda s: {bytes(img.numpy().tobytes()) for img in s.images}  # noqa: E731 (noisy images are unique)
    assert not flat(data.val) & flat(data.train) and not flat(data.val) & flat(data.test)
    assert np.bincount(data.val.labels).tolist() == [4] * 10


def test_fasa_without_a_validation_split_is_a_one_line_error_naming_the_fix():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["retrain.augmenter={name: fasa}"])
    message = str(info.value).splitlines()[-1].strip()
    assert message == ("retrain.augmenter fasa reads the validation split (never the test set), and this config "
                       "has none: set data.val_per_class (e.g. 20: a balanced split held out of the training images)")
    assert load_config(None, ["retrain.augmenter={name: fasa}", "data.val_per_class=20"]).retrain.augmenter.name == "fasa"
    with pytest.raises(ConfigError, match="set data.val_per_class"):
        build_augmenter({"name": "fasa"}).fit(_context(with_val=False))


def test_fasa_stage3_records_its_rates_per_epoch(tmp_path):
    from synthetic import gaussian_feature_cache

    from tailaug.stages import pipeline

    cache = gaussian_feature_cache(5)
    cfg = load_config(None, ["data.val_per_class=5", "retrain.epochs=10", "retrain.lr=0.05", "retrain.augmenter={name: fasa}"])
    label, row = pipeline.retrain(cfg, tmp_path, cache, cfg.retrain.augmenter, progress=False)
    assert label == "cRT + FASA" and row["metrics"]["top1"] > 80
    [saved] = (tmp_path / "retrain").glob("crt-fasa-*.json")
    history = json.loads(saved.read_text())["history"]
    assert len(history) == 10 and all(len(h["fasa_rates"]) == 3 and h["augment_s"] >= 0 for h in history)
    # tailaug analyze fasa plots them
    from tailaug.cli import main

    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert main(["analyze", "fasa", str(tmp_path)]) == 0
    assert (tmp_path / "analysis" / "fasa_rates.png").stat().st_size > 1000


def test_analyze_fasa_without_a_fasa_run_names_the_fix(tmp_path, capsys):
    from tailaug.cli import main

    (tmp_path / "config.yaml").write_text(load_config(None).to_yaml())
    assert main(["analyze", "fasa", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no FASA run" in err and "retrain.augmenter={name: fasa}" in err


# ---------------------------------------------------------------------------- during representation learning

STAGE1 = [*TINY_STAGE1, "data.val_per_class=5",
          "train.feature_augmenter={name: fasa, ratio: 0.5}"]


def _train(root, out, name, resume=False):
    return train_tiny(STAGE1, root, out, name, resume)


@pytest.mark.slow
def test_fasa_during_representation_learning_adapts_rates_and_resumes_exactly(tmp_path, monkeypatch):
    from synthetic import stop_and_resume, write_fashion_mnist

    root = write_fashion_mnist(tmp_path / "fm", per_class_train=110)
    first = _train(root, tmp_path, "a")
    assert first["top1"] > 30  # chance is 10%
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["fasa_rates"] for r in records]
    assert len(rates) == 6 and rates[0] == [1.0] * 10 and rates[-1] != rates[0]
    resumed = stop_and_resume(monkeypatch, lambda resume=False: _train(root, tmp_path, "b", resume), at_epoch=2)
    assert resumed["per_class"] == first["per_class"]
    again = [json.loads(line)["fasa_rates"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert again == rates
    from tailaug.cli import main

    assert main(["analyze", "fasa", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "analysis" / "fasa_rates_stage1.png").stat().st_size > 1000


def test_a_stage1_feature_augmenter_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="train.feature_augmenter noise works on cached features only"):
        load_config(None, ["train.feature_augmenter={name: noise}"])
    with pytest.raises(ConfigError, match="set train.mixup_alpha=0"):
        load_config(None, ["train.feature_augmenter={name: fasa}", "data.val_per_class=5", "train.mixup_alpha=1"])
    with pytest.raises(ConfigError, match="train.feature_augmenter fasa reads the validation split"):
        load_config(None, ["train.feature_augmenter={name: fasa}"])
    from tailaug.stages.keys import stage1_key

    plain = load_config(None, ["data.val_per_class=5"])
    fasa = load_config(None, ["data.val_per_class=5", "train.feature_augmenter={name: fasa}"])
    assert stage1_key(plain) != stage1_key(fasa)
    assert stage1_key(plain) == stage1_key(load_config(None, ["data.val_per_class=5", "train.feature_augmenter={name: none}"]))
