"""A hyperparameter search's PNG figures: every trial's learning curve on one chart, accuracy
against each hyperparameter, and parameter importances.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from cnnkit.config import is_number
from cnnkit.evaluation.plots import _plain, _save, plt
from cnnkit.evaluation.search_table import TrialSummary

CURVES_PNG = "learning_curves.png"
PARAMETERS_PNG = "accuracy_by_parameter.png"
IMPORTANCES_PNG = "param_importances.png"

_COMPLETE, _PRUNED = "tab:blue", "0.65"


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
