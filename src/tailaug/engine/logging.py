"""Metrics to ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import atomic_write_text


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) per line of a metrics.jsonl file. A last line that is not a JSON object
    is a write cut short and is skipped; any other such line is an error naming it."""
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        elif i < len(lines) - 1:
            raise CheckpointError(f"{path} line {number} is not a JSON record; delete that line (or the file, "
                                  "losing the metrics of earlier epochs) and resume again")
    return records


class MetricsLogger:
    """Appends one JSON object per record; keeps TensorBoard in step (a number is one curve
    named by its key, a list of numbers one curve per index under ``key/``, e.g. the
    per-class accuracies ``val_per_class/03``).

    On resume, records from the epoch being re-run (and later) are dropped first, so the
    file reads as if the run had never stopped; so is a last line cut short (what a killed
    process can leave).
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resume_epoch: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_epoch is not None and self.path.exists():
            kept = [line for line, record in read_records(self.path) if record.get("epoch", -1) < resume_epoch]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_epoch is None and self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
                self.writer.add_scalar(key, value, step)
            elif isinstance(value, list):  # one value per class: one curve each, under the key
                width = len(str(len(value) - 1))
                for i, v in enumerate(value):
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{key}/{i:0{width}d}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
