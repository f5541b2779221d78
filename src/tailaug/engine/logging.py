"""Metrics to ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per record; keeps TensorBoard in step.

    On resume, records from the epoch being re-run (and later) are dropped first, so the
    file reads as if the run had never stopped.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resume_epoch: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_epoch is not None and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", -1) < resume_epoch
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
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
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
