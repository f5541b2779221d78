"""Result tables and atomic JSON output.

Numbers are printed with 2 decimals and "-" marks a missing value (None, nan or a key a
result lacks). ``mean_std_table`` reports mean ± the SAMPLE standard deviation (ddof=1)
over the runs (seeds) of a method; with a single run it prints the mean alone.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..engine.checkpoint import atomic_write_text, exception_summary
from ..errors import CheckpointError

DEFAULT_COLUMNS = ("top1", "many", "medium", "few", "ece")


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, (str, bool)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _cell(value: Any) -> str:
    """A number with two decimals, text as it is, "-" for a missing value."""
    if isinstance(value, str):
        return value
    x = _number(value)
    return "-" if x is None else f"{x:.2f}"


def _cells(rows: Iterable[tuple[str, dict]], columns: Sequence[str]) -> list[list[str]]:
    return [[str(name)] + [_cell(metrics.get(c)) for c in columns] for name, metrics in rows]


def format_table(rows: list[tuple[str, dict]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """An aligned plain-text table: a header row, a rule, one row per (method, metrics)."""
    return aligned_table(["method", *columns], _cells(rows, columns))


def aligned_table(header: list[str], body: list[list[str]]) -> str:
    """Text cells as an aligned plain-text table: the first column left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def markdown_grid(header: list[str], body: list[list[str]]) -> str:
    """Text cells as a Markdown table (the first column left-aligned, the rest right)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def markdown_table(rows: list[tuple[str, dict]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """The same table as :func:`format_table` in Markdown (numbers right-aligned)."""
    return markdown_grid(["method", *columns], _cells(rows, columns))


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (ddof=1), count) of the numbers among ``values``;
    missing values (None/nan/text) are skipped; std is None below two values, mean below one."""
    vals = [v for v in (_number(x) for x in values) if v is not None]
    mean = float(np.mean(vals)) if vals else None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return mean, std, len(vals)


def _mean_std_cell(values: Iterable[Any]) -> str:
    mean, std, _ = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


MEAN_STD_NOTE = "mean ± sample standard deviation (ddof=1) over runs; n = number of runs."


def mean_std_cells(results: dict[Any, list[dict]], columns: Sequence[str] = DEFAULT_COLUMNS,
                   labels: Sequence[str] = ("method",)) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of :func:`mean_std_table`: the label columns, ``n``, then
    "mean ± std" per column. A key of ``results`` is one label, or a tuple of one text per
    label column."""
    header = [*labels, "n", *columns]
    body = []
    for key, runs in results.items():
        names = [str(k) for k in key] if isinstance(key, tuple) else [str(key)]
        if len(names) != len(labels):
            raise ValueError(f"row {key!r} has {len(names)} labels for the label columns {list(labels)}")
        body.append([*names, str(len(runs)), *(_mean_std_cell(r.get(c) for r in runs) for c in columns)])
    return header, body


def mean_std_table(results: dict[Any, list[dict]], columns: Sequence[str] = DEFAULT_COLUMNS, *,
                   labels: Sequence[str] = ("method",), markdown: bool = True) -> str:
    """Markdown table of "mean ± std" per method and column over its runs (seeds).

    std is the sample standard deviation (ddof=1); a method with one run shows the mean
    alone. Missing values (None/nan) are skipped per column; "-" if none remain. The ``n``
    column is the number of runs. A note stating the std convention follows the table.
    ``labels`` names the columns before ``n`` (a key of ``results`` is then a tuple of
    texts); ``markdown=False`` gives an aligned plain-text table instead.
    """
    header, body = mean_std_cells(results, columns, labels)
    table = markdown_grid(header, body) if markdown else aligned_table(header, body)
    return f"{table}\n\n{MEAN_STD_NOTE}"


# --------------------------------------------------------------------------- JSON


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; numpy/torch values converted, nan/inf written as null."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (``atomic_write``): readers never see a half-written
    file. numpy/torch values are converted and nan/inf become null. Returns the path written.
    """
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=indent, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, *, fix: str, keys: Sequence[str] = ()) -> dict:
    """The JSON object in ``path`` (a stage output such as stage1.json), which must hold
    ``keys``; a CheckpointError naming the file and ``fix`` when it is unreadable, truncated,
    not an object or lacks a key."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exception_summary(exc)}); {fix}") from None
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(obj), "number")
        raise CheckpointError(f"{path} holds a JSON {kind}, not an object; {fix}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in missing)}; {fix}")
    return obj
