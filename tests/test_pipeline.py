"""`tailaug run` and `tailaug analyze stg` end to end on a tiny synthetic Fashion-MNIST."""

import json

import pytest

from tailaug import commands
from tailaug.cli import main
from tailaug.stages import classifier, pipeline

from synthetic import write_fashion_mnist

TINY = [
    "data.n_max=100", "data.imbalance_factor=10", "data.num_workers=0", "model.arch=resnet20",
    "train.epochs=3", "train.batch_size=32", "train.warmup_epochs=1", "train.lr=0.05",
    "train.mixup_alpha=0", "train.precision=fp32", "stg.head.rule=top_k", "stg.head.top_k=3",
    "stg.epochs=3", "stg.memory_size=64", "retrain.epochs=20", "retrain.augmenter={name: stg, lam: 1.5}",
    "features.views=1",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    data = write_fashion_mnist(root / "fm", per_class_train=100)
    args = ["configs/fmnist_lt/demo.yaml", *TINY, f"data.root={data}", f"run.output_dir={root / 'runs'}",
            "run.name=pipe"]
    results = commands.run(args[0], args[1:], progress=False)
    return root / "runs" / "pipe", args, results


def test_run_prints_three_rows_and_saves_them(finished_run):
    run_dir, _, results = finished_run
    assert list(results) == ["stage 1", "cRT", "cRT + STG (lambda 1.5)"]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved.keys() == results.keys()
    assert all(r["top1"] > 25 for r in results.values())  # chance: 10% (3 epochs on 14 images of the rarest class)
    assert len(list((run_dir / "features").glob("*.safetensors"))) == 1
    assert len(list((run_dir / "generator").glob("*.safetensors"))) == 1


def test_second_run_reuses_every_stage(finished_run, monkeypatch, capsys):
    run_dir, args, results = finished_run

    def forbidden(*a, **k):
        raise AssertionError("a finished stage ran again")

    for module, name in ((pipeline, "train_stage1"), (pipeline, "train_generator"),
                         (pipeline, "retrain_classifier"), (classifier, "retrain_classifier")):
        monkeypatch.setattr(module, name, forbidden)
    again = commands.run(args[0], args[1:], progress=False)
    assert again == results
    out = capsys.readouterr().out
    assert "stage 1: reusing" in out and "stage 2: reusing" in out


def test_changed_stage3_option_reruns_only_stage3(finished_run, monkeypatch):
    run_dir, args, _ = finished_run
    monkeypatch.setattr(pipeline, "train_stage1", lambda *a, **k: pytest.fail("stage 1 ran again"))
    monkeypatch.setattr(pipeline, "train_generator", lambda *a, **k: pytest.fail("stage 2 ran again"))
    results = commands.run(args[0], [*args[1:], "retrain.augmenter={name: noise, std: 0.5}"], progress=False)
    assert "cRT + noise (std 0.5)" in results


def test_analyze_stg_writes_table_and_tsne(finished_run, capsys):
    run_dir, _, _ = finished_run
    assert main(["analyze", "stg", str(run_dir)]) == 0
    report = json.loads((run_dir / "analysis" / "stg_kl.json").read_text())
    kl = report["kl"]
    assert len(kl) == 5 and all(kl[i][i] == pytest.approx(0, abs=1e-4) for i in range(5))
    assert all(kl[i][j] >= 0 for i in range(5) for j in range(5))
    assert set(report["most_similar_head_class"]) <= set(report["head_classes"])
    assert (run_dir / "analysis" / "stg_tsne.png").stat().st_size > 1000
    assert "most similar head class" in capsys.readouterr().out


def test_run_refuses_a_run_dir_of_another_stage1_config(finished_run, capsys):
    run_dir, args, _ = finished_run
    before = (run_dir / "config.yaml").read_text()
    assert main(["run", *args, "train.lr=0.01", "--no-progress"]) == 2
    assert "different data/model/train config" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == before


def test_stage3_plots_use_the_post_hoc_adjusted_logits_of_the_metrics(finished_run, monkeypatch):
    from tailaug.augment.base import NoAugmenter
    from tailaug.evaluation import plots
    from tailaug.stages.features import extract_features

    run_dir, _, _ = finished_run
    drawn = []
    monkeypatch.setattr(plots, "plot_reliability", lambda bins, path, **kw: drawn.append(bins))
    cfg = commands.load_run_config(run_dir, ["eval.logit_adjust_tau=1.0"])
    cache = extract_features(cfg, run_dir, progress=False)
    _, results = pipeline.retrain(cfg, run_dir, cache, NoAugmenter(), progress=False)
    assert len(drawn) == 1 and 100 * drawn[0]["ece"] == pytest.approx(results["ece"], rel=1e-12)


def test_stage3_gets_the_scoring_of_a_cosine_stage1_head(tmp_path, monkeypatch):
    import torch

    from tailaug.augment.base import NoAugmenter
    from tailaug.config import load_config

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(torch.tensor([40, 20, 10, 5]))
    cache = {"train_features": torch.randn(75, 6, generator=gen), "train_labels": labels,
             "class_counts": torch.tensor([40, 20, 10, 5]), "head_weight": torch.randn(4, 6, generator=gen),
             "head_bias": torch.zeros(4), "test_features": torch.randn(8, 6, generator=gen),
             "test_labels": torch.arange(4).repeat(2)}
    cfg = load_config(None, ["model.head=cosine", "model.cosine_scale=20", "retrain.method=lws", "retrain.epochs=1"])
    seen = {}
    real = pipeline.retrain_classifier

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "retrain_classifier", spy)
    monkeypatch.setattr(pipeline, "features_key", lambda cfg: "k")
    pipeline.retrain(cfg, tmp_path, cache, NoAugmenter(), progress=False)
    assert seen["init_cosine_scale"] == 20.0 and seen["init_bias"] is None
    assert torch.equal(seen["init_weight"], cache["head_weight"])
