"""The bookkeeping of a transfer run's phases: each phase's report, ``RUN_DIR/phases.json``,
the phase tags of the combined history, and each phase's metrics loggers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.atomic import write_atomically
from cnnkit.progress import plain_lines
from cnnkit.training.callbacks import CsvLogger, TensorBoardLogger
from cnnkit.training.fit_loop import epoch_line
from cnnkit.training.trainer import Callback, FitResult

PHASES_NAME = "phases.json"

# The history tag of the frozen phase; fine-tune phases are tagged 2.0 and on.
FROZEN_PHASE = 1.0


@dataclass
class PhaseReport:
    """What one phase achieved (``None`` where there is no val split or no test score yet).

    Attributes:
        name: ``frozen`` or ``finetune``.
        epochs_run: epochs the phase trained.
        kept_epoch: the epoch whose weights the phase kept (the best on validation, or the last).
        val_accuracy: validation top-1 of the kept weights.
        test_top1, test_top5: test accuracy of the kept weights.
        seconds: the phase's wall time.
        details: timings and counts specific to the phase.
    """

    name: str
    epochs_run: int
    kept_epoch: int
    val_accuracy: float | None
    test_top1: float | None = None
    test_top5: float | None = None
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_fit(cls, name: str, fit: FitResult, has_val: bool, **fields: Any) -> PhaseReport:
        """The report of a trainer's fit; without a val split the last epoch is the one kept."""
        if has_val:
            return cls(name, fit.epochs_run, fit.best_epoch, fit.best_val_accuracy, **fields)
        return cls(name, fit.epochs_run, fit.epochs_run, None, **fields)


def phase_label(tag: float) -> str:
    """How a history row's ``phase`` tag reads: 1 frozen, 2 fine-tune, 3 on each further
    ensemble member's fine-tune."""
    if tag == FROZEN_PHASE:
        return "frozen"
    return "fine-tune" if tag == 2.0 else f"fine-tune {int(tag) - 1}"


def frozen_phase_line(fit: FitResult, epochs: int) -> str:
    """The frozen phase's one plain line: its epoch count and last epoch (``frozen 30 epochs,
    last: epoch 30/30: train_loss ...``). Its head trains for many quick epochs, whose lines
    would bury the fine-tune's."""
    last = epoch_line(fit.history[-1], epochs)
    return f"{phase_label(FROZEN_PHASE)} {len(fit.history)} epochs, last: {last}"


def frozen_line_printed_live(phases: tuple[str, ...], progress: bool) -> bool:
    """Whether a transfer run prints its frozen phase's line as that phase ends (output that is
    not a terminal, with a fine-tune to follow, whose epoch lines come as they end), so that a
    log lists the phases in the order they ran; otherwise the run's end lists it."""
    return "finetune" in phases and plain_lines(progress)


def phase_loggers(run_dir: Path, phase: str) -> list[Callback]:
    """A phase's metrics loggers: ``RUN_DIR/<phase>/metrics.csv`` and TensorBoard tags
    ``<phase>/`` in the run's shared ``RUN_DIR/tensorboard``."""
    return [
        CsvLogger(run_dir / phase / "metrics.csv"),
        TensorBoardLogger(run_dir / "tensorboard", prefix=f"{phase}/"),
    ]


def combine_fits(fits: list[tuple[float, FitResult]], seconds: float) -> FitResult:
    """One FitResult over the phases: epochs numbered on, each row tagged with its phase."""
    history: list[dict[str, float]] = []
    for phase, fit in fits:
        offset = len(history)
        history += [{**row, "epoch": offset + row["epoch"], "phase": phase} for row in fit.history]
    last_offset = len(history) - fits[-1][1].epochs_run
    last = fits[-1][1]
    return FitResult(
        history=history,
        best_epoch=last_offset + last.best_epoch,
        best_val_accuracy=last.best_val_accuracy,
        epochs_run=len(history),
        stopped_early=last.stopped_early,
        seconds=seconds,
    )


class PhaseLog:
    """The phases a transfer run has finished so far, in order: their fits (for the run's
    combined history) and their reports, which rank 0 rewrites to ``phases.json`` after each.
    """

    def __init__(self, run_dir: Path, writes: bool) -> None:
        self.run_dir = run_dir
        self.writes = writes
        self.fits: list[tuple[float, FitResult]] = []
        self.reports: list[PhaseReport] = []

    def add_phase(self, tag: float, fit: FitResult, report: PhaseReport) -> None:
        """Record a trained phase: its fit (tagged ``tag`` in the history) and its report."""
        self.fits.append((tag, fit))
        self.add_report(report)

    def add_report(self, report: PhaseReport) -> None:
        """Record a report that has no training history of its own (an ensemble's score)."""
        self.reports.append(report)
        if self.writes:
            save_phase_reports(self.run_dir, self.reports)


def save_phase_reports(run_dir: Path, reports: list[PhaseReport]) -> Path:
    """Write ``RUN_DIR/phases.json`` (one entry per phase, in order) atomically."""
    payload = {"phases": [dataclasses.asdict(report) for report in reports]}
    path = Path(run_dir) / PHASES_NAME
    _write_phases(path, payload)
    return path


def record_final_test(run_dir: Path, test_metrics: dict[str, float]) -> None:
    """Fill in the last phase's test figures in ``phases.json`` from the run's test report.

    The run scores the final model on the test split anyway; this saves scoring it twice.
    """
    path = Path(run_dir) / PHASES_NAME
    if not path.exists() or "top1" not in test_metrics:
        return
    payload = json.loads(path.read_text(encoding="utf-8"))
    last = payload["phases"][-1]
    last["test_top1"] = float(test_metrics["top1"])
    last["test_top5"] = float(test_metrics["top5"]) if "top5" in test_metrics else None
    _write_phases(path, payload)


def _write_phases(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
