"""`tailaug run --seeds`, `tailaug analyze figures` and the stage-1 TensorBoard curves on a tiny run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tailaug.cli import main
from tailaug.evaluation.augmented import augment_rows
from tailaug.evaluation.decision_boundary import mean_plane
from tailaug.evaluation.plots import plot_confusion

from synthetic import write_fashion_mnist

TINY = [
    "data.n_max=100", "data.imbalance_factor=10", "data.num_workers=0", "data.val_per_class=5",
    "model.arch=resnet20", "train.epochs=2", "train.batch_size=32", "train.warmup_epochs=1", "train.lr=0.05",
    "train.mixup_alpha=0", "train.precision=fp32", "stg.head.rule=top_k", "stg.head.top_k=3", "stg.epochs=2",
    "stg.memory_size=64", "retrain.epochs=5", "retrain.augmenter={name: stg, lam: 1.5}", "features.views=1",
]


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    data = write_fashion_mnist(root / "fm", per_class_train=100)
    assert main(["run", "configs/fmnist_lt/demo.yaml", "--seeds", "0", "1", *TINY, f"data.root={data}",
                 f"run.output_dir={root / 'runs'}", "run.name=tiny", "--no-progress"]) == 0
    return root / "runs"


def is_png(path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG" and path.stat().st_size > 0


def test_seeds_make_one_run_per_seed_then_their_report(seeded_runs):
    assert sorted(p.name for p in seeded_runs.iterdir()) == ["tiny-report", "tiny-s0", "tiny-s1"]
    for seed in (0, 1):
        saved = (seeded_runs / f"tiny-s{seed}" / "config.yaml").read_text()
        assert f"seed: {seed}" in saved and f"name: tiny-s{seed}" in saved
    report = json.loads((seeded_runs / "tiny-report" / "report.json").read_text())
    assert report["distinguishing_keys"] == []
    assert [(r["method"], r["seeds"]) for r in report["rows"]] == [
        ("stage 1", ["0", "1"]), ("cRT", ["0", "1"]), ("cRT + STG (lambda 1.5)", ["0", "1"])]
    s0, s1 = (json.loads((seeded_runs / f"tiny-s{s}" / "results.json").read_text())["rows"]["cRT"]["metrics"]
              for s in (0, 1))
    assert report["rows"][1]["metrics"]["top1"]["mean"] == pytest.approx((s0["top1"] + s1["top1"]) / 2)
    assert is_png(seeded_runs / "tiny-report" / "per_class_accuracy.png")


def test_tensorboard_shows_shot_group_and_per_class_accuracy(seeded_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = seeded_runs / "tiny-s0"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for split in ("train", "val"):
        # no class has more than 100 training images: the many-shot group is empty, logged as null only
        assert {f"{split}_medium", f"{split}_few"} <= tags and f"{split}_many" not in tags
        assert {f"{split}_per_class/{c}" for c in range(10)} <= tags
        assert [e.step for e in events.Scalars(f"{split}_per_class/0")] == [0, 1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["train_many"] is None and len(last["train_per_class"]) == 10
    # the shot-group accuracy is the mean of its classes' accuracies (training counts 100 ... 10)
    counts = json.loads((run / "results.json").read_text())["rows"]["stage 1"]["metrics"]["class_counts"]
    medium = [a for a, n in zip(last["val_per_class"], counts) if 20 <= n <= 100]
    assert last["val_medium"] == pytest.approx(np.mean(medium))
    assert events.Scalars("val_per_class/3")[-1].value == pytest.approx(last["val_per_class"][3])


def test_every_figure_of_a_run_renders_to_a_png(seeded_runs, capsys):
    run = seeded_runs / "tiny-s0"
    assert main(["analyze", "figures", str(run)]) == 0
    assert "figures to" in capsys.readouterr().out
    expected = {"per_class_methods.png", "tsne_test_features.png", "tsne_crt___stg__lambda_1_5.png",
                "decision_boundary.png"}
    for row in ("stage_1", "crt", "crt___stg__lambda_1_5"):
        expected |= {f"{row}_confusion.png", f"{row}_reliability.png", f"{row}_per_class.png"}
    written = {p.name for p in (run / "plots").iterdir()}
    assert expected <= written
    assert all(is_png(run / "plots" / name) for name in expected)


def test_the_plane_keeps_the_distances_of_the_class_means():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(90, 16, generator=gen) + torch.repeat_interleave(torch.randn(3, 16, generator=gen) * 4, 30, 0)
    labels = torch.repeat_interleave(torch.tensor([4, 7, 2]), 30)
    origin, basis = mean_plane(features, labels, [4, 7, 2])
    means = torch.stack([features[labels == c].double().mean(0) for c in (4, 7, 2)])
    projected = (means - origin) @ basis
    assert torch.allclose(basis.T @ basis, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.cdist(projected, projected), torch.cdist(means, means), atol=1e-9)


def test_augment_rows_returns_only_the_rows_an_augmenter_changed():
    from tailaug.augment.base import AugmentContext, build_augmenter

    noise = build_augmenter({"name": "noise", "std": 0.5})
    feats, labels = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 2])
    noise.fit(AugmentContext(features=feats, labels=labels, class_counts=torch.tensor([3, 2, 1]), head_classes=[0]))
    out, out_labels = augment_rows(noise, feats, labels, reps=3, generator=torch.Generator().manual_seed(0))
    assert out_labels.tolist() == [1, 1, 2] * 3  # head class 0 is never augmented
    assert not any(torch.equal(row, f) for row in out for f in feats)


def test_confusion_matrix_refuses_a_non_square_matrix(tmp_path):
    from tailaug.errors import DataError

    with pytest.raises(DataError, match=r"confusion must be a square \[C, C\] matrix of counts, got shape \(2, 3\)"):
        plot_confusion([[1, 2, 3], [4, 5, 6]], tmp_path / "c.png")
    assert is_png(plot_confusion([[3, 1], [0, 0]], tmp_path / "c.png", class_names=["a", "b"]))


@pytest.mark.parametrize("with_augmenter", [False, True])
def test_decision_boundary_figure_from_a_feature_cache(tmp_path, with_augmenter):
    from tailaug.augment.base import AugmentContext, build_augmenter
    from tailaug.config import RetrainConfig
    from tailaug.evaluation.decision_boundary import decision_boundary_figure, nearest_classes

    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([60, 40, 20, 5])
    centres = torch.tensor([[4.0, 0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0, 0], [0, 0, 4.0, 0, 0, 0], [3.0, 3.0, 0, 0, 0, 0]])
    labels = torch.repeat_interleave(torch.arange(4), counts)
    cache = {"train_features": centres[labels] + torch.randn(len(labels), 6, generator=gen),
             "train_labels": labels, "class_counts": counts}
    # class 3 sits between classes 0 and 1: they are its nearest classes
    assert sorted(nearest_classes(cache["train_features"], labels, 3, 4, 2)) == [0, 1]
    augmenter = None
    if with_augmenter:
        augmenter = build_augmenter({"name": "noise", "std": 0.5})
        augmenter.fit(AugmentContext(features=cache["train_features"], labels=labels, class_counts=counts,
                                     head_classes=[0, 1]))
    path = decision_boundary_figure(cache, augmenter, "noise" if with_augmenter else None, 3,
                                    RetrainConfig(epochs=3), tmp_path / "db.png", seed=0, grid=50,
                                    min_steps=50)
    assert is_png(path)
