"""The README's "Embeddings" and "Python (scikit-learn)" sections, run as written.

The shell and Python blocks are read from README.md itself, so the README cannot drift
from what works: make the example data, ``tailaug run`` the example config, ``tailaug
predict`` on its test file, then the two Python snippets (``tailaug.load`` and the
scikit-learn / imbalanced-learn one).
"""

from __future__ import annotations

import csv
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from tailaug.cli import main

REPO = Path(__file__).resolve().parents[1]


def section_blocks(title: str) -> dict[str, list[str]]:
    """The fenced code blocks of one ``## title`` section of the README, by language."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for lang, code in re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S):
        blocks.setdefault(lang, []).append(code)
    return blocks


def run_shell_line(line: str) -> None:
    """One README command: ``.../python SCRIPT`` or ``tailaug ...`` (comments dropped)."""
    argv = shlex.split(line, comments=True)
    if argv[0].endswith("python"):
        saved = sys.argv
        sys.argv = argv[1:]
        try:
            runpy.run_path(str(REPO / argv[1]), run_name="__main__")
        finally:
            sys.argv = saved
        return
    assert argv[0] == "tailaug", line
    args = [str(REPO / a) if a.startswith("configs/") else a for a in argv[1:]]
    assert main([*args, "--no-progress"]) == 0, line


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A fresh working directory in which the README's embeddings commands have run."""
    where = tmp_path_factory.mktemp("readme")
    (shell,) = section_blocks("Embeddings")["bash"]
    lines = [ln for ln in shell.splitlines() if ln.strip()]
    assert [shlex.split(ln)[0] for ln in lines] == [".venv/bin/python", "tailaug", "tailaug"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        for line in lines:
            run_shell_line(line)
    return where


def test_the_embeddings_commands_work_as_written(user_dir):
    with open(user_dir / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1000 and rows[0]["input"] == "data/embeddings/test.npz:0"
    assert (user_dir / "runs" / "embeddings_example" / "results.json").is_file()
    accuracy = sum(r["class"] == r["true_class"] for r in rows) / len(rows)
    assert accuracy > 0.5, accuracy  # 10 classes: chance is 0.1


def test_the_python_snippets_work_as_written(user_dir, monkeypatch, capsys):
    monkeypatch.chdir(user_dir)
    (load_snippet,) = section_blocks("Embeddings")["python"]
    (sklearn_snippet,) = section_blocks("Python (scikit-learn)")["python"]
    loaded: dict = {}
    exec(compile(load_snippet, "README.md", "exec"), loaded)
    assert loaded["probs"].shape == (1000, 10)
    fitted: dict = {}
    exec(compile(sklearn_snippet, "README.md", "exec"), fitted)
    x_test, y_test = fitted["X_test"], fitted["y_test"]
    for name in ("clf", "pipe"):
        score = fitted[name].score(x_test, y_test)
        assert score > 0.5, (name, score)
