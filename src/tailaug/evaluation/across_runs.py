"""Reports across runs: mean and sample std over seeds per method, never across settings.

Every row of every run's ``results.json`` (``"stage 1"``, ``"cRT"``, ``"cRT + STG ..."``) is
compared on the settings it depends on (:func:`row_settings`, flattened to dotted keys such
as ``train.loss.0.name``):

- the run's ``config.yaml`` without the seeds and the fields that only say where or how fast
  a run ran (:data:`NOT_SETTINGS`: ``run.name``, ``run.output_dir``, ``data.root``, ...);
- the evaluation settings the row was scored with (its ``eval`` entry: ``data.shots.*``,
  ``eval.*``), which ``tailaug evaluate`` may have changed after config.yaml was written;
- for the stage-1 row nothing of stages 2-3 (``features``, ``stg``, ``retrain``);
- for a stage-3 row its own classifier's settings from ``retrain/<...>-<key>.json`` (the
  options the classifier read, its augmenter, head set and grid) instead of config.yaml's
  ``retrain`` section, which holds the last command's; ``stg`` only when its augmenter used
  the generator. Without that record, config.yaml's ``retrain`` section is compared.

Rows of the same name and settings form a group; their metrics are averaged over the seeds
(``run.seed``, and the stage-3 seed). Two runs of a group with the same seed are the same
measurement and are counted once. The keys whose values differ between groups of one method
are the report's distinguishing keys (an option of a named method, ``train.loss.0.label_smoothing``,
is left out when it only differs together with the method's ``name``).
"""

from __future__ import annotations

import csv
import glob
import io
import os
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..engine.checkpoint import atomic_write_text
from ..errors import TailaugError
from .report import (DEFAULT_COLUMNS, MEAN_STD_NOTE, aligned_table, markdown_grid, mean_std, mean_std_cells,
                     read_json, write_json)
from .results import STAGE1, read_results, results_path

# config fields that are seeds or say where / how fast a run ran: never a reason to keep runs apart
NOT_SETTINGS = (
    "run.seed", "run.name", "run.output_dir", "run.device", "run.threads", "retrain.seed",
    "data.root", "data.download", "data.num_workers", "train.eval_batch_size", "train.channels_last",
    "features.batch_size", "features.shard_rows",
)
STAGE3_SECTIONS = ("features", "stg", "retrain")
MISSING = "–"  # a key the row does not depend on or the config does not set
REPORT_SCHEMA = 1


def _nested(value: Any) -> bool:
    """A mapping, or a list holding one (such as train.loss): flattened further; a list of
    plain values (data.class_order, a grid's values) stays one value."""
    return (isinstance(value, dict) and bool(value)) or (
        isinstance(value, list) and any(isinstance(v, dict) for v in value))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the leaves of nested mappings and lists of mappings (items by index, as
    overrides write them: ``train.loss.0.name``)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out: dict[str, Any] = {}
    for name, value in items:
        if _nested(value):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _without(tree: dict[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if not any(k == p or k.startswith(p + ".") for p in prefixes)}


# --------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """One run directory: its config (as written, a plain dict) and results.json rows."""

    path: Path
    config: dict
    rows: dict[str, dict]

    @property
    def seed(self) -> int:
        return int(self.config.get("run", {}).get("seed", 0))


def load_run(path: str | Path) -> Run:
    """The config and rows of a run directory; a one-line error naming what is missing."""
    import yaml

    path = Path(path)
    config_path = path / "config.yaml"
    if not path.is_dir():
        raise TailaugError(f"{path} is not a directory; give run directories that 'tailaug run' or "
                           "'tailaug train' wrote (globs such as runs/ce-s* are expanded)")
    if not results_path(path).is_file() or not config_path.is_file():
        missing = "results.json" if not results_path(path).is_file() else "config.yaml"
        raise TailaugError(f"{path} holds no {missing}, so it is not a finished run; give run directories "
                           "that 'tailaug run' or 'tailaug train' finished")
    rows = read_results(path)
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TailaugError(f"{config_path} cannot be read as YAML ({type(exc).__name__}); restore it (the run "
                           "writes it again when it finishes)") from None
    if not isinstance(config, dict):
        raise TailaugError(f"{config_path} does not hold a config mapping; restore it (the run writes it again "
                           "when it finishes)")
    config.pop("base", None)
    return Run(path, config, rows)


def expand_run_dirs(patterns: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(run directories, skipped paths) of the arguments in the order given: a glob pattern
    (``*``, ``?``, ``[``) is expanded here, sorted, and its matches that hold no results.json
    (such as a report directory) are skipped; a plain path is kept as it is, and a path given
    twice once."""
    found: list[Path] = []
    skipped: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern))]
            if not matches:
                raise TailaugError(f"{pattern} matches nothing; give run directories or a glob that matches some")
            for m in matches:
                (found if results_path(m).is_file() else skipped).append(m)
        else:
            found.append(Path(pattern))
    seen: set[Path] = set()
    unique = []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    if not unique:
        raise TailaugError(f"none of {' '.join(patterns)} is a finished run directory (none holds results.json)")
    return unique, skipped


def retrain_record_path(run_dir: Path, key: Any) -> Path | None:
    """The stage-3 record ``retrain/<method>-<augmenter>-<key>.json`` of a row's key, or None."""
    if not isinstance(key, str) or not key:
        return None
    found = sorted((Path(run_dir) / "retrain").glob(f"*-{glob.escape(key)}.json"))
    return found[0] if found else None


def _retrain_record(run: Run, row: dict) -> dict | None:
    """The settings in the stage-3 record the row was scored from, or None."""
    path = retrain_record_path(run.path, row.get("key"))
    if path is None:
        return None
    record = read_json(path, fix="delete it and its .safetensors and run the run again")
    return record["config"] if isinstance(record.get("config"), dict) else None


def row_settings(run: Run, name: str, row: dict) -> dict[str, Any]:
    """The dotted settings a row depends on besides its seeds (see the module docstring)."""
    config = _without(flatten(run.config), NOT_SETTINGS)
    scored = row.get("eval") or {}
    if scored:  # what the row was scored with wins over config.yaml (evaluate may have changed it)
        config = _without(config, ("data.shots", "eval"))
        config.update(flatten({"data": {"shots": scored.get("shots", {})},
                               "eval": {k: v for k, v in scored.items() if k != "shots"}}))
    if name == STAGE1:
        return _without(config, STAGE3_SECTIONS)
    record = _retrain_record(run, row)
    if record is None:
        return config
    retrain = flatten({"retrain": {k: v for k, v in record.items() if k not in ("seed", "generator")}})
    drop = ("retrain",) if "generator" in record else ("retrain", "stg")
    return {**_without(config, drop), **retrain}


def row_seed(run: Run, name: str, row: dict) -> str:
    """The seed of a row as text: ``run.seed``, with the stage-3 seed after a slash when it differs."""
    seed = run.seed
    stage3 = (row.get("choices") or {}).get("seed") if name != STAGE1 else None
    return str(seed) if stage3 is None or stage3 == seed else f"{seed}/{stage3}"


# --------------------------------------------------------------------------- grouping


@dataclass
class Member:
    run: Path
    seed: str
    metrics: dict


@dataclass
class Group:
    """The rows of one method with one set of settings: one row of the report."""

    method: str
    settings: dict[str, Any]
    members: list[Member] = field(default_factory=list)

    def values(self, column: str) -> list:
        return [m.metrics.get(column) for m in self.members]


def group_rows(runs: Sequence[Run]) -> tuple[list[Group], list[str]]:
    """Groups in the order their first row appears (runs in the order given, rows in
    results.json order), and notes on duplicate measurements counted once."""
    groups: list[Group] = []
    notes: list[str] = []
    for run in runs:
        for name, row in run.rows.items():
            settings = row_settings(run, name, row)
            group = next((g for g in groups if g.method == name and g.settings == settings), None)
            if group is None:
                group = Group(name, settings)
                groups.append(group)
            seed = row_seed(run, name, row)
            twin = next((m for m in group.members if m.seed == seed), None)
            if twin is not None:
                notes.append(f"{name!r} of {run.path} has the settings and seed {seed} of {twin.run}: counted once")
                continue
            group.members.append(Member(run.path, seed, row.get("metrics") or {}))
    return groups, notes


def distinguishing_keys(groups: Sequence[Group]) -> list[str]:
    """The setting keys whose values differ between groups of the same method, in config order;
    an option ``P.x`` of a named entry ``P`` is left out when it never differs between groups
    with the same ``P.name`` (the option only comes and goes with the method)."""
    keys: list[str] = []
    methods = {g.method for g in groups}
    for method in methods:
        same = [g for g in groups if g.method == method]
        for g in same:
            for k in g.settings:
                if k not in keys and len({repr(o.settings.get(k, MISSING)) for o in same}) > 1:
                    keys.append(k)
    order = {k: i for g in groups for i, k in enumerate(g.settings)}
    keys.sort(key=lambda k: (order.get(k, len(order)), k))

    def follows_name(key: str) -> bool:
        parent, _, last = key.rpartition(".")
        name_key = f"{parent}.name"
        if last == "name" or name_key not in keys:
            return False
        for method in methods:
            by_name: dict[str, set] = {}
            for g in groups:
                if g.method == method:
                    by_name.setdefault(repr(g.settings.get(name_key)), set()).add(repr(g.settings.get(key, MISSING)))
            if any(len(v) > 1 for v in by_name.values()):
                return False
        return True

    return [k for k in keys if not follows_name(k)]


def _text(value: Any) -> str:
    """A setting as YAML would write it, briefly: null, true, 0.001, [1, 8, 9], {name: ce}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def key_values(groups: Sequence[Group], key: str) -> list[str]:
    """The values ``key`` takes among ``groups``, in order of appearance."""
    out: list[str] = []
    for g in groups:
        v = _text(g.settings[key]) if key in g.settings else MISSING
        if v not in out:
            out.append(v)
    return out


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    runs: list[Path]
    groups: list[Group]
    keys: list[str]
    notes: list[str]
    columns: tuple[str, ...] = DEFAULT_COLUMNS

    def labels(self, g: Group) -> tuple[str, ...]:
        """The text of the label columns of a group: method, distinguishing values, seeds."""
        values = [_text(g.settings[k]) if k in g.settings else MISSING for k in self.keys]
        return (g.method, *values, ", ".join(m.seed for m in g.members))

    @property
    def label_columns(self) -> list[str]:
        return ["method", *self.keys, "seeds"]

    def _by_labels(self) -> dict[tuple[str, ...], list[dict]]:
        return {self.labels(g): [m.metrics for m in g.members] for g in self.groups}

    def differ_line(self) -> str:
        if not self.keys:
            return "The runs differ in nothing but the seed."
        parts = [f"`{k}`: {' vs '.join(key_values(self.groups, k))}" for k in self.keys]
        missing = any(MISSING in self.labels(g)[1:-1] for g in self.groups)
        return ("Rows of one method differ in " + "; ".join(parts)
                + (f" ({MISSING}: not a setting of the row)." if missing else "."))

    def text(self) -> str:
        """The table for a terminal."""
        header, body = mean_std_cells(self._by_labels(), self.columns, self.label_columns)
        return "\n".join([aligned_table(header, body), "", self.differ_line(), MEAN_STD_NOTE, *self.notes])

    def markdown(self) -> str:
        header, body = mean_std_cells(self._by_labels(), self.columns, self.label_columns)
        runs = ", ".join(f"`{p}`" for p in self.runs)
        lines = [f"# Report over {len(self.runs)} runs", "", f"Runs: {runs}.", "", markdown_grid(header, body), "",
                 self.differ_line(), "", MEAN_STD_NOTE]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*self.label_columns, "n", *(f"{c}_{s}" for c in self.columns for s in ("mean", "std")),
                         "runs"])
        for g in self.groups:
            stats = [mean_std(g.values(c))[:2] for c in self.columns]
            cells = ["" if x is None else f"{x:.4f}" for pair in stats for x in pair]
            writer.writerow([*self.labels(g), len(g.members), *cells, ";".join(str(m.run) for m in g.members)])
        return out.getvalue()

    def as_json(self) -> dict:
        rows = []
        for g in self.groups:
            stats = {}
            for c in self.columns:
                mean, std, n = mean_std(g.values(c))
                stats[c] = {"mean": mean, "std": std, "n": n, "values": g.values(c)}
            rows.append({"method": g.method, "distinguishing": {k: g.settings.get(k) for k in self.keys},
                         "n": len(g.members), "seeds": [m.seed for m in g.members],
                         "runs": [str(m.run) for m in g.members], "metrics": stats, "settings": g.settings})
        return {"schema": REPORT_SCHEMA, "runs": [str(p) for p in self.runs], "distinguishing_keys": self.keys,
                "std": "sample standard deviation (ddof=1) over the seeds", "notes": self.notes, "rows": rows}


def build_report(run_dirs: Sequence[str | os.PathLike]) -> Report:
    runs = [load_run(p) for p in run_dirs]
    groups, notes = group_rows(runs)
    if not groups:
        raise TailaugError(f"the results.json of {', '.join(str(r.path) for r in runs)} hold no rows; finish "
                           "the runs first")
    return Report([r.path for r in runs], groups, distinguishing_keys(groups), notes)


def class_counts_of(run_dir: Path, metrics: dict) -> list[int]:
    """Training images per class of a row: recorded with its metrics, else from the run's config."""
    if metrics.get("class_counts"):
        return list(metrics["class_counts"])
    from ..config import load_config
    from ..data.datasets import planned_counts

    return planned_counts(load_config(Path(run_dir) / "config.yaml", saved=True).data)


def plot_report(report: Report, out: Path) -> list[Path]:
    """Per-class accuracy against training images: one panel per setting (the values of the
    distinguishing keys), one line per method (mean over seeds, band ± sample std)."""
    import numpy as np

    from .plots import plot_per_class_lines

    panels: dict[str, list] = {}
    for g in report.groups:
        per_class = [m.metrics.get("per_class") for m in g.members]
        if not per_class or any(p is None for p in per_class):
            continue
        acc = np.array([[np.nan if a is None else a for a in p] for p in per_class], dtype=float)
        counts = class_counts_of(g.members[0].run, g.members[0].metrics)
        with warnings.catch_warnings():  # a class without test images in every seed: nan, left out
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(acc, axis=0)
            std = np.nanstd(acc, axis=0, ddof=1) if len(acc) > 1 else None
        setting = ", ".join(f"{k}={v}" for k, v in zip(report.keys, report.labels(g)[1:-1]) if v != MISSING)
        panels.setdefault(setting, []).append((f"{g.method} (n={len(acc)})", counts, mean, std))
    if not panels:
        return []
    shots = report.groups[0].settings
    title = "Test accuracy per class against its training images (mean ± std over seeds)"
    path = plot_per_class_lines([(textwrap.fill(t, 70) or None, s) for t, s in panels.items()],
                                out / "per_class_accuracy.png", many=int(shots.get("data.shots.many", 100)),
                                few=int(shots.get("data.shots.few", 20)), title=title)
    return [path]


def write_report(report: Report, out: str | os.PathLike) -> list[Path]:
    """report.md, report.csv, report.json and the per-class figure in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write_text(out / "report.md", report.markdown()),
             atomic_write_text(out / "report.csv", report.csv()),
             write_json(out / "report.json", report.as_json())]
    return paths + plot_report(report, out)
