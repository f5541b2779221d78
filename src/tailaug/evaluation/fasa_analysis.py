"""FASA's per-class sampling rates (and validation losses) over the epochs of stage 3 and,
when it ran during representation learning (train.feature_augmenter), of stage 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import TailaugError
from .report import markdown_table, read_json


def analyze_fasa(run_dir: Path, out: Path) -> dict:
    """Plot the sampling rates and validation losses per class that every FASA stage-3 run of
    ``run_dir`` recorded (``retrain/*-fasa-*.json``) to ``out/fasa_rates[-KEY].png`` (the
    newest without a key), and those of stage 1 (``metrics.jsonl``) to ``fasa_rates_stage1.png``."""
    run_dir = Path(run_dir)
    paths = sorted((run_dir / "retrain").glob("*-fasa-*.json"), key=lambda p: p.stat().st_mtime)
    stage1 = _stage1_history(run_dir / "metrics.jsonl")
    if not paths and not stage1:
        raise TailaugError(f"{run_dir} holds no FASA run (no retrain/*-fasa-*.json, no FASA rates in metrics.jsonl); "
                           "run 'tailaug run CONFIG \"retrain.augmenter={name: fasa}\"' with the run's config first")
    report = {}
    if stage1:
        report["stage 1"] = _plot(stage1, Path(out) / "fasa_rates_stage1.png", "stage 1", "metrics.jsonl")
    for n, path in enumerate(paths):
        record = read_json(path, fix="delete it and its .safetensors to train this stage-3 classifier again",
                           keys=("history",))
        history = [h for h in record["history"] if "fasa_rates" in h]
        if not history:
            raise TailaugError(f"{path} records no FASA sampling rates; delete it and its .safetensors and rerun")
        name = "fasa_rates.png" if n == len(paths) - 1 else f"fasa_rates-{path.stem.split('-')[-1]}.png"
        report[path.name] = _plot(history, Path(out) / name, record.get("label", path.stem), path.name)
    return report


def _stage1_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a half-written last line of a killed run
            continue
    return [r for r in records if "fasa_rates" in r]


def _plot(history: list[dict], png: Path, label: str, source: str) -> dict:
    from .plots import plot_class_curves

    rates = np.array([h["fasa_rates"] for h in history])
    losses = np.array([h["fasa_val_loss"] for h in history])
    png = plot_class_curves(rates, png, ylabel="sampling rate", second=losses, second_label="validation loss",
                            title=f"FASA sampling rates per class ({label})")
    last = [(f"class {c}", {"rate": float(rates[-1, c]), "val loss": float(losses[-1, c])})
            for c in range(rates.shape[1])]
    print(f"{source}: last epoch\n{markdown_table(last, columns=['rate', 'val loss'])}")
    print(f"wrote {png}")
    return {"png": str(png), "rates": rates.tolist(), "val_loss": losses.tolist()}
