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
    header = ["method", *columns]
    body = _cells(rows, columns)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def markdown_table(rows: list[tuple[str, dict]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """The same table as :func:`format_table` in Markdown (numbers right-aligned)."""
    return _markdown(["method", *columns], _cells(rows, columns))


def mean_std_table(results: dict[str, list[dict]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """Markdown table of "mean ± std" per method and column over its runs (seeds).

    std is the sample standard deviation (ddof=1); a method with one run shows the mean
    alone. Missing values (None/nan) are skipped per column; "-" if none remain. The ``n``
    column is the number of runs. A note stating the std convention follows the table.
    """
    header = ["method", "n", *columns]
    body = []
    for name, runs in results.items():
        row = [str(name), str(len(runs))]
        for c in columns:
            vals = [v for v in (_number(r.get(c)) for r in runs) if v is not None]
            if not vals:
                row.append("-")
            elif len(vals) == 1:
                row.append(f"{vals[0]:.2f}")
            else:
                row.append(f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}")
        body.append(row)
    note = "\n\nmean ± sample standard deviation (ddof=1) over runs; n = number of runs."
    return _markdown(header, body) + note


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
