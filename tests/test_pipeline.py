"""`tailaug run` and `tailaug analyze stg` end to end on a tiny synthetic Fashion-MNIST."""

import json

import pytest
import torch

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


def rows(run_dir):
    return json.loads((run_dir / "results.json").read_text())["rows"]


def test_run_prints_three_rows_and_saves_them(finished_run):
    run_dir, _, results = finished_run
    assert list(results) == ["stage 1", "cRT", "cRT + STG (lambda 1.5)"]
    saved = rows(run_dir)
    assert saved.keys() == results.keys()
    assert all(saved[label]["metrics"] == results[label] for label in results)
    # chance is 10%; 3 epochs on 403 images land anywhere in 20-55%, depending on the CPU's kernels
    assert all(r["top1"] > 15 for r in results.values())
    assert saved["cRT"]["choices"] == {"seed": 0}
    assert saved["stage 1"]["key"] == json.loads((run_dir / "stage1.json").read_text())["key"]
    assert len(list((run_dir / "features").glob("*/index.json"))) == 1
    assert len(list((run_dir / "generator").glob("*.safetensors"))) == 1


def test_every_atomically_written_output_is_0644(finished_run):
    # atomic_write promises 0644; safetensors' save_file used to leave the caches 0600
    run_dir = finished_run[0]
    written = [p for p in run_dir.rglob("*") if p.suffix in (".pt", ".safetensors", ".json", ".yaml", ".npy")]
    where = {p.relative_to(run_dir).parts[0] if p.parent != run_dir else "pipe" for p in written}
    assert where >= {"checkpoints", "features", "generator", "retrain", "pipe"}
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
    row = next(line for line in capsys.readouterr().out.splitlines() if "most similar head class" in line)
    assert row.split("|")[2:-1] == [f" {c} " for c in report["most_similar_head_class"]]  # the classes, not "-"


def test_run_refuses_a_run_dir_of_another_stage1_config(finished_run, capsys):
    run_dir, args, _ = finished_run
    before = snapshot(run_dir)
    assert main(["run", *args, "train.lr=0.01", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained with another train.lr" in err and str(run_dir / "config.yaml") in err
    assert snapshot(run_dir) == before


def snapshot(run_dir):
    """Every file of the run directory and its bytes (the lock file aside)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def forbid_training(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a stage trained again")

    for module, name in ((pipeline, "train_stage1"), (pipeline, "train_generator"),
                         (pipeline, "retrain_classifier")):
        monkeypatch.setattr(module, name, forbidden)


def test_report_only_fields_keep_every_trained_stage(finished_run, monkeypatch):
    """data.shots, eval.*, num_workers-like fields change the report, never a model: stage 3's
    stored test logits are scored again with the new settings."""
    run_dir, args, results = finished_run
    forbid_training(monkeypatch)
    again = commands.run(args[0], [*args[1:], "data.shots.many=50", "eval.ece_bins=5",
                                   "train.eval_batch_size=64", "features.batch_size=64"], progress=False)
    # class counts 100 77 59 46 35 27 21 16 12 10: many (> 50) 3, few (< 20) 3, medium 4
    assert all(r["groups"] == {"many": 3, "medium": 4, "few": 3} for r in again.values())
    assert all(again[k]["top1"] == results[k]["top1"] for k in results)
    assert again["cRT"]["ece"] != results["cRT"]["ece"]  # 5 bins instead of 15
    saved = rows(run_dir)
    assert saved["cRT"]["eval"] == {"shots": {"many": 50, "few": 20}, "ece_bins": 5, "logit_adjust_tau": 0.0}
    assert "many: 50" in (run_dir / "config.yaml").read_text()
    commands.run(args[0], args[1:], progress=False)  # back to the fixture's settings


def test_evaluate_merges_its_stage1_row_and_accepts_report_overrides(finished_run, capsys):
    run_dir, args, results = finished_run
    before = rows(run_dir)
    assert main(["evaluate", str(run_dir), "data.shots.many=50"]) == 0
    after = rows(run_dir)
    assert after.keys() == before.keys()  # the stage-3 rows are kept
    assert all(after[k] == before[k] for k in after if k != "stage 1")
    assert after["stage 1"]["metrics"]["groups"] == {"many": 3, "medium": 4, "few": 3}
    assert after["stage 1"]["metrics"]["top1"] == results["stage 1"]["top1"]
    assert after["stage 1"]["choices"] == {"epoch": 2, "precision": "fp32"}
    assert "stage 1 (last epoch)" in capsys.readouterr().out
    commands.run(args[0], args[1:], progress=False)


@pytest.mark.parametrize("override, named", [
    ("model.arch=resnet32", "model.arch"),
    ("data.imbalance_factor=20", "data.imbalance_factor"),
    ("train.lr=0.2", "train.lr"),
])
def test_evaluate_refuses_overrides_that_change_the_model(finished_run, capsys, override, named):
    run_dir, _, _ = finished_run
    before = snapshot(run_dir)
    assert main(["evaluate", str(run_dir), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tailaug: error:") and "Traceback" not in err
    assert f"change the stage-1 model ({named})" in err and "data.shots" in err
    assert snapshot(run_dir) == before


def test_failing_later_stage_changes_nothing(finished_run, capsys):
    run_dir, args, _ = finished_run
    before = snapshot(run_dir)
    # no class has more than 1000 images: the generator has no head class to learn from
    assert main(["run", *args, "stg.head.rule=threshold", "stg.head.threshold=1000", "--no-progress"]) == 2
    assert "stg.head.threshold" in capsys.readouterr().err
    assert snapshot(run_dir) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_cuda_changes_nothing(finished_run, capsys):
    run_dir, args, _ = finished_run
    before = snapshot(run_dir)
    assert main(["run", *args, "run.device=cuda", "--no-progress"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "run.device=cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert snapshot(run_dir) == before
    assert main(["evaluate", str(run_dir)]) == 0


def test_run_resume_continues_an_existing_run_and_refuses_a_new_name(finished_run, capsys, monkeypatch):
    run_dir, args, _ = finished_run
    forbid_training(monkeypatch)
    assert main(["run", *args, "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["run", *args, "run.name=typo", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds no stage 1 of this config to resume" in err and "drop --resume" in err
    assert not (run_dir.parent / "typo").exists()


def test_a_second_command_on_a_busy_run_dir_fails_at_once(finished_run, capsys):
    import os

    from tailaug.engine.rundir import open_run_dir

    run_dir, args, _ = finished_run
    before = snapshot(run_dir)
    with open_run_dir(run_dir, create=False):
        for argv in (["run", *args, "--no-progress"], ["evaluate", str(run_dir)], ["analyze", "stg", str(run_dir)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"is in use by another tailaug command (process {os.getpid()})" in err
    assert snapshot(run_dir) == before
    assert main(["evaluate", str(run_dir)]) == 0  # released


def test_evaluate_refuses_a_saved_config_that_no_longer_matches_the_model(finished_run, capsys):
    run_dir, _, _ = finished_run
    config = run_dir / "config.yaml"
    saved = config.read_text()
    config.write_text(saved.replace("lr: 0.05", "lr: 0.07", 1))  # hand-edited after training
    try:
        before = snapshot(run_dir)
        assert main(["evaluate", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert "was trained with other stage-1 settings than" in err and "was it edited after training?" in err
        assert snapshot(run_dir) == before
    finally:
        config.write_text(saved)


def test_stage1_is_loaded_without_building_a_trainer(finished_run, monkeypatch, tmp_path):
    """The feature cache and evaluate load the finished model: no Trainer, no global reseed,
    and the same features as before."""
    from tailaug.stages import representation
    from tailaug.stages.feature_cache import dense_cache, load_cache

    run_dir, args, _ = finished_run
    monkeypatch.setattr(representation.Trainer, "__init__", lambda *a, **k: pytest.fail("built a Trainer"))
    monkeypatch.setattr(representation, "seed_everything", lambda *a: pytest.fail("reseeded"))
    forbid_training(monkeypatch)
    [cache] = (run_dir / "features").glob("*/index.json")
    moved = cache.parent.rename(tmp_path / cache.parent.name)
    again = commands.run(args[0], args[1:], progress=False)
    old, new = dense_cache(load_cache(moved)), dense_cache(load_cache(cache.parent))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert commands.evaluate(run_dir)["top1"] == again["stage 1"]["top1"]


def synthetic_cache(with_val=True):
    """Three classes of 4-d features around the axes; a stage-1 head that favours class 0."""
    g = torch.Generator().manual_seed(0)
    means = torch.eye(3, 4) * 3

    def split(n):
        labels = torch.arange(3).repeat_interleave(n)
        return means[labels] + torch.randn(len(labels), 4, generator=g), labels

    train_x, train_y = split(10)
    cache = {"train_features": train_x, "train_labels": train_y, "train_index": torch.arange(30),
             "class_counts": torch.tensor([10, 10, 10]),
             "head_weight": means * torch.tensor([[3.0], [1.0], [0.5]]), "head_bias": torch.zeros(3)}
    cache["test_features"], cache["test_labels"] = split(20)
    if with_val:
        cache["val_features"], cache["val_labels"] = split(5)
    return cache


def test_tau_norm_records_the_tau_chosen_on_validation_and_its_scores(tmp_path, monkeypatch):
    from tailaug.augment.base import NoAugmenter
    from tailaug.config import load_config

    cfg = load_config(None, ["retrain.method=tau_norm"])
    label, row = pipeline.retrain(cfg, tmp_path, synthetic_cache(), NoAugmenter(), progress=False)
    choices = row["choices"]
    scores = choices["tau_scores"]
    assert label == "tau-norm" and choices["tau_from"] == "validation split"
    assert list(scores) == [f"{0.1 * i:.1f}" for i in range(21)]
    best = max(scores.values())
    assert choices["tau"] == min(float(t) for t, s in scores.items() if s == best)  # ties: the smaller tau
    assert scores["0.0"] < best  # the unnormalised head is worse: the choice mattered

    # reused: the stored logits are scored again (other bins), the choices read back
    monkeypatch.setattr(pipeline, "retrain_classifier", lambda *a, **k: pytest.fail("stage 3 ran again"))
    cfg5 = load_config(None, ["retrain.method=tau_norm", "eval.ece_bins=5"])
    _, again = pipeline.retrain(cfg5, tmp_path, synthetic_cache(), NoAugmenter(), progress=False)
    assert again["choices"] == choices and again["key"] == row["key"]
    assert again["metrics"]["top1"] == row["metrics"]["top1"] and again["eval"]["ece_bins"] == 5
    monkeypatch.undo()

    fixed = load_config(None, ["retrain.method=tau_norm", "retrain.tau=1.0"])
    _, given = pipeline.retrain(fixed, tmp_path, synthetic_cache(), NoAugmenter(), progress=False)
    assert given["choices"] == {"tau": 1.0, "tau_from": "retrain.tau", "tau_scores": None}
    _, default = pipeline.retrain(cfg, tmp_path / "noval", synthetic_cache(with_val=False), NoAugmenter(),
                                  progress=False)
    assert default["choices"] == {"tau": 1.0, "tau_from": "default (no validation split)", "tau_scores": None}


def test_stage3_plots_use_the_post_hoc_adjusted_logits_of_the_metrics(finished_run, monkeypatch):
    from tailaug.augment.base import NoAugmenter
    from tailaug.evaluation import plots
    from tailaug.stages.features import extract_features

    run_dir, _, _ = finished_run
    drawn = []
    monkeypatch.setattr(plots, "plot_reliability", lambda bins, path, **kw: drawn.append(bins))
    cfg = commands.load_run_config(run_dir, ["eval.logit_adjust_tau=1.0"])
    cache = extract_features(cfg, run_dir, progress=False)
    _, row = pipeline.retrain(cfg, run_dir, cache, NoAugmenter(), progress=False)
    assert len(drawn) == 1 and 100 * drawn[0]["ece"] == pytest.approx(row["metrics"]["ece"], rel=1e-12)


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
    pipeline.retrain(cfg, tmp_path, cache, NoAugmenter(), progress=False)
    assert seen["init_cosine_scale"] == 20.0 and seen["init_bias"] is None
    assert torch.equal(seen["init_weight"], cache["head_weight"])


class _Stop(Exception):
    pass


def test_stages_2_and_3_get_the_device_and_precision_of_the_run(finished_run, monkeypatch):
    run_dir, args, _ = finished_run
    gpu = torch.device("cuda", 0)  # this machine need not have one: the stages stop before using it
    monkeypatch.setattr(pipeline, "resolve_device", lambda name, local_rank=0: gpu)
    monkeypatch.setattr(pipeline, "resolve_precision", lambda precision, device: torch.bfloat16)
    seen = {}

    def spy(stage):
        def record(*a, device, dtype, **k):
            seen[stage] = (device, dtype)
            raise _Stop
        return record

    monkeypatch.setattr(pipeline, "train_generator", spy("stage 2"))
    monkeypatch.setattr(pipeline, "retrain_classifier", spy("stage 3"))
    saved = (run_dir / "config.yaml").read_text()
    try:
        for change in ("stg.epochs=2", "retrain.augmenter={name: noise, std: 0.7}"):  # each re-runs that stage
            with pytest.raises(_Stop):
                commands.run(args[0], [*args[1:], change], progress=False)
    finally:
        (run_dir / "config.yaml").write_text(saved)
    assert seen == {"stage 2": (gpu, torch.bfloat16), "stage 3": (gpu, torch.bfloat16)}


def test_under_torchrun_only_rank_0_runs_stages_2_and_3(finished_run, monkeypatch):
    from tailaug.engine import distributed

    run_dir, args, _ = finished_run
    before = snapshot(run_dir)
    monkeypatch.setattr(distributed, "init_distributed", lambda *a: distributed.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(pipeline, "extract_features", lambda *a, **k: pytest.fail("rank 1 ran stage 2"))
    cfg = commands.load_run_config(run_dir)
    assert pipeline.run_pipeline(cfg, run_dir, progress=False) == {}
    assert snapshot(run_dir) == before


def test_run_with_fsa_caches_spatial_maps_once_and_analyze_fsa_draws_the_split(finished_run, monkeypatch, capsys):
    run_dir, args, _ = finished_run
    monkeypatch.setattr(pipeline, "train_stage1", lambda *a, **k: pytest.fail("stage 1 ran again"))
    fsa = "retrain.augmenter={name: fsa, per_class: 20, confusing: 2}"
    results = commands.run(args[0], [*args[1:], fsa], progress=False)
    assert list(results) == ["stage 1", "cRT", "cRT + FSA (offline)"] and results["cRT + FSA (offline)"]["top1"] > 15
    [maps] = (run_dir / "spatial").glob("*.safetensors")
    assert f"spatial maps: cached (403, 64, 7, 7) bfloat16 in {maps}" in capsys.readouterr().out
    assert maps.stat().st_size > 403 * 64 * 49 * 2
    history = json.loads(next((run_dir / "retrain").glob("crt-fsa-*.json")).read_text())["history"]
    assert all(h["augment_s"] > 0 for h in history)
    commands.run(args[0], [*args[1:], fsa.replace("per_class: 20", "per_class: 10")], progress=False)
    assert "spatial maps: reusing" in capsys.readouterr().out
    assert main(["analyze", "fsa", str(run_dir)]) == 0
    report = json.loads((run_dir / "analysis" / "fsa_split.json").read_text())
    assert report["samples"] and all(s["donor_class"] in report["confusing_classes"][str(s["class"])]
                                     for s in report["samples"])
    assert (run_dir / "analysis" / "fsa_split.png").stat().st_size > 1000
