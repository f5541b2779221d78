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
    assert all(r["top1"] > 40 for r in results.values())  # chance: 10%
    assert len(list((run_dir / "features").glob("*.safetensors"))) == 1
    assert len(list((run_dir / "generator").glob("*.safetensors"))) == 1


def test_every_atomically_written_output_is_0644(finished_run):
    # atomic_write promises 0644; safetensors' save_file used to leave the caches 0600
    run_dir = finished_run[0]
    written = [p for p in run_dir.rglob("*") if p.suffix in (".pt", ".safetensors", ".json", ".yaml")]
    assert {p.parent.name for p in written} >= {"checkpoints", "features", "generator", "retrain", "pipe"}
    assert {str(p.relative_to(run_dir)): oct(p.stat().st_mode & 0o777) for p in written} == \
        {str(p.relative_to(run_dir)): oct(0o644) for p in written}


def _cache(val: bool) -> dict:
    import torch

    splits = {"train": ("features", "labels", "index"), "test": ("features", "labels", "logits")}
    if val:
        splits["val"] = ("features", "labels", "logits")
    cache = {f"{s}_{e}": torch.zeros(6, 4) for s, entries in splits.items() for e in entries}
    return {**cache, "class_counts": torch.ones(3), "head_weight": torch.zeros(3, 4), "head_bias": torch.zeros(3)}


@pytest.mark.parametrize(
    "val, damage, problem",
    [
        (False, lambda c: c.pop("train_index"), "lacks train_index"),
        (True, lambda c: c.pop("val_logits"), "lacks val_logits"),
        (False, lambda c: c.update(test_labels=c["test_labels"][:5]), "the test_* entries disagree in length [5, 6]"),
    ],
)
def test_a_damaged_feature_cache_is_refused(tmp_path, val, damage, problem):
    from safetensors.torch import save_file

    from tailaug.errors import CheckpointError
    from tailaug.stages.features import load_cache

    path = tmp_path / "c.safetensors"
    cache = _cache(val)
    save_file(cache, path)
    assert load_cache(path).keys() == cache.keys()
    damage(cache)
    save_file(cache, path)
    with pytest.raises(CheckpointError) as info:
        load_cache(path)
    assert problem in str(info.value) and str(info.value).endswith(f"delete {path} and rerun: the features are "
                                                                   "extracted again from the stage-1 checkpoint")


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
