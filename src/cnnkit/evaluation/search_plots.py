"""A hyperparameter search's results: the trials table (CSV, Markdown) and its PNG figures.

Figures: every trial's learning curve on one chart, accuracy against each hyperparameter, and
parameter importances.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from cnnkit.atomic import write_atomically
from cnnkit.config import is_number
from cnnkit.evaluation.plots import _plain, _save, plt

RESULTS_CSV = "results.csv"
RESULTS_MARKDOWN = "results.md"
CURVES_PNG = "learning_curves.png"
PARAMETERS_PNG = "accuracy_by_parameter.png"
IMPORTANCES_PNG = "param_importances.png"

_COMPLETE, _PRUNED = "tab:blue", "0.65"
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


def plot_trial_curves(
    curves: dict[str, list[tuple[int, float]]],
    pruned: set[str],
    path: Path,
    metric: str = "val_accuracy",
    labelled: int = 8,
) -> Path:
    """All trials' ``metric`` per epoch on one chart; pruned trials are thin and grey.

    Args:
        curves: trial label -> ``(epoch, value)`` points.
        pruned: labels of the pruned trials.
        path: where the PNG goes.
        metric: the axis label.
        labelled: how many of the best finished trials get a legend entry.
    """
    figure, axes = plt.subplots(figsize=(8, 5))
    finished = sorted(
        (name for name in curves if name not in pruned and curves[name]),
        key=lambda name: -max(value for _, value in curves[name]),
    )
    for name, points in curves.items():
        if not points:
            continue
        epochs, values = zip(*sorted(points), strict=True)
        if name in pruned:
            axes.plot(epochs, values, color=_PRUNED, linewidth=0.8, marker=".", markersize=3)
            continue
        label = _plain(name) if name in finished[:labelled] else None
        axes.plot(epochs, values, marker="o", markersize=3, linewidth=1.5, label=label)
    axes.plot([], [], color=_PRUNED, linewidth=0.8, label=f"pruned ({len(pruned)})")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(f"{len(curves)} trials")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def _positions(values: Sequence[Any]) -> tuple[np.ndarray, list[str] | None, bool]:
    """x positions: a few distinct values (a grid) as ordered categories, else as numbers."""
    numeric = all(is_number(v) for v in values)
    distinct = sorted(set(values), key=lambda v: float(v) if numeric else str(v))
    if numeric and len(distinct) > 8:
        numbers = np.asarray(values, dtype=np.float64)
        log = bool(numbers.min() > 0 and numbers.max() / numbers.min() > 50)
        return numbers, None, log
    categories = [format_value(v) for v in distinct]
    return (
        np.asarray([categories.index(format_value(v)) for v in values], dtype=np.float64),
        categories,
        False,
    )


def format_value(value: Any) -> str:
    """A parameter value for a label or a console line: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_accuracy_by_parameter(
    rows: list[dict[str, Any]], parameter_names: Sequence[str], path: Path, metric: str
) -> Path:
    """One panel per hyperparameter: ``metric`` of every trial against that parameter's value.

    Args:
        rows: one dict per trial with the parameters, ``metric`` and a boolean ``pruned``.
        parameter_names: the searched parameters, one panel each.
        path: where the PNG goes.
        metric: the accuracy column to plot.
    """
    count = max(len(parameter_names), 1)
    columns = min(count, 3)
    panel_rows = -(-count // columns)
    figure, axes = plt.subplots(
        panel_rows, columns, figsize=(4.2 * columns, 3.4 * panel_rows), squeeze=False
    )
    for axis in axes.flat[count:]:
        axis.axis("off")
    usable = [row for row in rows if row.get(metric) is not None]
    for axis, name in zip(axes.flat, parameter_names, strict=False):
        present = [row for row in usable if row.get(name) is not None]
        if not present:
            axis.set_title(_plain(name))
            continue
        x, categories, log = _positions([row[name] for row in present])
        y = np.asarray([row[metric] for row in present], dtype=np.float64)
        pruned = np.asarray([bool(row.get("pruned")) for row in present])
        jitter = np.linspace(-0.08, 0.08, len(x)) if categories is not None else 0.0
        axis.scatter(x[pruned] + (jitter[pruned] if categories else 0), y[pruned], c=_PRUNED, s=14)
        axis.scatter(
            x[~pruned] + (jitter[~pruned] if categories else 0), y[~pruned], c=_COMPLETE, s=22
        )
        if categories is not None:
            axis.set_xticks(range(len(categories)), [_plain(c) for c in categories])
        if log:
            axis.set_xscale("log")
        axis.set_title(_plain(name))
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes.flat[0].scatter([], [], c=_COMPLETE, s=22, label="finished")
    axes.flat[0].scatter([], [], c=_PRUNED, s=14, label="pruned (accuracy when stopped)")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def plot_parameter_importances(importances: dict[str, float], path: Path) -> Path:
    """Horizontal bars of each parameter's importance (as from Optuna's fANOVA)."""
    names = list(importances)[::-1]
    values = [importances[name] for name in names]
    figure, axes = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    axes.barh(range(len(names)), values, color=_COMPLETE)
    axes.set_yticks(range(len(names)), [_plain(name) for name in names])
    axes.set_xlabel("importance for validation accuracy (fANOVA)")
    axes.set_xlim(0, max(1.0, max(values, default=0.0)))
    for index, value in enumerate(values):
        axes.text(value + 0.01, index, f"{value:.2f}", va="center", fontsize=8)
    return _save(figure, path)


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


def write_search_figures(
    trials: Sequence[TrialSummary],
    parameter_names: Sequence[str],
    importances: dict[str, float] | None,
    out_dir: Path,
) -> dict[str, str]:
    """Write the learning curves, accuracy-by-parameter and (when given) importance figures.

    Returns:
        Figure name -> file path.
    """
    out_dir = Path(out_dir)
    files: dict[str, str] = {}
    shown = [t for t in trials if t.curve]
    if shown:
        curves = {t.label: t.curve for t in shown}
        pruned = {t.label for t in shown if t.state == "pruned"}
        files["learning_curves"] = str(plot_trial_curves(curves, pruned, out_dir / CURVES_PNG))
        rows = [
            {**t.params, "val_accuracy": t.val_accuracy, "pruned": t.state == "pruned"}
            for t in shown
        ]
        path = plot_accuracy_by_parameter(
            rows, parameter_names, out_dir / PARAMETERS_PNG, "val_accuracy"
        )
        files["accuracy_by_parameter"] = str(path)
    if importances:
        path = plot_parameter_importances(importances, out_dir / IMPORTANCES_PNG)
        files["param_importances"] = str(path)
    return files
