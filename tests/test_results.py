"""results.json: one schema, rows merged, the code version and resolved choices recorded."""

import json
from importlib.metadata import version

import pytest

import tailaug
from tailaug.errors import TailaugError
from tailaug.evaluation.results import code_version, read_results, record_results, result_row


def row(top1, **choices):
    return result_row({"top1": top1}, key="k", settings={"ece_bins": 15}, choices=choices)


def test_rows_are_merged_not_replaced(tmp_path):
    record_results(tmp_path, {"stage 1": row(50.0), "cRT": row(60.0)})
    record_results(tmp_path, {"stage 1": row(51.0, epoch=3)})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["schema"] == 1 and list(saved["rows"]) == ["stage 1", "cRT"]
    assert saved["rows"]["stage 1"]["metrics"] == {"top1": 51.0}
    assert saved["rows"]["stage 1"]["choices"] == {"epoch": 3}
    assert saved["rows"]["cRT"]["metrics"] == {"top1": 60.0}
    assert read_results(tmp_path) == saved["rows"]


def test_a_row_names_its_key_settings_and_code_version():
    r = result_row({"top1": 1.0}, key="abc", settings={"ece_bins": 10}, choices={"tau": 1.2})
    assert r == {"metrics": {"top1": 1.0}, "key": "abc", "eval": {"ece_bins": 10}, "choices": {"tau": 1.2},
                 "tailaug_version": code_version()}


def test_code_version(monkeypatch):
    assert code_version() == version("tailaug")
    monkeypatch.setattr(tailaug, "__version__", "9.9.9", raising=False)
    assert code_version() == "9.9.9"


@pytest.mark.parametrize("text, problem", [
    ('{"stage1": {"top1": 1.0}}', "not a tailaug results file of schema 1"),
    ('{"schema": 1, "rows": {', "cannot be read"),
    ("[1, 2]", "holds a JSON array, not an object; move it away"),
])
def test_a_results_file_that_cannot_be_merged_is_refused_untouched(tmp_path, text, problem):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(TailaugError, match=problem):
        record_results(tmp_path, {"stage 1": row(1.0)})
    assert (tmp_path / "results.json").read_text() == text


def test_no_results_file_means_no_rows(tmp_path):
    assert read_results(tmp_path) == {}
