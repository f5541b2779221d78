"""FASA's per-class sampling rates (and validation losses) over the stage-3 epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TailaugError
from .report import markdown_table, read_json


def analyze_fasa(run_dir: Path, out: Path) -> dict:
    """Plot the sampling rates and validation losses per class that every FASA stage-3 run of
    ``run_dir`` recorded (``retrain/*-fasa-*.json``) to ``out/fasa_rates[-N].png``."""
    from .plots import plot_class_curves

    paths = sorted((Path(run_dir) / "retrain").glob("*-fasa-*.json"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise TailaugError(f"{run_dir} holds no FASA stage-3 run (no retrain/*-fasa-*.json); run 'tailaug run "
                           "CONFIG \"retrain.augmenter={name: fasa}\"' with the run's config first")
    report = {}
    for n, path in enumerate(paths):
        record = read_json(path, fix="delete it and its .safetensors to train this stage-3 classifier again",
                           keys=("history",))
        history = [h for h in record["history"] if "fasa_rates" in h]
        if not history:
            raise TailaugError(f"{path} records no FASA sampling rates; delete it and its .safetensors and rerun")
        rates = np.array([h["fasa_rates"] for h in history])
        losses = np.array([h["fasa_val_loss"] for h in history])
        name = "fasa_rates.png" if n == len(paths) - 1 else f"fasa_rates-{path.stem.split('-')[-1]}.png"
        png = plot_class_curves(rates, Path(out) / name, ylabel="sampling rate", second=losses,
                                second_label="validation loss",
                                title=f"FASA sampling rates per class ({record.get('label', path.stem)})")
        last = [(f"class {c}", {"rate": float(rates[-1, c]), "val loss": float(losses[-1, c])})
                for c in range(rates.shape[1])]
        print(f"{path.name}: last epoch\n{markdown_table(last, columns=['rate', 'val loss'])}")
        print(f"wrote {png}")
        report[path.name] = {"png": str(png), "rates": rates.tolist(), "val_loss": losses.tolist()}
    return report
