"""A hyperparameter search's trials table: one :class:`TrialSummary` per trial, sorted by
validation accuracy and written as ``results.csv`` and ``results.md``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.atomic import write_atomically

RESULTS_CSV = "results.csv"
RESULTS_MARKDOWN = "results.md"
# The results tables' own columns besides the parameters' (results.md adds the rank): a
# parameter may not take one of these names, or its value and the result would share a cell.
RESULT_COLUMNS = (
    "rank",
    "trial",
    "state",
    "val_accuracy",
    "val_loss",
    "test_top1",
    "epochs_run",
    "seconds",
    "pruned",
    "repeats",
    "run_dir",
)


@dataclass
class TrialSummary:
    """One trial of a search as the results table shows it.

    Attributes:
        number: the trial's number in the study.
        state: ``complete``, ``pruned``, ``fail``, ``running`` or ``waiting``.
        params: hyperparameter name -> value.
        val_accuracy: best validation accuracy reached (for a pruned trial: before it stopped).
        val_loss: validation loss at that epoch.
        test_top1: test accuracy (finished trials only).
        epochs: epochs trained.
        seconds: wall time of the trial.
        run_dir: the trial's run folder.
        curve: ``(epoch, validation accuracy)`` points.
        repeats: the earlier trial with the same parameters whose result this one took
            instead of training again (None: it trained).
    """

    number: int
    state: str
    params: dict[str, Any]
    val_accuracy: float | None = None
    val_loss: float | None = None
    test_top1: float | None = None
    epochs: int = 0
    seconds: float | None = None
    run_dir: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)
    repeats: int | None = None

    @property
    def label(self) -> str:
        return f"trial-{self.number:03d}"

    def to_row(self, parameter_names: Sequence[str]) -> dict[str, Any]:
        """A flat dict for the CSV table."""
        return {
            "trial": self.number,
            "state": self.state,
            **{name: self.params.get(name) for name in parameter_names},
            "val_accuracy": self.val_accuracy,
            "val_loss": self.val_loss,
            "test_top1": self.test_top1,
            "epochs_run": self.epochs,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "pruned": self.state == "pruned",
            "repeats": self.repeats,
            "run_dir": self.run_dir,
        }


def sort_trials(trials: Sequence[TrialSummary]) -> list[TrialSummary]:
    """Best validation accuracy first; trials without one last."""

    def key(trial: TrialSummary) -> tuple[bool, float, int]:
        value = trial.val_accuracy
        missing = value is None or math.isnan(value)
        return (missing, 0.0 if missing else -value, trial.number)

    return sorted(trials, key=key)


_METRIC_COLUMNS = ("val_accuracy", "val_loss", "test_top1")


def _cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column in _METRIC_COLUMNS:
        return f"{value:.4f}"
    if column == "seconds":
        return f"{value:.0f}"
    return str(value).replace("|", "\\|")


def write_results_tables(
    trials: Sequence[TrialSummary], parameter_names: Sequence[str], out_dir: Path
) -> dict[str, str]:
    """Write ``results.csv`` and ``results.md``, sorted by validation accuracy.

    Returns:
        Table name -> file path.
    """
    rows = [trial.to_row(parameter_names) for trial in sort_trials(trials)]
    columns = list(rows[0]) if rows else ["trial", "state", *parameter_names, "val_accuracy"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    shown = [c for c in columns if c not in ("state", "run_dir")]
    lines = [
        "| rank | " + " | ".join(shown) + " |",
        "|" + "---|" * (len(shown) + 1),
        *(
            f"| {rank} | " + " | ".join(_cell(c, row[c]) for c in shown) + " |"
            for rank, row in enumerate(rows, start=1)
        ),
    ]
    files = {}
    markdown = "\n".join(lines) + "\n"
    for name, text in ((RESULTS_CSV, buffer.getvalue()), (RESULTS_MARKDOWN, markdown)):
        path = Path(out_dir) / name
        write_atomically(path, lambda p, text=text: p.write_text(text, encoding="utf-8"))
        files[name.split(".")[1]] = str(path)
    return files
