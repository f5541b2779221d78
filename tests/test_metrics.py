import json
import math
import os

import numpy as np
import pytest
import torch

from tailaug.errors import CheckpointError, DataError
from tailaug.evaluation.metrics import (
    confusion_matrix,
    evaluate_logits,
    expected_calibration_error,
    per_class_accuracy,
    reliability_bins,
    shot_groups,
)
from tailaug.evaluation.plots import plot_per_class_accuracy, plot_reliability, plot_tsne
from tailaug.evaluation.report import format_table, markdown_table, mean_std_table, read_json, write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# five samples with known confidences (max prob) and correctness
HAND_PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # conf .90, target 0: correct
        [0.70, 0.20, 0.10],  # conf .70, target 1: wrong
        [0.30, 0.50, 0.20],  # conf .50, target 1: correct
        [0.10, 0.25, 0.65],  # conf .65, target 2: correct
        [0.45, 0.35, 0.20],  # conf .45, target 2: wrong
    ]
)
HAND_TARGETS = np.array([0, 1, 1, 2, 2])


# --------------------------------------------------------------------------- ECE


def test_ece_hand_computation():
    # 5 bins of width .2: bin (.4,.6] = {.50 ok, .45 wrong}: |.5 - .475| * 2/5 = .010
    #                     bin (.6,.8] = {.70 wrong, .65 ok}: |.5 - .675| * 2/5 = .070
    #                     bin (.8,1]  = {.90 ok}:            |1 - .9|    * 1/5 = .020
    assert expected_calibration_error(HAND_PROBS, HAND_TARGETS, bins=5) == pytest.approx(0.10)
    # one bin: |acc - mean conf| = |3/5 - 3.2/5|
    assert expected_calibration_error(HAND_PROBS, HAND_TARGETS, bins=1) == pytest.approx(0.04)
    # torch input gives the same
    ece_t = expected_calibration_error(torch.tensor(HAND_PROBS), torch.tensor(HAND_TARGETS), bins=5)
    assert ece_t == pytest.approx(0.10)


def test_reliability_bins_contents():
    rb = reliability_bins(HAND_PROBS, HAND_TARGETS, bins=5)
    assert rb["counts"] == [0, 0, 2, 2, 1]
    assert rb["accuracy"][:2] == [None, None] and rb["confidence"][:2] == [None, None]
    assert rb["accuracy"][2:] == pytest.approx([0.5, 0.5, 1.0])
    assert rb["confidence"][2:] == pytest.approx([0.475, 0.675, 0.9])
    assert rb["edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert rb["num_samples"] == 5 and rb["ece"] == pytest.approx(0.10)
    json.dumps(rb, allow_nan=False)


def test_ece_bin_edges_are_right_closed():
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    rb = reliability_bins(probs, [0, 0, 1], bins=2)
    assert rb["counts"] == [2, 1]  # 0.5 lies in (0, .5], 1.0 in (.5, 1]
    assert expected_calibration_error(probs, [0, 0, 1], bins=2) == pytest.approx(0.0)


def test_ece_rejects_logits():
    with pytest.raises(DataError, match="softmax"):
        expected_calibration_error(np.array([[2.0, -1.0]]), [0])


# --------------------------------------------------------------------------- shot groups


def test_shot_groups_thresholds():
    counts = [101, 100, 50, 20, 19, 1000, 1]
    g = shot_groups(counts)
    assert g == {"many": [0, 5], "medium": [1, 2, 3], "few": [4, 6]}
    g = shot_groups(counts, many=200, few=50)
    assert g == {"many": [5], "medium": [0, 1, 2], "few": [3, 4, 6]}
    with pytest.raises(DataError):
        shot_groups(counts, many=10, few=20)


def test_cifar10_lt_if100_has_no_few_class():
    counts = [int(5000 * (1 / 100) ** (c / 9)) for c in range(10)]
    assert counts[-1] == 50
    g = shot_groups(counts)
    assert g["few"] == []
    assert len(g["many"]) + len(g["medium"]) == 10
    assert g["medium"] == [c for c, n in enumerate(counts) if n <= 100]


# --------------------------------------------------------------------------- accuracy


def test_confusion_and_per_class_hand_example():
    targets = [0, 0, 1, 1, 1, 3]
    preds = [0, 1, 1, 1, 0, 3]
    cm = confusion_matrix(preds, targets, 4)
    expected = np.array([[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(cm, expected)
    acc = per_class_accuracy(preds, targets, 4)
    assert acc[0] == pytest.approx(0.5) and acc[1] == pytest.approx(2 / 3) and acc[3] == 1.0
    assert math.isnan(acc[2])  # class 2 absent from targets
    # tensors work as well
    np.testing.assert_array_equal(confusion_matrix(torch.tensor(preds), torch.tensor(targets), 4), expected)
    with pytest.raises(DataError, match="num_classes"):
        confusion_matrix([0, 4], [0, 1], 4)


def test_evaluate_logits_hand_example():
    # classes: 0 many (150), 1 medium (50), 2 few (10)
    targets = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.2)
    probs[np.arange(6), preds] = 0.6
    logits = torch.tensor(np.log(probs) + 1.5)  # a shift changes nothing
    out = evaluate_logits(logits, torch.tensor(targets), [150, 50, 10], ece_bins=10)
    assert out["top1"] == pytest.approx(100 * 4 / 6)
    assert out["per_class"] == pytest.approx([50.0, 100.0, 50.0])
    assert (out["many"], out["medium"], out["few"]) == pytest.approx((50.0, 100.0, 50.0))
    assert out["groups"] == {"many": 1, "medium": 1, "few": 1}
    assert out["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert out["num_samples"] == 6
    # every confidence is .6, accuracy 4/6: ECE = |4/6 - .6|
    assert out["ece"] == pytest.approx(100 * abs(4 / 6 - 0.6))
    # nll: -mean log p(target): 4 targets at .6, 2 at .2
    assert out["nll"] == pytest.approx(-(4 * math.log(0.6) + 2 * math.log(0.2)) / 6)
    json.dumps(out, allow_nan=False)


def test_evaluate_logits_group_means_and_missing_classes():
    # 4 classes: two many-shot; class 3 (few) never occurs in the test targets
    counts = [500, 300, 40, 5]
    targets = np.array([0, 0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 2])
    logits = np.eye(4)[preds] * 5.0
    out = evaluate_logits(logits, targets, counts)
    # many = mean(3/4, 1/2) = 62.5, not the sample accuracy 4/6
    assert out["many"] == pytest.approx(62.5)
    assert out["medium"] == pytest.approx(100.0)
    assert out["few"] is None and out["per_class"][3] is None
    assert out["groups"] == {"many": 2, "medium": 1, "few": 1}
    json.dumps(out, allow_nan=False)
    # an empty group is None too
    out = evaluate_logits(logits, targets, [500, 300, 400, 200])
    assert out["groups"]["few"] == 0 and out["few"] is None and out["medium"] is None


def test_evaluate_logits_errors():
    with pytest.raises(DataError, match="class_counts"):
        evaluate_logits(torch.zeros(2, 3), [0, 1], [10, 10])
    with pytest.raises(DataError, match="differ"):
        evaluate_logits(torch.zeros(2, 3), [0, 1, 2], [10, 10, 10])
    with pytest.raises(DataError, match="nan"):
        evaluate_logits(torch.full((2, 3), float("nan")), [0, 1], [10, 10, 10])


# --------------------------------------------------------------------------- tables and JSON

ROWS = [
    ("ce", {"top1": 70.123, "many": 80.0, "medium": None, "few": 12.346, "ece": 5}),
    ("stg+crt", {"top1": 75.5, "many": 79.99, "medium": 60.0, "few": float("nan"), "ece": 3.2}),
]


def test_format_table():
    text = format_table(ROWS)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "top1", "many", "medium", "few", "ece"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["ce", "70.12", "80.00", "-", "12.35", "5.00"]
    assert lines[3].split() == ["stg+crt", "75.50", "79.99", "60.00", "-", "3.20"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert format_table(ROWS, columns=("top1",)).splitlines()[2].split() == ["ce", "70.12"]


def test_markdown_table():
    lines = markdown_table(ROWS).splitlines()
    assert lines[0] == "| method | top1 | many | medium | few | ece |"
    assert lines[1].startswith("|:---|---:|")
    assert lines[2] == "| ce | 70.12 | 80.00 | - | 12.35 | 5.00 |"
    assert lines[3] == "| stg+crt | 75.50 | 79.99 | 60.00 | - | 3.20 |"


def test_mean_std_table():
    results = {
        "ce": [{"top1": 70.0, "few": None}, {"top1": 72.0, "few": 10.0}],
        "single": [{"top1": 50.0}],
    }
    text = mean_std_table(results, columns=("top1", "few"))
    lines = text.splitlines()
    assert lines[0] == "| method | n | top1 | few |"
    assert lines[2] == "| ce | 2 | 71.00 ± 1.41 | 10.00 |"  # sample std (ddof=1) of 70, 72
    assert lines[3] == "| single | 1 | 50.00 | - |"
    assert "ddof=1" in text


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "results.json"
    obj = {"a": np.float32(1.5), "b": np.arange(3), "c": torch.tensor([1, 2]), "d": float("nan"), "e": [np.int64(4)]}
    assert write_json(path, obj) == path
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": [1, 2], "d": None, "e": [4]}
    # a failed write leaves the previous file intact and no temporary file behind
    with pytest.raises(TypeError):
        write_json(path, {"bad": {1, 2}})
    assert json.loads(path.read_text())["a"] == 1.5
    assert os.listdir(path.parent) == ["results.json"]


def test_read_json_round_trip_and_required_keys(tmp_path):
    path = write_json(tmp_path / "stage1.json", {"key": "abc", "epochs": 3})
    assert read_json(path, fix="x", keys=("key",)) == {"key": "abc", "epochs": 3}
    with pytest.raises(CheckpointError) as info:
        read_json(path, fix="delete it", keys=("key", "test"))
    assert str(info.value) == f"{path} lacks 'test'; delete it"


@pytest.mark.parametrize(
    "blob, problem",
    [(b'{"key": "ab', "cannot be read as JSON (JSONDecodeError: Unterminated string starting at: line 1 column 9"),
     (b"", "cannot be read as JSON (JSONDecodeError: Expecting value: line 1 column 1 (char 0))"),
     (b"\xff\xfe{}", "cannot be read as JSON (UnicodeDecodeError: "),
     (b"[1, 2]", "holds a JSON array, not an object"),
     (b"null", "holds a JSON null, not an object"),
     (b"2.5", "holds a JSON number, not an object")],
)
def test_read_json_corrupt_file_names_file_and_fix(tmp_path, blob, problem):
    path = tmp_path / "stage1.json"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError) as info:
        read_json(path, fix="delete it and rerun", keys=("key",))
    msg = str(info.value)
    assert msg.startswith(f"{path} {problem}") and msg.endswith("; delete it and rerun") and "\n" not in msg


# --------------------------------------------------------------------------- plots


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plot_per_class_accuracy(tmp_path):
    counts = [int(5000 * (1 / 100) ** (c / 9)) for c in range(10)]
    acc = [95, 90, 85, 80, 70, None, 60, 50, 40, 30]
    out = plot_per_class_accuracy(acc, counts, tmp_path / "pca.png")
    assert out == tmp_path / "pca.png" and _is_png(out)
    with pytest.raises(DataError):
        plot_per_class_accuracy(acc[:3], counts, tmp_path / "bad.png")


def test_plot_reliability(tmp_path):
    rb = reliability_bins(HAND_PROBS, HAND_TARGETS, bins=5)
    out = plot_reliability(rb, tmp_path / "figs" / "rel")  # no suffix: .png added
    assert out == tmp_path / "figs" / "rel.png" and _is_png(out)
    with pytest.raises(DataError, match="reliability_bins"):
        plot_reliability({"edges": [0, 1]}, tmp_path / "bad.png")


def test_plot_tsne(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    feats = rng.normal(size=(60, 8)) + 4.0 * np.eye(8)[labels]
    markers = np.zeros(60, dtype=bool)
    markers[::5] = True
    a = plot_tsne(torch.tensor(feats), labels, tmp_path / "a.png", markers=markers, seed=0)
    b = plot_tsne(feats, labels, tmp_path / "b.png", markers=markers, seed=0)
    assert _is_png(a) and _is_png(b)
    assert a.read_bytes() == b.read_bytes()  # deterministic for a fixed seed
    c = plot_tsne(feats, labels, tmp_path / "c.png", max_points=30)  # subsampled, no markers
    assert _is_png(c)
    with pytest.raises(DataError):
        plot_tsne(feats, labels[:10], tmp_path / "bad.png")


def test_reliability_diagram_shows_the_reported_ece_after_logit_adjustment(tmp_path, monkeypatch):
    from tailaug.config import Config
    from tailaug.evaluation import plots
    from tailaug.evaluation.scoring import score

    drawn = []
    real = plots.plot_reliability
    monkeypatch.setattr(plots, "plot_reliability",
                        lambda bins, path, **kw: drawn.append(bins) or real(bins, path, **kw))
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(300, 3, generator=gen) * 2, torch.randint(0, 3, (300,), generator=gen)
    counts = [500, 50, 5]
    cfg = Config.model_validate({"eval": {"logit_adjust_tau": 1.0, "ece_bins": 10}})
    results = score(logits, labels, counts, cfg, plots_dir=tmp_path, name="Adjusted model")
    plain = score(logits, labels, counts, Config.model_validate({"eval": {"ece_bins": 10}}))
    assert results["ece"] != pytest.approx(plain["ece"], abs=0.5)  # the adjustment changes the ECE
    assert len(drawn) == 1 and 100 * drawn[0]["ece"] == pytest.approx(results["ece"], rel=1e-12)
    assert _is_png(tmp_path / "adjusted_model_reliability.png") and _is_png(tmp_path / "adjusted_model_per_class.png")


def test_confusion_and_per_class_accuracy_agree_with_scikit_learn():
    """Kept hand-written because they are 15-150x faster than scikit-learn's (measured in the
    #8 note); scikit-learn is the oracle."""
    from sklearn.metrics import confusion_matrix as sk_confusion, recall_score

    from tailaug.evaluation.metrics import confusion_matrix, per_class_accuracy

    rng = np.random.default_rng(0)
    targets, preds = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    targets[targets == 6] = 5  # class 6 has no test sample: nan, as recall_score's zero_division
    labels = np.arange(7)
    assert (confusion_matrix(preds, targets, 7) == sk_confusion(targets, preds, labels=labels)).all()
    ours = per_class_accuracy(preds, targets, 7)
    theirs = recall_score(targets, preds, labels=labels, average=None, zero_division=np.nan)
    np.testing.assert_allclose(ours, theirs, equal_nan=True)
    assert np.isnan(ours[6])
