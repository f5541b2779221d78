"""Each kind of bad input ends with a short error (exit 2, no traceback) and destroys nothing."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tailaug.cli import main

from synthetic import class_images, write_fashion_mnist, write_idx

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


def test_bad_class_order_names_the_problem(capsys, out):
    err = run_cli(capsys, "datasets", "describe", CONFIG, "data.class_order=[1, 8, 9, 5, 7, 3, 0, 2, 4, 4]")
    assert "data.class_order = [1, 8, 9, 5, 7, 3, 0, 2, 4, 4]: lists class 4 more than once; leaves out class 6" in err


def test_describe_prints_the_counts_and_names_of_a_class_order(capsys):
    assert main(["datasets", "describe", "configs/fmnist_lt/ce.yaml",
                 "data.class_order=[1, 8, 9, 5, 7, 3, 0, 2, 4, 6]"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "class order [1, 8, 9, 5, 7, 3, 0, 2, 4, 6] (profile count i goes to class class_order[i])"
    rows = {int(line.split()[0]): line for line in out[3:13]}
    assert rows[1].split() == ["1", "Trouser", "6,000", "many"]
    assert rows[4].split() == ["4", "Coat", "100", "medium"]
    assert rows[6].split() == ["6", "Shirt", "60", "medium"]
    assert rows[0].split() == ["0", "T-shirt/top", "278", "many"]
    assert out[13].startswith("total 14,886 training images")


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
    # only last.pt exists: no advice to fall back on "the previous epoch's file"
    assert HONEST_FIX in err and "previous epoch" not in err
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
    ("train", "tailaug: interrupted; the last checkpoint (an epoch's end, or train.checkpoint_every_steps "
              "within one) is kept: add --resume"),
    ("run", "tailaug: interrupted; finished stages and the last stage-1 checkpoint are kept: run the same "
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


# --------------------------------------------------------------------------- data that does not fit


def fm_args(data, out, name="bad"):
    return ["train", CONFIG, f"data.root={data}", "data.n_max=20", "data.imbalance_factor=5",
            f"run.name={name}", f"run.output_dir={out}", *QUICK]


def test_model_in_channels_must_match_the_data(capsys, out, tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=20, per_class_test=4)
    err = run_cli(capsys, *fm_args(data, out), "model.in_channels=3")
    assert err == ("tailaug: error: model.in_channels is 3 but the dataset's images have 1 channel(s); set "
                   "model.in_channels=1 or remove it (it defaults to the dataset's)\n")
    assert not (out / "bad" / "checkpoints").exists()


def test_test_per_class_beyond_the_test_set_names_its_key(capsys, out, tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=20, per_class_test=4)
    err = run_cli(capsys, *fm_args(data, out), "data.test_per_class=5")
    assert "data.test_per_class is 5 but class 0 has only 4 test images" in err
    assert "at most 4" in err and "data.n_max" not in err


def test_train_and_test_images_of_different_shapes(capsys, out, tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=20, per_class_test=4)
    labels = np.repeat(np.arange(10), 20).astype(np.uint8)
    write_idx(data / "train-images-idx3-ubyte.gz", class_images(labels, np.random.default_rng(0), size=32)[:, 0])
    write_idx(data / "train-labels-idx1-ubyte.gz", labels)
    err = run_cli(capsys, *fm_args(data, out))
    assert f"the fashion_mnist files under {data}: the training images are 1x32x32 but the test images 1x28x28" in err
    assert not (out / "bad" / "checkpoints").exists()


def test_empty_test_set_fails_before_training(capsys, out, tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", per_class_train=20, per_class_test=4)
    write_idx(data / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    err = run_cli(capsys, *fm_args(data, out))
    assert f"the fashion_mnist files under {data} hold no test images" in err
    assert not (out / "bad" / "checkpoints").exists()


# --------------------------------------------------------------------------- damaged files of a finished run

NO_AUG = ["retrain.epochs=1", "retrain.augmenter={name: none}", "data.n_max=20", "data.imbalance_factor=5"]


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    """A finished `tailaug run` (stage 1, feature cache, cRT) to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    data = write_fashion_mnist(root / "fm", per_class_train=20, per_class_test=4)
    assert main(["run", CONFIG, f"data.root={data}", f"run.output_dir={root / 'runs'}", "run.name=done",
                 *NO_AUG, *QUICK]) == 0
    return root / "runs" / "done", data


@pytest.fixture()
def damaged(template_run, tmp_path, capsys):
    """(run dir, `train`/`run` arguments) of a fresh copy of the finished run under tmp_path."""
    from tailaug.config import load_config

    template, data = template_run
    run_dir = tmp_path / "runs" / "done"
    shutil.copytree(template, run_dir)
    # the copy's config names its own output_dir, so re-running it rewrites config.yaml byte for byte
    saved = load_config(run_dir / "config.yaml", [f"run.output_dir={tmp_path / 'runs'}"]).to_yaml()
    (run_dir / "config.yaml").write_text(saved)
    capsys.readouterr()
    args = [CONFIG, f"data.root={data}", f"run.output_dir={tmp_path / 'runs'}", "run.name=done", *NO_AUG, *QUICK]
    return run_dir, args


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def fails_and_changes_nothing(capsys, run_dir, *args):
    before = snapshot(run_dir)
    err = run_cli(capsys, *args)
    assert snapshot(run_dir) == before
    return err


HONEST_FIX = "tailaug keeps only the last epoch's checkpoint, so there is no earlier one to resume or evaluate from"


def test_resume_from_an_empty_checkpoint(capsys, damaged):
    run_dir, args = damaged
    ckpt = run_dir / "checkpoints" / "last.pt"
    ckpt.write_bytes(b"")
    for command in (["train", *args, "--resume"], ["evaluate", str(run_dir)]):
        err = fails_and_changes_nothing(capsys, run_dir, *command)
        assert err.startswith(f"tailaug: error: checkpoint {ckpt} cannot be read (EOFError); it is truncated")
        assert HONEST_FIX in err and f"delete {run_dir} and rerun" in err


def _rewrite_checkpoint(path, change):
    import torch

    torch.save(change(torch.load(path, weights_only=True)), path)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda c: {"epoch": c["epoch"]}, "is not a tailaug stage-1 checkpoint (a dict without key, model, "
                                          "optimizer, scaler, best)"),
        (lambda c: [1, 2], "is not a tailaug stage-1 checkpoint (a list without epoch, key, model"),
        (lambda c: {**c, "model": {**c["model"], "head.weight": c["model"]["head.weight"][:3]}},
         "the Network state in {ckpt} does not fit (RuntimeError: Error(s) in loading state_dict for Network: "
         "size mismatch for head.weight"),
    ],
    ids=["dict-without-model", "list", "wrong-shape"],
)
def test_checkpoint_with_the_wrong_content(capsys, damaged, change, problem):
    run_dir, args = damaged
    ckpt = run_dir / "checkpoints" / "last.pt"
    _rewrite_checkpoint(ckpt, change)
    err = fails_and_changes_nothing(capsys, run_dir, "evaluate", str(run_dir))
    assert problem.format(ckpt=ckpt) in err and HONEST_FIX in err
    (run_dir / "stage1.json").unlink()  # a run stopped before its end: --resume reads the checkpoint
    err = fails_and_changes_nothing(capsys, run_dir, "train", *args, "--resume")
    assert problem.format(ckpt=ckpt) in err and HONEST_FIX in err


def test_corrupt_stage1_json_then_its_fix(capsys, damaged):
    run_dir, args = damaged
    done = run_dir / "stage1.json"
    done.write_text('{"key": "3f0')
    err = fails_and_changes_nothing(capsys, run_dir, "run", *args)
    assert err.startswith(f"tailaug: error: {done} cannot be read as JSON (JSONDecodeError: ")
    assert "delete it and rerun 'tailaug run' or 'tailaug train --resume'" in err
    # following the advice finishes stage 1 from the checkpoint without training an epoch again
    metrics = (run_dir / "metrics.jsonl").read_text()
    done.unlink()
    assert main(["run", *args]) == 0
    assert "stage 1: resuming" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == metrics and done.is_file()


def test_corrupt_retrain_json(capsys, damaged):
    run_dir, args = damaged
    [saved] = (run_dir / "retrain").glob("*.json")
    saved.write_text('{"label": "cRT", "test": {"top1": 1')
    err = fails_and_changes_nothing(capsys, run_dir, "run", *args)
    assert err.startswith(f"tailaug: error: {saved} cannot be read as JSON")
    assert err.endswith("; delete it and its .safetensors to train this stage-3 classifier again\n")


def test_feature_cache_missing_a_key(capsys, damaged):
    from safetensors.torch import load_file, save_file

    run_dir, args = damaged
    [cache] = (run_dir / "features").glob("*/entries.safetensors")  # the cache's non-row entries
    tensors = load_file(cache)
    del tensors["test_labels"], tensors["head_bias"]
    save_file(tensors, cache)
    index = json.loads((cache.parent / "index.json").read_text())
    index["tensors"]["bytes"] = cache.stat().st_size  # else the size check reports the rewrite first
    (cache.parent / "index.json").write_text(json.dumps(index))
    err = fails_and_changes_nothing(capsys, run_dir, "run", *args)
    assert err == (f"tailaug: error: feature cache {cache.parent} lacks head_bias, test_labels; delete the "
                   f"directory {cache.parent} and rerun: the features are extracted again from the stage-1 "
                   "checkpoint\n")


def test_resume_after_a_partial_metrics_line(capsys, damaged):
    # kill -9 while appending to metrics.jsonl leaves half a line; --resume drops it and keeps the rest
    run_dir, args = damaged
    (run_dir / "stage1.json").unlink()  # killed before stage 1 was marked finished
    metrics = run_dir / "metrics.jsonl"
    complete = metrics.read_text()
    metrics.write_text(complete + '{"epoch": 1, "train_lo')
    assert main(["train", *args, "--resume"]) == 0
    assert metrics.read_text() == complete


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"tailaug {version('tailaug')}\n"


def test_help_says_what_the_tool_does(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.startswith("tailaug trains and evaluates long-tailed image classifiers")
    assert "``" not in out
