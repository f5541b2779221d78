"""The README run as written: the "Embeddings" and "Python (scikit-learn)" sections, and every
switch of the "Methods at a glance" table.

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
from tailaug.config import load_config

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


def method_switches() -> list[tuple[str, str]]:
    """(method, override) for every backticked ``key=value`` of the README's methods table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split("\n## Methods at a glance\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    switches = [(row[0].strip("| "), re.findall(r"`([^`=]+=[^`]+)`", row[2])) for row in rows]
    assert all(found for _, found in switches), [m for m, found in switches if not found]  # a row without a switch
    return [(method, switch) for method, found in switches for switch in found]


def test_the_methods_table_lists_every_method_of_the_sources():
    methods = " ".join(m for m, _ in method_switches())
    for name in ("STG", "FSA", "FASA", "ISDA", "MetaSAug", "RSG", "Remix", "LDAM", "balanced softmax", "cRT", "LWS"):
        assert name in methods, name


@pytest.mark.parametrize("method, switch", method_switches(), ids=[s for _, s in method_switches()])
def test_every_switch_of_the_methods_table_is_a_valid_override(method, switch):
    """Each switch, on the Fashion-MNIST-LT base config (with a validation split, which some need, and
    mixup where the switch is Remix's), loads and sets what it says."""
    extra = ["data.val_per_class=20"] + (["train.mixup_alpha=1.0"] if switch.startswith("train.remix") else [])
    cfg = load_config(REPO / "configs" / "fmnist_lt" / "base.yaml", [*extra, switch])
    key, value = switch.split("=", 1)
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    node = node[0] if isinstance(node, list) else node  # train.loss: a list of terms
    if "name:" in value:
        assert node.name == re.search(r"name: (\w+)", value).group(1)
