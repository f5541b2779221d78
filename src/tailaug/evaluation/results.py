"""``results.json`` of a run directory: one schema, one writer, rows merged.

    {
      "schema": 1,
      "rows": {
        "stage 1": {
          "metrics": {"top1": ..., "many": ..., "per_class": [...], ...},
          "key": "<key of the artefact scored>",
          "eval": {"shots": {"many": 100, "few": 20}, "ece_bins": 15, "logit_adjust_tau": 0.0},
          "choices": {...what was resolved at run time, e.g. the tau chosen on validation...},
          "tailaug_version": "0.1.0"
        },
        "cRT": {...}
      }
    }

Rows are named by method ("stage 1", "cRT", "cRT + STG (lambda 1.5)", ...). Writing a row
replaces the row of that name and keeps every other one, so ``tailaug evaluate`` (stage 1)
never erases the stage-3 rows of ``tailaug run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import TailaugError
from .report import read_json, write_json

SCHEMA = 1
STAGE1 = "stage 1"


def code_version() -> str:
    """The installed tailaug version (``tailaug.__version__`` when the package sets one)."""
    import tailaug

    version = getattr(tailaug, "__version__", None)
    if version:
        return str(version)
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("tailaug")
    except PackageNotFoundError:
        return "unknown"


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "results.json"


def read_results(run_dir: str | Path) -> dict[str, dict]:
    """The rows of ``run_dir/results.json`` ({} when there is none yet).

    Raises a :class:`TailaugError` when the file exists but is not a results file of this
    schema, so that a command fails before it computes anything rather than overwrite it.
    """
    path = results_path(run_dir)
    if not path.exists():
        return {}
    data = read_json(path, fix="move it away and run the command again (nothing was changed)")
    if not (data.get("schema") == SCHEMA and isinstance(data.get("rows"), dict)):
        raise TailaugError(f"{path} is not a tailaug results file of schema {SCHEMA} (an older version or "
                           "another program wrote it); move it away and run the command again (nothing was "
                           "changed)")
    return data["rows"]


def result_row(metrics: dict, *, key: str, settings: dict, choices: dict | None = None) -> dict[str, Any]:
    return {"metrics": metrics, "key": key, "eval": settings, "choices": choices or {},
            "tailaug_version": code_version()}


def record_results(run_dir: str | Path, rows: dict[str, dict]) -> Path:
    """Merge ``rows`` (name -> :func:`result_row`) into ``run_dir/results.json`` atomically."""
    merged = {**read_results(run_dir), **rows}
    return write_json(results_path(run_dir), {"schema": SCHEMA, "rows": merged})
