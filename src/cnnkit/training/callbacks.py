"""Trainer callbacks: the hooks a :class:`~cnnkit.training.trainer.Trainer` calls, and the
metrics CSV and TensorBoard scalars written through them (rank 0 only)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from cnnkit.atomic import write_atomically

if TYPE_CHECKING:  # The trainer imports this module for its hooks.
    from cnnkit.training.fit_state import FitResult
    from cnnkit.training.trainer import Trainer

METRICS_NAME = "metrics.csv"


class Callback:
    """Hooks called by :class:`Trainer`; override the ones you need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once before the first epoch (after resuming)."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called on every process after each epoch with that epoch's metrics row."""

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """Called once after training ends normally."""

    def teardown(self, trainer: Trainer) -> None:
        """Called once when ``fit`` returns or raises (Ctrl-C, a pruned trial): free resources."""


def write_metrics_csv(path: Path, rows: list[dict[str, float]]) -> None:
    """Write ``rows`` (one per epoch; columns in first-seen order) to ``path`` atomically, so
    a crash mid-write leaves the previous file whole."""
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(Path(path), write)


class CsvLogger(Callback):
    """Appends one row per epoch to ``RUN_DIR/metrics.csv`` (rewritten whole on resume).

    The columns are the trainer's row (see :meth:`Trainer.train_epoch`); ``learning_rate`` is
    the rate of the epoch's first optimizer step, as in TensorBoard.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.distributed.is_main:
            # The trainer's history includes resumed epochs, so the file never loses them.
            write_metrics_csv(self.path, trainer.history)


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
