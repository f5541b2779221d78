"""A new user's path: an image folder -> `tailaug run` -> `tailaug predict` / `tailaug.load`."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
import yaml

import tailaug
from tailaug.cli import main
from tailaug.config import RetrainConfig, load_config
from tailaug.data.image_folders import folder_splits
from tailaug.engine.checkpoint import load_tensors
from tailaug.errors import CheckpointError, DataError, TailaugError
from tailaug.stages.classifier import retrain_classifier
from tailaug.stages.features import cache_path, load_cache
from tailaug.stages.stored_head import head_tensors, load_head

from synthetic import write_class_folders

CONFIG = "configs/images/efficientnet_lite0.yaml"
# the shipped config, on a ResNet-20 from scratch so that the test needs no pretrained weights
TINY = ["data.image_size=28", "model.arch=resnet20", "model.name=", "model.weights=", "model.mode=finetune",
        "train.epochs=10", "train.batch_size=16", "train.lr=0.05", "data.flip=false", "train.precision=fp32", "data.num_workers=0",
        "stg.epochs=2", "stg.head.rule=top_k", "stg.head.top_k=1", "retrain.epochs=10", "--no-progress"]
NAMES = ["cat", "dog", "emu"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    images = write_class_folders(root / "my_images", {"cat": 60, "dog": 30, "emu": 16}, size=28)
    args = [CONFIG, f"data.root={images}", f"run.output_dir={root / 'runs'}", *TINY]
    assert main(["run", *args]) == 0
    return root / "runs" / "my_images", images


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_writes_the_classes_of_every_image(finished, tmp_path, capsys):
    run_dir, images = finished
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(images / "emu"), str(images / "cat" / "000.png"), "--top-k", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err.startswith("classifier: cRT + STG (lambda 1.5) (final); 17 image(s)")
    rows = read_csv(out)
    assert len(rows) == 17 and rows[-1]["input"] == str(images / "cat" / "000.png")
    assert list(rows[0]) == ["input", "class", "probability", "classifier", "top1_class", "top1_probability",
                             "top2_class", "top2_probability"]
    for row in rows:
        assert row["class"] == row["top1_class"] and row["class"] in NAMES and row["top2_class"] != row["class"]
        assert 1 >= float(row["probability"]) >= float(row["top2_probability"]) > 0
        assert row["classifier"] == "cRT + STG (lambda 1.5)"


def test_predictions_beat_chance_on_the_held_out_test_images(finished, tmp_path):
    run_dir, images = finished
    cfg = load_config(run_dir / "config.yaml")
    paths, labels = folder_splits(cfg.data).test
    model = tailaug.load(run_dir)
    probs = model.predict_files(paths)
    assert probs.shape == (30, 3) and torch.allclose(probs.sum(1), torch.ones(30))
    assert (probs.argmax(1).numpy() == labels).mean() > 0.6  # chance: 1/3 (this CPU: 1.0)


@pytest.mark.parametrize("choice, label", [("crt", "cRT"), ("augmented", "cRT + STG (lambda 1.5)"),
                                           ("final", "cRT + STG (lambda 1.5)"), ("stage1", "stage 1")])
def test_load_gives_the_logits_the_run_scored(finished, choice, label):
    run_dir, _ = finished
    cfg = load_config(run_dir / "config.yaml")
    paths = folder_splits(cfg.data).test[0]
    model = tailaug.load(run_dir, choice)
    assert model.classifier == label and model.class_names == NAMES
    assert isinstance(model, torch.nn.Module) and not model.training
    with torch.no_grad():
        logits = model(model.preprocess(model.read(paths)))
        from_features = model.features_to_logits(model.backbone(model.preprocess(model.read(paths))))
    torch.testing.assert_close(from_features, logits)
    if choice == "stage1":
        stored = load_cache(cache_path(run_dir, cfg))["test_logits"].tensor()
    else:
        suffix = "crt-none-" if choice == "crt" else "crt-stg-"
        (path,) = (run_dir / "retrain").glob(f"{suffix}*.safetensors")
        stored = load_tensors(path)["test_logits"]
    torch.testing.assert_close(logits, stored, rtol=1e-4, atol=1e-4)


def copy_run(finished, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished[0], run_dir)
    return run_dir


def test_final_falls_back_to_crt_and_then_stage1(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    for path in (run_dir / "retrain").glob("crt-stg-*"):
        path.unlink()
    assert tailaug.load(run_dir).classifier == "cRT"
    with pytest.raises(TailaugError, match="holds no stage-3 classifier 'cRT \\+ STG \\(lambda 1.5\\)' of its "
                                           "config.yaml; finish the run with 'tailaug run"):
        tailaug.load(run_dir, "augmented")
    shutil.rmtree(run_dir / "retrain")
    assert tailaug.load(run_dir).classifier == "stage 1 (the run has no stage-3 classifier)"


def test_a_run_without_augmenter_has_no_augmented_classifier(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    tree["retrain"]["augmenter"] = {"name": "none"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    assert tailaug.load(run_dir).classifier == "cRT"  # the cRT row's key does not depend on the augmenter
    with pytest.raises(TailaugError, match="has no augmented classifier \\(retrain.augmenter is none\\); use "
                                           "--classifier crt or stage1"):
        tailaug.load(run_dir, "augmented")


def test_a_stage3_file_without_weights_says_what_to_do(finished, tmp_path):
    from safetensors.torch import save_file

    run_dir = copy_run(finished, tmp_path)
    (path,) = (run_dir / "retrain").glob("crt-none-*.safetensors")
    save_file({"test_logits": load_tensors(path)["test_logits"]}, str(path))
    with pytest.raises(CheckpointError, match=r"holds the test logits of this stage-3 classifier but not its weights "
                                              r"\(it was written by an older tailaug, or its classifier has no head_state\(\)\); delete it and "
                                              r"crt-none-.*json"):
        tailaug.load(run_dir, "crt")


# keys data.transforms brought; a run made before it has none of them in its config.yaml
NEW_KEYS = ("transforms", "crop_scale", "color_jitter", "eval_crop_ratio", "prefetch_factor", "gpu_decode")


def test_a_run_made_before_data_transforms_is_still_loaded_and_evaluated(tmp_path, capsys):
    """Such a run was trained with the small pipeline, and its saved config means small (a fresh
    config file without the key means auto: natural for image files)."""
    from tailaug.commands import load_run_config
    from tailaug.data.natural import pipeline

    images = write_class_folders(tmp_path / "old_images", {"cat": 30, "dog": 20, "emu": 16}, size=28)
    short = [*TINY, "train.epochs=2", "stg.epochs=1", "retrain.epochs=2", "data.transforms=small"]
    assert main(["run", CONFIG, f"data.root={images}", f"run.output_dir={tmp_path / 'runs'}", *short]) == 0
    run_dir = tmp_path / "runs" / "my_images"
    paths = folder_splits(load_config(run_dir / "config.yaml").data).test[0][:4]
    before = tailaug.load(run_dir).predict_files(paths)
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in NEW_KEYS:
        del tree["data"][key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    shutil.copy(run_dir / "config.yaml", tmp_path / "fresh.yaml")
    assert pipeline(load_config(tmp_path / "fresh.yaml").data) == "natural"  # a new config file: auto
    assert pipeline(load_config(run_dir / "config.yaml").data) == "small"  # the run's own (tailaug run RUN/config.yaml)
    assert load_run_config(run_dir).data.transforms == "small"
    assert load_run_config(run_dir, ["data.transforms=natural"]).data.transforms == "natural"  # overrides win
    torch.testing.assert_close(tailaug.load(run_dir).predict_files(paths), before)
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0, capsys.readouterr().err
    assert "stage 1 (last epoch)" in capsys.readouterr().out
    trained = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert main(["run", str(run_dir / "config.yaml"), "--resume", "--no-progress"]) == 0, capsys.readouterr().err
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == trained  # its stage 1, not trained again


def test_predict_input_errors(finished, tmp_path, capsys):
    run_dir, _ = finished
    (tmp_path / "empty").mkdir()
    (tmp_path / "feats.npz").write_bytes(b"")
    for inputs, message in (([tmp_path / "empty"], "holds no image files"),
                            ([tmp_path / "feats.npz"], "feats.npz is an embeddings file, and this run takes images "
                                                       "(its data.dataset is not embeddings): give image files or "
                                                       "folders of them (features of the run's own backbone: "
                                                       "tailaug.load(RUN_DIR).features_to_logits in Python)"),
                            ([tmp_path / "nope.png"], "does not exist; give image files or folders")):
        assert main(["predict", str(run_dir), *map(str, inputs)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(TailaugError, match="unknown classifier 'best'; choose one of final, crt, augmented, stage1"):
        tailaug.load(run_dir, "best")
    with pytest.raises(DataError, match="not_an_image.png .*give image files"):
        (tmp_path / "not_an_image.png").write_text("text")
        tailaug.load(run_dir).predict_files([tmp_path / "not_an_image.png"])
    with pytest.raises(DataError, match="feats.npz is an embeddings file, and this run takes images"):
        tailaug.load(run_dir).predict_files([tmp_path / "feats.npz"])
    with pytest.raises(DataError, match=r"this run takes images \[N, C, S, S\] \(preprocess\(read\(paths\)\)\), not a "
                                        r"tensor of shape \(2, 64\); features of its own backbone go through "
                                        "features_to_logits"):
        tailaug.load(run_dir)(torch.zeros(2, 64))


@pytest.mark.parametrize("method", ["crt", "lws", "tau_norm", "ncm"])
def test_every_stage3_classifier_is_restored_from_its_stored_tensors(method, tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=gen), torch.arange(60) % 3
    cfg = RetrainConfig(method=method, epochs=2, tau=0.5 if method == "tau_norm" else None)
    model = retrain_classifier(x, y, [20, 20, 20], cfg, num_classes=3, seed=0, progress=False,
                               init_weight=torch.randn(3, 8, generator=gen), init_bias=torch.randn(3, generator=gen))
    from safetensors.torch import load_file, save_file

    save_file(head_tensors(model), str(tmp_path / "h.safetensors"))
    restored = load_head(load_file(str(tmp_path / "h.safetensors")), tmp_path / "h.safetensors")
    probe = torch.randn(10, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(restored(probe), model(probe), rtol=1e-5, atol=1e-5)
