"""An embeddings file -> `tailaug run` -> `tailaug predict` / `tailaug.load`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import tailaug
from tailaug.cli import main
from tailaug.config import load_config
from tailaug.engine.checkpoint import load_tensors
from tailaug.errors import DataError
from tailaug.stages.features import cache_path, load_cache

from synthetic import long_tail_embeddings
from test_embeddings import write

NAMES = ["ant", "bee", "cat"]
FAST = ["train.epochs=20", "train.lr=0.02", "train.batch_size=32", "stg.epochs=3", "stg.memory_size=32",
        "stg.head.rule=top_k", "stg.head.top_k=1", "retrain.epochs=15", "retrain.lr=0.02",
        "retrain.augmenter={name: stg, lam: 1.0}", "data.shots.many=40", "data.shots.few=15",
        "train.precision=fp32", "--no-progress"]
STORED = {"stage1": None, "crt": "crt-none-", "augmented": "crt-stg-", "final": "crt-stg-"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run on L2-normalised string-labelled embeddings whose norms are far from 1
    (so that predicting without the normalisation would give other logits)."""
    root = tmp_path_factory.mktemp("emb_predict")
    x, y, xt, yt = long_tail_embeddings([60, 30, 12], dim=6, spread=1.5, test_per_class=20)
    x, xt = 10 * x + 3, 10 * xt + 3
    np.savez(root / "train.npz", features=x, labels=np.array(NAMES)[y])
    np.savez(root / "test.npz", features=xt, labels=np.array(NAMES)[yt])
    tree = {"run": {"output_dir": str(root / "runs"), "name": "emb", "device": "cpu"},
            "data": {"dataset": "embeddings", "root": str(root),
                     "embeddings": {"train": "train.npz", "test": "test.npz", "normalize": True}}}
    (root / "cfg.yaml").write_text(json.dumps(tree))
    assert main(["run", str(root / "cfg.yaml"), *FAST]) == 0
    return root / "runs" / "emb", root, xt, yt


def stored_logits(run_dir, choice):
    if STORED[choice] is None:
        return load_cache(cache_path(run_dir, load_config(run_dir / "config.yaml")))["test_logits"].tensor()
    (path,) = (run_dir / "retrain").glob(f"{STORED[choice]}*.safetensors")
    return load_tensors(path)["test_logits"]


def predict(run_dir, *inputs, args=()):
    out = run_dir.parent / "p.csv"
    assert main(["predict", str(run_dir), *map(str, inputs), "--out", str(out), "--no-progress", *args]) == 0
    with open(out, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("choice", ["final", "crt", "augmented", "stage1"])
def test_predict_gives_the_classes_the_run_scored(finished, choice, capsys):
    run_dir, root, _, yt = finished
    capsys.readouterr()
    rows = predict(run_dir, root / "test.npz", args=("--classifier", choice, "--top-k", "2", "--batch-size", "25"))
    err = capsys.readouterr().err
    label = {"stage1": "stage 1", "crt": "cRT"}.get(choice, "cRT + STG (lambda 1.0)")
    assert err.startswith(f"classifier: {label} ({choice}); 60 row(s) of 1 embeddings file(s)")
    assert [r["input"] for r in rows] == [f"{root / 'test.npz'}:{i}" for i in range(60)]
    assert list(rows[0]) == ["input", "class", "probability", "classifier", "top1_class", "top1_probability",
                             "top2_class", "top2_probability", "true_class"]
    expected = [NAMES[c] for c in stored_logits(run_dir, choice).argmax(1).tolist()]
    assert [r["class"] for r in rows] == expected
    assert [r["true_class"] for r in rows] == [NAMES[c] for c in yt]
    right = sum(a == b for a, b in zip(expected, (NAMES[c] for c in yt)))
    assert f"accuracy against the files' labels: {100 * right / 60:.2f}% ({right} of 60 labelled rows)" in err
    assert right > 40  # chance: 20 of 60


@pytest.mark.parametrize("name, kind", [("f.npy", None), ("f.parquet", "list"), ("f.parquet", "columns"),
                                        ("f.safetensors", None), ("f.npz", None)])
def test_a_file_of_features_alone_in_every_format(finished, tmp_path, name, kind):
    run_dir, root, xt, _ = finished
    path = write(tmp_path / name, x=xt, y=np.zeros(len(xt), dtype=np.int64), kind=kind)
    if name.endswith(".npy"):
        path.with_name(path.stem + "_labels.npy").unlink()
    else:  # the same file without its labels
        import pyarrow.parquet as pq
        from safetensors.numpy import save_file

        if name.endswith(".npz"):
            np.savez(path, features=xt)
        elif name.endswith(".safetensors"):
            save_file({"embeddings": xt}, str(path))
        else:
            pq.write_table(pq.read_table(path).drop_columns(["labels" if kind == "list" else "label"]), path)
    rows = predict(run_dir, path)
    assert len(rows) == 60 and "true_class" not in rows[0]
    assert [r["class"] for r in rows] == [NAMES[c] for c in stored_logits(run_dir, "final").argmax(1).tolist()]


def test_integer_labels_are_named_by_the_run(finished, tmp_path):
    run_dir, _, xt, yt = finished
    np.savez(tmp_path / "ids.npz", features=xt[:4], labels=np.array([yt[0], yt[1], 7, yt[3]]))
    rows = predict(run_dir, tmp_path / "ids.npz")
    assert [r["true_class"] for r in rows] == [NAMES[yt[0]], NAMES[yt[1]], "7", NAMES[yt[3]]]


@pytest.mark.parametrize("choice", ["final", "crt", "augmented", "stage1"])
def test_load_maps_raw_features_to_the_stored_logits(finished, choice):
    run_dir, _, xt, _ = finished
    model = tailaug.load(run_dir, choice)
    assert isinstance(model, torch.nn.Module) and not model.training and model.class_names == NAMES
    with torch.no_grad():
        logits = model(torch.from_numpy(xt))
        torch.testing.assert_close(model.features_to_logits(torch.from_numpy(xt).double()), logits)
    torch.testing.assert_close(logits, stored_logits(run_dir, choice), rtol=1e-4, atol=1e-4)
    # the normalisation is part of the module: the head alone on the raw features differs
    assert not torch.allclose(model.head(torch.from_numpy(xt)), logits, atol=1e-2)


BAD = [
    ("image", "x.png", lambda p: p.write_bytes(b"\x89PNG"),
     "x.png is not an embeddings file, and this run takes embeddings (data.dataset embeddings): give .npz, .npy, "
     ".parquet, .safetensors files"),
    ("dimension", "d.npz", lambda p: np.savez(p, features=np.ones((3, 4), np.float32)),
     "d.npz holds 4-d features but the run was trained on 6-d ones; give features from the model that made"),
    ("nan", "n.npz", lambda p: np.savez(p, features=np.where(np.eye(3, 6) > 0, np.nan, 1.0)),
     r"n.npz: 3 feature row(s) hold NaN or inf (first: row 0); re-extract them or drop those rows"),
    ("dtype", "s.npz", lambda p: np.savez(p, features=np.full((3, 6), "a")),
     "s.npz: the features have dtype <U1, not numbers; save them as float32"),
    ("missing", "gone.npz", lambda p: None, "input {path} does not exist; give .npz"),
]


@pytest.mark.parametrize("what, name, make, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_one_line_errors(finished, tmp_path, capsys, what, name, make, message):
    run_dir = finished[0]
    path = tmp_path / name
    make(path)
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(path=path) in err and "\n" not in err


def test_load_refuses_images_and_features_of_another_dimension(finished, tmp_path):
    model = tailaug.load(finished[0])
    for bad in (torch.zeros(2, 3, 28, 28), torch.zeros(2, 5)):
        with pytest.raises(DataError, match=r"this run takes embeddings \[N, 6\] \(data.dataset embeddings\), not a "
                                            r"tensor of shape \(2, .*\); give features from the model"):
            model(bad)
    with pytest.raises(DataError, match="is not an embeddings file, and this run takes embeddings"):
        model.predict_files([tmp_path / "photo.jpg"])


def test_class_names_of_a_run_written_before_classes_json_said_names(finished, tmp_path):
    import shutil

    run_dir = tmp_path / "old"
    shutil.copytree(finished[0], run_dir)
    assert json.loads((run_dir / "classes.json").read_text()) == {"names": NAMES}
    (run_dir / "classes.json").write_text(json.dumps({"class_names": NAMES}))
    assert tailaug.load(run_dir).class_names == NAMES
    (run_dir / "classes.json").unlink()
    assert tailaug.load(run_dir).class_names == ["0", "1", "2"]


def test_a_run_without_its_feature_cache_says_to_rerun(finished, tmp_path):
    import shutil

    from tailaug.errors import CheckpointError

    run_dir = tmp_path / "nocache"
    shutil.copytree(finished[0], run_dir)
    (path,) = (run_dir / "features").glob("*/entries.safetensors")
    path.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"holds no readable stage-1 head \(.*\); delete .*features/\w+-\w+ and "
                                              r"rerun 'tailaug run .*config.yaml' \(stage 1 trains its linear head again"):
        tailaug.load(run_dir)
    shutil.rmtree(path.parent)
    with pytest.raises(CheckpointError, match=r"the feature cache .* with the run's stage-1 head is missing; rerun "
                                              "'tailaug run"):
        tailaug.load(run_dir)
