"""`tailaug report`: grouping and averaging over hand-made run directories (config.yaml + results.json)."""

import csv
import io
import json
import math

import pytest

from tailaug import commands
from tailaug.cli import main
from tailaug.config import load_config
from tailaug.errors import TailaugError
from tailaug.evaluation.across_runs import build_report, expand_run_dirs
from tailaug.evaluation.report import write_json

EVAL = {"shots": {"many": 100, "few": 20}, "ece_bins": 15, "logit_adjust_tau": 0.0}


def make_run(root, name, seed, rows, overrides=(), eval_settings=EVAL, records=None):
    """A finished-looking run directory: config.yaml of the default config with ``overrides``
    (and run.seed/run.name), results.json with ``rows`` {method: metrics}; ``records``
    {method: (key, retrain settings)} adds stage-3 records under retrain/."""
    cfg = load_config(None, [f"run.seed={seed}", f"run.name={name}", *overrides])
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    keys = {m: k for m, (k, _) in (records or {}).items()}
    results = {m: {"metrics": metrics, "key": keys.get(m, f"{name}-{m}"), "eval": eval_settings,
                   "choices": {} if m == "stage 1" else {"seed": seed}, "tailaug_version": "test"}
               for m, metrics in rows.items()}
    write_json(run_dir / "results.json", {"schema": 1, "rows": results})
    for method, (key, settings) in (records or {}).items():
        write_json(run_dir / "retrain" / f"crt-x-{key}.json", {"label": method, "config": settings, "choices": {}})
    return run_dir


def m(top1, few=None, **extra):
    return {"top1": top1, "many": 90.0, "medium": 60.0, "few": few, "ece": 5.0, **extra}


def rows_of(report, method):
    return [r for r in report.as_json()["rows"] if r["method"] == method]


def test_mean_and_sample_std_match_hand_computation(tmp_path):
    for seed, (top1, few) in enumerate([(70.0, 10.0), (72.0, None), (77.0, 20.0)]):
        make_run(tmp_path, f"ce-s{seed}", seed, {"stage 1": m(top1, few)})
    report = build_report(sorted(tmp_path.iterdir()))
    (row,) = report.as_json()["rows"]
    assert row["n"] == 3 and row["seeds"] == ["0", "1", "2"]
    # mean 73; sample variance ((-3)^2 + (-1)^2 + 4^2) / (3 - 1) = 13
    assert row["metrics"]["top1"]["mean"] == pytest.approx(73.0)
    assert row["metrics"]["top1"]["std"] == pytest.approx(math.sqrt(13.0))
    # a missing value is skipped in its column: few over 10 and 20 -> 15 ± sqrt(50)
    assert row["metrics"]["few"] == {"mean": 15.0, "std": pytest.approx(math.sqrt(50.0)), "n": 2,
                                     "values": [10.0, None, 20.0]}
    assert row["metrics"]["ece"]["std"] == 0.0
    table = report.markdown()
    assert "| stage 1 | 0, 1, 2 | 3 | 73.00 ± 3.61 | 90.00 ± 0.00 | 60.00 ± 0.00 | 15.00 ± 7.07 | 5.00 ± 0.00 |" \
        in table
    assert "The runs differ in nothing but the seed." in table and "ddof=1" in table
    line = next(csv.DictReader(io.StringIO(report.csv())))
    assert (line["top1_mean"], line["top1_std"], line["n"]) == ("73.0000", "3.6056", "3")


def test_runs_differing_in_the_loss_are_never_averaged_and_the_key_is_named(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"ce-s{seed}", seed, {"stage 1": m(70.0 + seed), "cRT": m(75.0 + seed)})
        make_run(tmp_path, f"bs-s{seed}", seed, {"stage 1": m(80.0 + seed), "cRT": m(85.0 + seed)},
                 ["train.loss=[{name: balanced_softmax}]"])
    report = build_report([tmp_path / n for n in ("ce-s0", "ce-s1", "bs-s0", "bs-s1")])
    # ce carries label_smoothing, balanced softmax does not: an option of the loss, not a second key
    assert report.keys == ["train.loss.0.name"]
    means = {(r["method"], r["distinguishing"]["train.loss.0.name"]): (r["metrics"]["top1"]["mean"], r["n"])
             for r in report.as_json()["rows"]}
    assert means == {("stage 1", "ce"): (70.5, 2), ("cRT", "ce"): (75.5, 2),
                     ("stage 1", "balanced_softmax"): (80.5, 2), ("cRT", "balanced_softmax"): (85.5, 2)}
    assert "Rows of one method differ in `train.loss.0.name`: ce vs balanced_softmax" in report.markdown()
    header = report.text().splitlines()[0].split()
    assert header[:4] == ["method", "train.loss.0.name", "seeds", "n"]


def test_an_option_that_differs_within_one_loss_is_named_too(tmp_path):
    make_run(tmp_path, "a", 0, {"stage 1": m(70.0)})
    make_run(tmp_path, "b", 0, {"stage 1": m(71.0)}, ["train.loss.0.label_smoothing=0.1"])
    make_run(tmp_path, "c", 0, {"stage 1": m(72.0)}, ["train.loss=[{name: balanced_softmax}]"])
    report = build_report([tmp_path / n for n in "abc"])
    assert report.keys == ["train.loss.0.name", "train.loss.0.label_smoothing"]
    assert [report.labels(g)[:3] for g in report.groups] == [
        ("stage 1", "ce", "0"), ("stage 1", "ce", "0.1"), ("stage 1", "balanced_softmax", "–")]


def test_where_and_how_fast_a_run_ran_does_not_split_groups(tmp_path):
    make_run(tmp_path, "x-s0", 0, {"stage 1": m(70.0)}, ["data.root=/data/a", "run.device=cpu"])
    make_run(tmp_path, "y-s1", 1, {"stage 1": m(72.0)},
             ["data.root=/data/b", "run.output_dir=elsewhere", "data.num_workers=4", "train.eval_batch_size=64",
              "run.threads=2"])
    report = build_report([tmp_path / "x-s0", tmp_path / "y-s1"])
    assert report.keys == [] and [g.method for g in report.groups] == ["stage 1"]
    assert report.groups[0].values("top1") == [70.0, 72.0]


def test_the_same_seed_twice_is_one_measurement(tmp_path):
    make_run(tmp_path, "a", 0, {"stage 1": m(70.0)})
    make_run(tmp_path, "b", 0, {"stage 1": m(70.0)})
    report = build_report([tmp_path / "a", tmp_path / "b"])
    assert report.as_json()["rows"][0]["n"] == 1
    assert report.notes == [f"'stage 1' of {tmp_path / 'b'} has the settings and seed 0 of {tmp_path / 'a'}: "
                            "counted once"]


def test_a_row_scored_with_other_eval_settings_is_its_own_group(tmp_path):
    make_run(tmp_path, "a", 0, {"stage 1": m(70.0)})
    make_run(tmp_path, "b", 1, {"stage 1": m(72.0)}, eval_settings={**EVAL, "logit_adjust_tau": 1.0})
    report = build_report([tmp_path / "a", tmp_path / "b"])
    assert report.keys == ["eval.logit_adjust_tau"] and len(report.groups) == 2


def test_stage1_rows_ignore_stage3_settings_and_stage3_rows_use_their_record(tmp_path):
    crt = {"method": "crt", "epochs": 30, "lr": 0.001, "augmenter": {"name": "none"}, "seed": 0}
    for seed, aug in ((0, "stg"), (1, "noise")):
        # config.yaml holds the last command's augmenter; the cRT record says what cRT used
        make_run(tmp_path, f"r{seed}", seed, {"stage 1": m(70.0 + seed), "cRT": m(75.0 + seed)},
                 [f"retrain.augmenter={{name: {aug}}}"], records={"cRT": (f"k{seed}", {**crt, "seed": seed})})
    make_run(tmp_path, "r2", 2, {"stage 1": m(72.0), "cRT": m(77.0)}, ["retrain.augmenter={name: noise}"],
             records={"cRT": ("k2", {**crt, "lr": 0.01, "seed": 2})})
    report = build_report([tmp_path / f"r{s}" for s in range(3)])
    assert [(g.method, len(g.members)) for g in report.groups] == [("stage 1", 3), ("cRT", 2), ("cRT", 1)]
    assert report.keys == ["retrain.lr"]
    assert report.labels(report.groups[0])[1] == "–"  # the stage-1 row does not depend on retrain.lr

    # without records, config.yaml's retrain section is compared: the cRT rows stay apart
    for s in range(3):
        for p in (tmp_path / f"r{s}" / "retrain").iterdir():
            p.unlink()
    report = build_report([tmp_path / f"r{s}" for s in range(3)])
    assert [(g.method, len(g.members)) for g in report.groups] == [("stage 1", 3), ("cRT", 1), ("cRT", 2)]
    assert report.keys == ["retrain.augmenter.name"]


def test_globs_are_expanded_and_report_dirs_skipped(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"ce-s{seed}", seed, {"stage 1": m(70.0 + seed)})
    (tmp_path / "ce-report").mkdir()
    found, skipped = expand_run_dirs([str(tmp_path / "ce-*"), str(tmp_path / "ce-s0")])
    assert found == [tmp_path / "ce-s0", tmp_path / "ce-s1"] and skipped == [tmp_path / "ce-report"]
    with pytest.raises(TailaugError, match="matches nothing"):
        expand_run_dirs([str(tmp_path / "nothing-*")])
    with pytest.raises(TailaugError) as info:
        build_report([tmp_path / "ce-report"])
    assert str(info.value) == (f"{tmp_path / 'ce-report'} holds no results.json, so it is not a finished run; "
                               "give run directories that 'tailaug run' or 'tailaug train' finished")


def test_report_command_writes_markdown_csv_json_and_figure(tmp_path, capsys):
    counts = [100, 50, 25, 12, 6]
    for seed in (0, 1):
        make_run(tmp_path / "runs", f"ce-s{seed}", seed,
                 {"stage 1": m(70.0 + seed, per_class=[90.0, 80.0, None, 20.0 + seed, 0.0], class_counts=counts)})
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "runs" / "*"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "70.50 ± 0.71" in printed and f"wrote {out / 'report.md'}" in printed
    assert "| stage 1 | 0, 1 | 2 | 70.50 ± 0.71 |" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["rows"][0]["runs"] == [
        str(tmp_path / "runs" / "ce-s0"), str(tmp_path / "runs" / "ce-s1")]
    assert (out / "report.csv").read_text().startswith("method,seeds,n,top1_mean,top1_std,")
    png = (out / "per_class_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    # default directory: report beside the runs (skipped by the glob next time)
    commands.report([str(tmp_path / "runs" / "ce-*")])
    assert (tmp_path / "runs" / "report" / "report.md").is_file()
    assert main(["report", str(tmp_path / "runs" / "*")]) == 0
    assert "skipped (no results.json):" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0", "0"], "--seeds lists a seed twice (0 0); give each seed once"),
    (["--seeds", "0", "run.seed=3"], "--seeds sets run.seed of each run; drop the override run.seed=3"),
    (["--seeds", "one"], "--seeds takes non-negative integers (e.g. --seeds 0 1 2), got 'one'"),
    (["--out", "x"], "--out names the report directory of --seeds; give --seeds too, or drop --out"),
])
def test_seeds_errors(args, message, capsys):
    assert main(["run", "configs/fmnist_lt/ce.yaml", *args]) == 2
    assert capsys.readouterr().err.strip() == f"tailaug: error: {message}"


def test_a_list_of_plain_values_is_one_setting(tmp_path):
    make_run(tmp_path, "a", 0, {"stage 1": m(70.0)})
    make_run(tmp_path, "b", 0, {"stage 1": m(71.0)}, ["data.class_order=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]"])
    report = build_report([tmp_path / "a", tmp_path / "b"])
    assert report.keys == ["data.class_order"]
    assert report.differ_line() == ("Rows of one method differ in `data.class_order`: null vs "
                                    "[1, 0, 2, 3, 4, 5, 6, 7, 8, 9].")
