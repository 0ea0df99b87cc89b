"""Trainer callbacks: metrics CSV and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import csv
from pathlib import Path

from cnnkit.training.trainer import Callback, Trainer

METRICS_NAME = "metrics.csv"


class CsvLogger(Callback):
    """Appends one row per epoch to ``RUN_DIR/metrics.csv`` (rewritten whole on resume)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _write(self, rows: list[dict[str, float]]) -> None:
        if not rows:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.distributed.is_main:
            # The trainer's history includes resumed epochs, so the file never loses them.
            self._write(trainer.history)


class TensorBoardLogger(Callback):
    """Writes every numeric metric as a scalar under ``RUN_DIR/tensorboard``."""

    def __init__(self, log_dir: Path, prefix: str = "") -> None:
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self.writer = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.distributed.is_main and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        step = int(metrics["epoch"])
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{self.prefix}{key}", value, step)
        self.writer.flush()

    def teardown(self, trainer: Trainer) -> None:
        # Also after a pruned trial or Ctrl-C: each open writer holds a file and a thread.
        if self.writer is not None:
            self.writer.close()
            self.writer = None
