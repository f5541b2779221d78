"""Each kind of bad input ends with a short error (exit 2, no traceback) and destroys nothing."""

import numpy as np
import pytest
from PIL import Image

from tailaug.cli import main

from synthetic import class_images, write_fashion_mnist

CONFIG = "configs/fmnist_lt/demo.yaml"
QUICK = ["train.epochs=1", "train.batch_size=16", "model.arch=resnet20", "train.precision=fp32",
         "data.num_workers=0", "--no-progress"]


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("tailaug: error:")
    return err


EARLIER = '{"schema": 1, "rows": {"stage 1": {"metrics": {"top1": 1.0}}}}'


@pytest.fixture()
def out(tmp_path):
    """A run directory holding earlier output that no failing command may touch."""
    earlier = tmp_path / "runs" / "fmnist_lt_demo"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text(EARLIER)
    yield tmp_path / "runs"
    assert (earlier / "results.json").read_text() == EARLIER
    assert {p.name for p in earlier.iterdir()} <= {"results.json", ".lock"}


def test_config_typo_names_the_closest_key(capsys, out):
    err = run_cli(capsys, "train", CONFIG, "train.epchs=5", f"run.output_dir={out}")
    assert "unknown key 'train.epchs'" in err and "did you mean 'train.epochs'" in err


def test_imbalance_factor_below_one(capsys, out):
    err = run_cli(capsys, "datasets", "describe", CONFIG, "data.imbalance_factor=0.5")
    assert "data.imbalance_factor = 0.5" in err and "greater than or equal to 1" in err


def test_missing_dataset_directory(capsys, out, tmp_path):
    err = run_cli(capsys, "train", CONFIG, "data.dataset=cifar10", f"data.root={tmp_path / 'nowhere'}",
                  f"run.output_dir={out}", *QUICK)
    assert "nowhere" in err and "data.download" in err


def test_class_left_with_no_samples(capsys, out):
    err = run_cli(capsys, "datasets", "describe", CONFIG, "data.profile=step", "data.n_max=50")
    assert "no samples" in err and "data.imbalance_factor" in err


def write_image_folder(root, *, corrupt=False):
    rng = np.random.default_rng(0)
    lines = []
    labels = np.repeat(np.arange(3), [12, 6, 3])
    for i, (img, c) in enumerate(zip(class_images(labels, rng, size=16, channels=3), labels)):
        path = root / "img" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(path)
        lines.append(f"img/{i}.png {c}")
    if corrupt:
        (root / "img" / "0.png").write_bytes(b"not an image")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("\n".join(lines[:6]) + "\n")
    return root


def folder_args(root, out):
    return [f"data.root={root}", "data.dataset=image_folder", "data.train_split=train.txt",
            "data.test_split=test.txt", "data.num_classes=3", "data.image_size=16",
            "model.in_channels=3", f"run.output_dir={out}", *QUICK]


def test_split_file_with_missing_image(capsys, out, tmp_path):
    root = write_image_folder(tmp_path / "folder")
    (root / "img" / "4.png").unlink()
    err = run_cli(capsys, "train", CONFIG, *folder_args(root, out))
    assert "line 5" in err and "4.png" in err


def test_split_file_label_out_of_range(capsys, out, tmp_path):
    root = write_image_folder(tmp_path / "folder")
    text = (root / "train.txt").read_text().replace("img/2.png 0", "img/2.png 7")
    (root / "train.txt").write_text(text)
    err = run_cli(capsys, "train", CONFIG, *folder_args(root, out))
    assert "line 3" in err and "7" in err


def test_corrupt_image_file(capsys, out, tmp_path):
    root = write_image_folder(tmp_path / "folder", corrupt=True)
    err = run_cli(capsys, "train", CONFIG, *folder_args(root, out))
    assert "0.png" in err


def test_image_folder_trains(capsys, tmp_path):
    root = write_image_folder(tmp_path / "folder")
    assert main(["train", CONFIG, *folder_args(root, tmp_path / "runs")]) == 0
    assert "stage 1 (last epoch)" in capsys.readouterr().out


def test_resume_from_missing_checkpoint(capsys, out, tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=20, per_class_test=4)
    err = run_cli(capsys, "train", CONFIG, f"data.root={data}", "data.n_max=20", "data.imbalance_factor=5",
                  "run.name=fresh", f"run.output_dir={out}", "--resume", *QUICK)
    assert "does not exist" in err and "without --resume" in err
    assert not (out / "fresh").exists()


def test_resume_from_truncated_checkpoint(capsys, out, tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=20, per_class_test=4)
    args = ["train", CONFIG, f"data.root={data}", "data.n_max=20", "data.imbalance_factor=5",
            "run.name=cut", f"run.output_dir={out}", *QUICK]
    assert main(args) == 0
    ckpt = out / "cut" / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in (out / "cut").iterdir() if p.is_file()}
    capsys.readouterr()
    err = run_cli(capsys, *args, "--resume")
    assert "truncated" in err and str(ckpt) in err
    assert {p.name: p.read_bytes() for p in (out / "cut").iterdir() if p.is_file()} == before


@pytest.mark.parametrize("name", ["../escape", "/tmp/tailaug-abs", "''", "a" * 300, '"a\\0b"', "a/b"])
def test_run_name_outside_output_dir_is_refused(capsys, out, name):
    before = sorted(p.name for p in out.iterdir())
    for command in ("train", "run"):
        err = run_cli(capsys, command, CONFIG, f"run.name={name}", f"run.output_dir={out}", *QUICK)
        assert "is not a plain directory name" in err and "run.name" in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert not (out.parent / "escape").exists()


def test_output_dir_that_cannot_hold_a_run(capsys, out, tmp_path):
    (tmp_path / "a_file").write_text("x")
    err = run_cli(capsys, "train", CONFIG, f"run.output_dir={tmp_path / 'a_file'}", *QUICK)
    assert "cannot create the run directory" in err and "run.output_dir" in err
    err = run_cli(capsys, "run", CONFIG, "run.output_dir=/proc/tailaug", *QUICK)
    assert "run directory" in err and "run.output_dir" in err
    err = run_cli(capsys, "train", CONFIG, f"run.output_dir={tmp_path}", "run.name=a_file", *QUICK)
    assert "exists and is not a directory" in err


def test_a_failed_command_on_a_new_name_leaves_no_directory(capsys, out, tmp_path):
    for command in ("train", "run"):
        run_cli(capsys, command, CONFIG, f"data.root={tmp_path / 'nowhere'}", "data.dataset=cifar10",
                "run.name=new", f"run.output_dir={out}", *QUICK)
        assert not (out / "new").exists()


@pytest.mark.parametrize("command, message", [
    ("train", "tailaug: interrupted; the last finished epoch's checkpoint is kept: add --resume"),
    ("run", "tailaug: interrupted; finished stages and the last finished epoch are kept: run the same "
            "command again"),
    ("evaluate", "tailaug: interrupted\n"),
    ("analyze", "tailaug: interrupted\n"),
])
def test_interrupted_commands_suggest_only_what_applies(capsys, monkeypatch, command, message):
    from tailaug import commands

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    for name in ("train", "run", "evaluate", "analyze_stg"):
        monkeypatch.setattr(commands, name, interrupted)
    argv = {"train": ["train", CONFIG], "run": ["run", CONFIG], "evaluate": ["evaluate", "runs/x"],
            "analyze": ["analyze", "stg", "runs/x"]}[command]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith(message)
    if command != "train":
        assert "--resume" not in err


def test_debug_shows_the_traceback(out):
    from tailaug.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", CONFIG, "train.epchs=5", f"run.output_dir={out}"])
