"""data.dataset: embeddings: readers, bad files, splits, config decisions and `tailaug run`."""

import json

import numpy as np
import pytest

from tailaug import commands
from tailaug.config import load_config
from tailaug.data.embeddings import load_embeddings, read_embeddings, stratified_split
from tailaug.errors import ConfigError, DataError, TailaugError

from synthetic import long_tail_embeddings

X = np.arange(12, dtype=np.float32).reshape(4, 3)
Y = np.array([0, 1, 1, 0])
NAMES = np.array(["cat", "dog", "dog", "cat"])


def write(path, x=X, y=Y, kind=None):
    """x and y written in the format of ``path``'s suffix (parquet: ``kind`` list or columns)."""
    suffix = path.suffix
    if suffix == ".npz":
        np.savez(path, features=x, labels=y)
    elif suffix == ".npy":
        np.save(path, x)
        np.save(path.with_name(path.stem + "_labels.npy"), y)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"features": np.ascontiguousarray(x), "labels": np.asarray(y)}, str(path))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if kind == "columns":
            table = pa.table({**{f"d{i}": x[:, i] for i in range(x.shape[1])}, "label": y})
        else:
            table = pa.table({"embedding": [list(r) for r in x], "labels": y})
        pq.write_table(table, path)
    return path


def read(path):
    labels = path.with_name(path.stem + "_labels.npy") if path.suffix == ".npy" else None
    return read_embeddings(path, labels)


@pytest.mark.parametrize("name, kind", [("e.npz", None), ("e.npy", None), ("e.safetensors", None),
                                        ("e.parquet", "list"), ("e.parquet", "columns")])
def test_every_reader_round_trips_features_and_labels(tmp_path, name, kind):
    x, y = read(write(tmp_path / name, kind=kind))
    assert x.dtype == np.float32 and np.array_equal(x, X) and np.array_equal(y, Y)


@pytest.mark.parametrize("name, kind", [("e.npz", None), ("e.parquet", "list"), ("e.parquet", "columns")])
def test_string_labels_are_read_as_strings(tmp_path, name, kind):
    _, y = read(write(tmp_path / name, y=NAMES, kind=kind))
    assert y.tolist() == NAMES.tolist()


def test_arrays_are_found_by_the_configured_names(tmp_path):
    np.savez(tmp_path / "e.npz", emb=X, target=Y)
    with pytest.raises(DataError, match=r"no array named features or embeddings or embedding or x or X \(it has 'emb', "
                                        r"'target'\); name it with data.embeddings.features_name"):
        read_embeddings(tmp_path / "e.npz")
    x, y = read_embeddings(tmp_path / "e.npz", features_name="emb", labels_name="target")
    assert np.array_equal(x, X) and np.array_equal(y, Y)


def _ragged_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"features": [[1.0, 2.0], [3.0]], "labels": [0, 1]}), path)
    return path


BAD_FILES = [
    ("ragged npz", "e.npz", lambda p: np.savez(p, features=np.array([[1.0], [1.0, 2.0]], dtype=object), labels=[0, 1]),
     r"an array is an object array \(ragged rows or Python objects\); save a rectangular numeric array"),
    ("ragged parquet", "e.parquet", _ragged_parquet, r"column 'features' is ragged \(rows of 1 to 2 values\)"),
    ("nan", "e.npz", lambda p: np.savez(p, features=np.where(X == 4, np.nan, X), labels=Y),
     r"1 feature row\(s\) hold NaN or inf \(first: row 1\); re-extract them or drop those rows"),
    ("inf", "e.npz", lambda p: np.savez(p, features=np.where(X == 11, np.inf, X), labels=Y),
     r"1 feature row\(s\) hold NaN or inf \(first: row 3\)"),
    ("text features", "e.npz", lambda p: np.savez(p, features=X.astype(str), labels=Y),
     r"the features have dtype <U\d+, not numbers; save them as float32"),
    ("lengths", "e.npz", lambda p: np.savez(p, features=X, labels=Y[:3]),
     "4 feature rows but 3 labels; give one label per row"),
    ("1-d", "e.npz", lambda p: np.savez(p, features=X[:, 0], labels=Y),
     r"the features are 1-D \(shape \(4,\)\); they must be \[N, d\].*save features\[:, None\]"),
    ("fractional labels", "e.npz", lambda p: np.savez(p, features=X, labels=[0.5, 1, 1, 0]),
     "the labels are floats that are not whole numbers"),
    ("extension", "e.csv", lambda p: p.write_text("1,2\n"),
     r"unknown embeddings file type '.csv'; save the features as .npz, .npy, .parquet, .safetensors"),
    ("missing", "e.npz", lambda p: None, r"embeddings file .*e.npz does not exist; check the path"),
    ("corrupt", "e.npz", lambda p: p.write_bytes(b"PK\x03\x04 not a zip"), r"is not a readable .npz file .*write it again"),
]


@pytest.mark.parametrize("what, name, make, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_a_one_line_error_naming_file_and_fix(tmp_path, what, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError, match=message) as err:
        read_embeddings(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_npy_features_file_needs_its_labels_file(tmp_path):
    np.save(tmp_path / "e.npy", X)
    with pytest.raises(DataError, match="give its labels as a second .npy file in data.embeddings.train_labels"):
        read_embeddings(tmp_path / "e.npy")


def test_a_ragged_npy_file_is_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "e.npy", np.array([[1.0], [1.0, 2.0]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    with pytest.raises(DataError, match=r"e.npy: an array is an object array \(ragged rows or Python objects\); "
                                        r"save a rectangular numeric array \(np.stack the rows\)"):
        read_embeddings(tmp_path / "e.npy", labels_path=tmp_path / "y.npy")


def config(tmp_path, embeddings: dict, *overrides):
    tree = {"run": {"output_dir": str(tmp_path / "runs"), "name": "emb", "device": "cpu"},
            "data": {"dataset": "embeddings", "root": str(tmp_path), "embeddings": embeddings}}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(tree))
    return str(path), list(overrides)


def test_a_class_without_training_rows_and_a_test_of_other_dimension_are_errors(tmp_path):
    np.savez(tmp_path / "gap.npz", features=X, labels=[0, 2, 2, 0])
    with pytest.raises(DataError, match=r"gap.npz: class\(es\) 1 have no training samples; every class needs at "
                                        "least one: add samples, renumber the labels 0..C-1 without gaps"):
        load_embeddings(load_config(*config(tmp_path, {"train": "gap.npz"})).data)
    write(tmp_path / "train.npz")
    np.savez(tmp_path / "test.npz", features=X[:, :2], labels=Y)
    with pytest.raises(DataError, match=r"test.npz holds 2-d features but .*train.npz 3-d; extract both with the "
                                        "same model"):
        load_embeddings(load_config(*config(tmp_path, {"train": "train.npz", "test": "test.npz"})).data)


def test_string_labels_become_sorted_ids_or_follow_class_names(tmp_path):
    write(tmp_path / "train.npz", y=np.array(["dog", "cat", "cat", "dog"]))
    write(tmp_path / "test.npz", y=np.array(["cat", "dog", "emu", "dog"]))
    data = load_embeddings(load_config(*config(tmp_path, {"train": "train.npz"}, "data.embeddings.test_fraction=0.5")).data)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    with pytest.raises(DataError, match=r"test.npz: label\(s\) \['emu'\] are not in the training labels"):
        load_embeddings(load_config(*config(tmp_path, {"train": "train.npz", "test": "test.npz"})).data)
    data = load_embeddings(load_config(*config(tmp_path, {"train": "train.npz", "class_names": ["dog", "cat"]},
                                               "data.embeddings.test_fraction=0.5")).data)
    assert sorted(data.train_y.tolist()) == [0, 1] and data.class_names == ["dog", "cat"]
    x, y = data.train_x[data.train_y == 0], "dog"  # "dog" is id 0 now: rows 0 or 3 of X
    assert any(np.array_equal(x[0], X[i]) for i in (0, 3)) and y == data.class_names[0]


def test_without_a_test_file_a_seeded_stratified_split_is_held_out_and_said(tmp_path):
    x, y = long_tail_embeddings([50, 20, 5, 1])
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    cfg = load_config(*config(tmp_path, {"train": "train.npz"}))
    data = load_embeddings(cfg.data)
    assert np.bincount(data.test_y).tolist() == [10, 4, 1]  # 20%, at least one, never a class's last row
    assert data.class_counts == [40, 16, 4, 1]
    assert data.notes == ["no test file (data.embeddings.test): held out 0.2 of each class of train.npz as the test "
                          "set, seeded by data.lt_seed=0; test rows per class [10, 4, 1, 0]"]
    again = load_embeddings(cfg.data)
    assert np.array_equal(again.test_x, data.test_x)
    other = load_embeddings(load_config(*config(tmp_path, {"train": "train.npz"}, "data.lt_seed=1")).data)
    assert not np.array_equal(other.test_x, data.test_x)
    train, test = stratified_split(y, 0.2, 0)
    assert sorted([*train, *test]) == list(range(len(y)))


def test_validation_profile_normalisation_and_test_subsampling(tmp_path):
    x, y, xt, yt = long_tail_embeddings([60, 40, 30], test_per_class=10)
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    np.savez(tmp_path / "test.npz", features=xt, labels=yt)
    files = {"train": "train.npz", "test": "test.npz"}
    data = load_embeddings(load_config(*config(tmp_path, files, "data.val_per_class=5")).data)
    assert data.class_counts == [55, 35, 25] and np.bincount(data.val_y).tolist() == [5, 5, 5]
    data = load_embeddings(load_config(*config(tmp_path, files, "data.profile=exponential",
                                               "data.imbalance_factor=10")).data)
    assert data.class_counts == [30, 9, 3]  # n_max: the smallest class
    data = load_embeddings(load_config(*config(tmp_path, {**files, "normalize": True}, "data.test_per_class=4")).data)
    assert np.allclose(np.linalg.norm(data.train_x, axis=1), 1) and np.bincount(data.test_y).tolist() == [4, 4, 4]


CONFIG_ERRORS = [
    ((), {"dataset": "embeddings"}, "data.embeddings = None: dataset 'embeddings' needs data.embeddings.train"),
    ((), {"embeddings": {"train": "a.npz"}}, "is read for dataset 'embeddings' only, and data.dataset is fashion_mnist"),
    (("data.imbalance_factor=50",), None, "data.imbalance_factor = 50.0: re-profiles the embeddings, which are used "
                                          "as given (data.profile as_is): set data.profile: exponential"),
    (("data.train_split=t.txt",), None, "data.train_split = 't.txt': is not read for dataset 'embeddings': remove it"),
    (("model.weights=w.pt",), None, "model.weights loads a backbone, and dataset 'embeddings' has none"),
    (("train.mixup_alpha=0.2",), None, "train.mixup_alpha mixes images; stage 1 on embeddings has none"),
    (("features.views=1",), None, "features.views adds augmented views of images"),
    (("train.checkpoint_every_steps=50",), None, "train.checkpoint_every_steps checkpoints a backbone's training "
                                                 "within an epoch; stage 1 on embeddings (a linear head, seconds) "
                                                 "keeps no checkpoint: remove it"),
    (("train.loss=[{name: supcon}]",), None, "train.loss supcon needs two augmented views"),
    (("data.embeddings.test_labels=l.npy",), None, "data.embeddings.test_labels = 'l.npy': is the labels file of "
                                                   "data.embeddings.test, which is not set"),
]


@pytest.mark.parametrize("overrides, data, message", CONFIG_ERRORS)
def test_settings_that_make_no_sense_on_embeddings_are_config_errors(tmp_path, overrides, data, message):
    tree = {"data": data or {"dataset": "embeddings", "embeddings": {"train": "a.npz"}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(tree))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(path, list(overrides))


def test_image_keys_do_not_matter_and_the_profile_defaults_to_as_is(tmp_path):
    cfg = load_config(*config(tmp_path, {"train": "a.npz"}, "data.crop_padding=0", "data.image_size=32"))
    assert cfg.data.profile == "as_is"


FAST = ["train.epochs=30", "train.lr=0.01", "train.batch_size=64", "stg.epochs=5", "stg.memory_size=64",
        "stg.head.rule=top_k", "stg.head.top_k=2", "retrain.epochs=30", "retrain.lr=0.01",
        "retrain.augmenter={name: stg, lam: 1.0}", "data.shots.many=60", "data.shots.few=15",
        "train.precision=fp32"]  # auto would print its one-time notice, which test_engine checks


@pytest.fixture(scope="module")
def embeddings_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("emb")
    x, y, xt, yt = long_tail_embeddings([150, 80, 40, 20, 10, 6], dim=8, spread=1.0, test_per_class=40)
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    np.savez(tmp_path / "test.npz", features=xt, labels=yt)
    args = config(tmp_path, {"train": "train.npz", "test": "test.npz"}, *FAST)
    return tmp_path / "runs" / "emb", args, commands.run(args[0], args[1], progress=False)


def test_run_on_embeddings_trains_a_head_then_stg_and_crt_and_beats_chance(embeddings_run):
    run_dir, _, results = embeddings_run
    assert list(results) == ["stage 1", "cRT", "cRT + STG (lambda 1.0)"]
    assert all(r["top1"] > 50 for r in results.values())  # chance: 16.7%
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert {k: v["metrics"] for k, v in rows.items()} == results
    assert not (run_dir / "checkpoints").exists() and (run_dir / "stage1.json").is_file()


def test_a_second_run_reuses_everything_and_evaluate_and_describe_work(embeddings_run, capsys):
    run_dir, (path, overrides), results = embeddings_run
    assert commands.run(path, overrides, progress=False) == results
    assert "stage 1: reusing the finished model" in capsys.readouterr().out
    assert commands.evaluate(run_dir)["top1"] == results["stage 1"]["top1"]
    text = commands.describe(path, overrides)
    assert "dataset embeddings  profile as_is  classes 6" in text and "total 306 training images" in text
    with pytest.raises(TailaugError, match="has no backbone to train: 'tailaug run CONFIG' trains its linear head"):
        commands.train(path, overrides, resume=False, progress=False)


def test_a_run_directory_of_other_embeddings_settings_is_refused(embeddings_run):
    _, (path, overrides), _ = embeddings_run
    with pytest.raises(TailaugError, match=r"was trained with another train\.lr"):
        commands.run(path, [*overrides, "train.lr=0.02"], progress=False)


@pytest.mark.parametrize("loss, head", [("[{name: ce}]", "linear"), ("[{name: focal, gamma: 2.0}]", "linear"),
                                        ("[{name: logit_adjust}]", "linear"), ("[{name: ldam}]", "cosine")])
def test_the_linear_stage1_trains_with_each_rebalancing_loss(loss, head):
    import torch

    from tailaug.stages.linear_head import train_linear_head

    x, y, xt, yt = long_tail_embeddings([80, 30, 8], dim=4, spread=2.0, test_per_class=30)
    cfg = load_config(None, [f"train.loss={loss}", "train.epochs=40", "train.lr=0.05", "train.batch_size=32",
                             "train.reweight.scheme=inverse_frequency" if "ce" in loss else "run.seed=0"])
    head_model = train_linear_head(torch.tensor(x), torch.tensor(y), [80, 30, 8], cfg.train, head=head)
    accuracy = (head_model(torch.tensor(xt)).argmax(1).numpy() == yt).mean()
    assert accuracy > 0.7 and len(head_model.history) == 40


def test_a_margin_loss_on_a_linear_head_is_refused():
    import torch

    from tailaug.stages.linear_head import train_linear_head

    cfg = load_config(None, ["train.loss=[{name: ldam}]"])
    with pytest.raises(ConfigError, match="act on the cosines of a cosine classifier; set model.head: cosine"):
        train_linear_head(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), [2, 2], cfg.train)
