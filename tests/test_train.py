"""Stage-1 training end to end on a tiny synthetic Fashion-MNIST: learning, determinism, resume."""

import json

import pytest
import torch

from tailaug import commands
from tailaug.cli import main
from tailaug.config import load_config
from tailaug.evaluation.results import code_version
from tailaug.stages.representation import Trainer

from synthetic import write_fashion_mnist

TINY = [
    "data.n_max=100", "data.imbalance_factor=10", "data.num_workers=0",
    "model.arch=resnet20", "train.epochs=8", "train.batch_size=32", "train.warmup_epochs=1",
    "train.lr=0.05", "train.mixup_alpha=0", "train.schedule=cosine", "train.precision=fp32",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # 100 per class before the profile: IF 10 leaves 100..10 images per class
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), per_class_train=100)


def tiny_args(data_root, out, name="tiny", extra=()):
    return ["configs/fmnist_lt/demo.yaml", *TINY, f"data.root={data_root}",
            f"run.output_dir={out}", f"run.name={name}", *extra]


def train(data_root, out, name="tiny", extra=(), resume=False):
    args = tiny_args(data_root, out, name, extra)
    return commands.train(args[0], args[1:], resume=resume, progress=False)


def test_tiny_run_learns_and_leaves_a_complete_run_dir(data_root, tmp_path):
    results = train(data_root, tmp_path)
    assert results["top1"] > 50  # chance is 10%
    run = tmp_path / "tiny"
    for name in ("config.yaml", "checkpoints/last.pt", "metrics.jsonl", "results.json", "stage1.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(8))
    saved = json.loads((run / "results.json").read_text())
    assert saved["schema"] == 1 and list(saved["rows"]) == ["stage 1"]
    row = saved["rows"]["stage 1"]
    assert row["metrics"]["top1"] == results["top1"]
    assert row["metrics"]["groups"] == {"many": 0, "medium": 7, "few": 3}
    assert row["key"] == json.loads((run / "stage1.json").read_text())["key"]
    assert row["eval"] == {"shots": {"many": 100, "few": 20}, "ece_bins": 15, "logit_adjust_tau": 0.0}
    assert row["choices"] == {"epoch": 7, "precision": "fp32"}
    assert row["tailaug_version"] == code_version() != "unknown"
    assert load_config(run / "config.yaml").data.root == str(data_root)


def test_same_seed_same_numbers_and_resume_is_exact(data_root, tmp_path, monkeypatch):
    first = train(data_root, tmp_path, "a")
    second = train(data_root, tmp_path, "b")
    assert first["top1"] == second["top1"] and first["per_class"] == second["per_class"]
    assert first["ece"] == second["ece"]

    real_epoch = Trainer.train_epoch

    def crash_in_epoch_2(self, epoch):
        if epoch == 5:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(data_root, tmp_path, "c")
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    assert torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 4
    # fields outside the stage-1 key may change on resume
    resumed = train(data_root, tmp_path, "c", extra=["train.eval_batch_size=64", "data.shots.many=90"], resume=True)
    assert resumed["per_class"] == first["per_class"] and resumed["ece"] == first["ece"]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(8))


def test_mixup_and_evaluate_command(data_root, tmp_path, capsys):
    train(data_root, tmp_path, "mix", extra=["train.mixup_alpha=1.0", "train.epochs=2"])
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "mix")]) == 0
    out = capsys.readouterr().out
    assert "top1" in out and "stage 1 (last epoch)" in out


def test_training_refuses_to_overwrite_a_run(data_root, tmp_path, capsys):
    train(data_root, tmp_path, "once", extra=["train.epochs=1"])
    before = (tmp_path / "once" / "checkpoints" / "last.pt").read_bytes()
    assert main(["train", *tiny_args(data_root, tmp_path, "once"), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "once" / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("extra", [
    ['train.loss=[{name: ldam, weight: 0.1}, {name: supcon, weight: 0.9}]', "model.head=cosine"],
    ["train.loss=[{name: arcface, margin: 0.2, scale: 16}]", "model.head=cosine",
     "train.sampler.kind=class_balanced"],
])
def test_two_view_and_margin_losses_train(data_root, tmp_path, extra):
    results = train(data_root, tmp_path, "loss", extra=[*extra, "train.epochs=6"])
    assert results["top1"] > 30  # chance: 10%


@pytest.mark.parametrize("loss", ["[{name: arcface}]", "[{name: ce}, {name: ldam, weight: 0.5}]"])
def test_margin_loss_needs_a_cosine_head(data_root, tmp_path, loss):
    from tailaug.errors import ConfigError

    name = "arcface" if "arcface" in loss else "ldam"
    with pytest.raises(ConfigError, match=f"margin loss\\(es\\) {name} in train.loss .*set model.head: cosine"):
        train(data_root, tmp_path, "margin", extra=[f"train.loss={loss}"])


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_refused_resume_and_finished_resume_change_nothing(data_root, tmp_path, capsys):
    from tailaug.evaluation.results import record_results, result_row

    train(data_root, tmp_path, "done", extra=["train.epochs=1"])
    run = tmp_path / "done"
    record_results(run, {"cRT": result_row({"top1": 1.0}, key="k", settings={})})  # a stage-3 row
    before = snapshot(run)
    args = ["train", *tiny_args(data_root, tmp_path, "done", ["train.epochs=1"]), "--no-progress", "--resume"]
    assert main([*args, "train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "trained with another train.lr" in err and str(run / "config.yaml") in err
    assert snapshot(run) == before
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has finished all 1 epochs: nothing to resume" in err and "tailaug evaluate" in err
    assert snapshot(run) == before
    assert main(["evaluate", str(run)]) == 0
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert list(rows) == ["stage 1", "cRT"] and rows["cRT"]["metrics"] == {"top1": 1.0}


def test_evaluate_needs_a_finished_stage1(data_root, tmp_path, capsys, monkeypatch):
    real_epoch = Trainer.train_epoch

    def stop_after_first(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(data_root, tmp_path, "half", extra=["train.epochs=2"])
    run = tmp_path / "half"
    before = snapshot(run)
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has not finished" in err and "--resume" in err
    assert snapshot(run) == before


def test_a_non_finite_training_loss_is_a_clear_error_and_saves_nothing(data_root, tmp_path):
    from tailaug.errors import TailaugError

    with pytest.raises(TailaugError, match=r"training loss became nan \(not finite\) by step 11 of epoch 1"):
        train(data_root, tmp_path, "diverged", extra=["train.lr=1e30", "train.warmup_epochs=0", "train.epochs=1"])
    assert not (tmp_path / "diverged" / "checkpoints" / "last.pt").exists()
