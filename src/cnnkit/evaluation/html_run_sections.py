"""The HTML report's sections for a training run: headline cards, learning curves, the test
report and the configuration, for a finished run or one still going, interrupted or failed.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from cnnkit.evaluation.html_fragments import (
    as_number,
    cards_html,
    escape_cell,
    figure_html,
    image_tag,
    pre_html,
    table_html,
)
from cnnkit.evaluation.plots import plt
from cnnkit.evaluation.run_files import as_mapping, read_csv_rows, read_mapping, read_text
from cnnkit.paths import RUN_INFO, is_search_folder, member_folders


@dataclass(frozen=True)
class _TrainingRun:
    """What a run folder holds, read once; an absent or unreadable part is empty."""

    folder: Path
    info: dict[str, Any]
    test: dict[str, Any]
    fit: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]
    history: list[dict[str, str]]

    @property
    def trained_on_test(self) -> bool:
        return bool(self.data.get("train_on_all"))


def learning_curves_png(rows: Sequence[dict[str, str]]) -> bytes | None:
    """Accuracy and loss per epoch (train and validation) from ``metrics.csv`` rows."""
    epochs = [as_number(row.get("epoch")) for row in rows]
    if not rows or any(epoch is None for epoch in epochs):
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, metric in zip(axes, ("accuracy", "loss"), strict=True):
        for split, style in (("train", "--"), ("val", "-")):
            values = [as_number(row.get(f"{split}_{metric}")) for row in rows]
            if any(v is not None for v in values):
                axis.plot(epochs, values, style, marker="o", markersize=3, label=split)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _phase_history(run_dir: Path) -> list[dict[str, str]]:
    """An unfinished transfer run's epochs so far, from its phase folders (``frozen``,
    ``finetune``, then an ensemble's ``finetune-2``...), tagged and numbered on as the finished
    run's ``metrics.csv`` has them (phase 1 frozen, 2 the first fine-tune, k + 1 the k-th)."""
    members = {folder.name: int(folder.name[9:]) + 1 for folder in member_folders(run_dir)}
    tags = {"frozen": 1, "finetune": 2, **members}
    history: list[dict[str, str]] = []
    for folder, tag in tags.items():
        offset = len(history)
        for row in read_csv_rows(run_dir / folder / "metrics.csv"):
            epoch = as_number(row.get("epoch"))
            numbered = "" if epoch is None or not math.isfinite(epoch) else str(offset + int(epoch))
            history.append({**row, "epoch": numbered, "phase": str(float(tag))})
    return history


def _read_training_run(run_dir: Path) -> _TrainingRun:
    """The run's summary (``run.json``), test metrics, config and per-epoch history."""
    info = read_mapping(run_dir / RUN_INFO)
    where = run_dir / RUN_INFO
    test = read_mapping(run_dir / "report" / "metrics.json") or as_mapping(
        info.get("test"), f"{where}: test"
    )
    fit = as_mapping(info.get("fit"), f"{where}: fit")
    config = as_mapping(info.get("config"), f"{where}: config") or read_mapping(
        run_dir / "config.yaml"
    )
    model = as_mapping(config.get("model"), "the run's config: model")
    data = as_mapping(config.get("data"), "the run's config: data")
    # A transfer run writes its combined metrics.csv at the end; until then, its phases'.
    history = read_csv_rows(run_dir / "metrics.csv") or _phase_history(run_dir)
    train = as_mapping(config.get("train"), "the run's config: train")
    return _TrainingRun(run_dir, info, test, fit, model, data, train, history)


def _best_accuracy(run: _TrainingRun) -> tuple[str, float | None]:
    """The best accuracy's card label and value, from the fit summary or else the history."""
    # Without a validation split the trainer keeps the best training accuracy: label it so.
    validated = any(row.get("val_accuracy") not in (None, "") for row in run.history)
    label = "best val accuracy" if validated else "best train accuracy (no val split)"
    best = run.fit.get("best_val_accuracy")
    if best is None and run.history:  # An interrupted run has no fit summary yet.
        column = "val_accuracy" if validated else "train_accuracy"
        best = max((as_number(row.get(column)) or 0.0 for row in run.history), default=None)
    return label, as_number(best)


def _summary_cards(run: _TrainingRun) -> str:
    """Status, test accuracy, best accuracy, epochs and model, one card each."""
    transfer = any("phase" in row for row in run.history) or (run.folder / "phases.json").exists()
    # A transfer run's epochs are the head's and the fine-tune's: no single plan to compare.
    planned = None if transfer else run.train.get("epochs")
    best_label, best = _best_accuracy(run)
    test_label = "test top-1 (trained on these images)" if run.trained_on_test else "test top-1"
    epochs = run.fit.get("epochs_run", len(run.history) if run.history else None)
    return cards_html(
        [
            ("status", run.info.get("status")),
            (test_label, as_number(run.test.get("top1"))),
            ("test top-5", as_number(run.test.get("top5"))),
            (best_label, best),
            ("epochs", f"{epochs} of {planned}" if epochs is not None and planned else epochs),
            ("model", run.model.get("name")),
        ]
    )


def _notes(run: _TrainingRun) -> list[str]:
    """The data line, and what an unfinished run or one trained on its test images means."""
    notes = [f'<p class="muted">{escape_cell(run.info.get("data", ""))}</p>']
    if run.info.get("status") in ("interrupted", "running", "failed"):
        error = run.info.get("error")
        failure = f" It failed: {escape_cell(error)}." if error else ""
        # A search's trial (SEARCH/trials/trial-NNN) keeps no checkpoint: continuing the
        # search runs it again.
        trials = run.folder.resolve().parent
        again = (
            "Continuing the search (<code>cnnkit search ...</code> with the same --out) runs "
            "its settings again as a new trial."
            if trials.name == "trials" and is_search_folder(trials.parent)
            else "<code>cnnkit train ... --resume</code> with the same settings continues from "
            "the last checkpoint; the test report below appears when the run ends."
        )
        notes.append(
            f'<p class="muted">Not finished: {len(run.history)} epoch(s) recorded.{failure} '
            f"{again}</p>"
        )
    if run.trained_on_test:
        notes.append(
            '<p class="muted">Trained with --train-on-all: the test images were also training '
            "images, so the test figures overstate accuracy on new images.</p>"
        )
    return notes


def _curve_sections(run: _TrainingRun) -> list[str]:
    """The learning curves, the per-epoch table and the test metrics' table."""
    png = learning_curves_png(run.history)
    sections = ["<h2>Learning curves</h2>"]
    sections.append(image_tag(png, "learning curves") if png else '<p class="muted">none</p>')
    if run.history:
        history = table_html(run.history)
        sections.append(f"<details><summary>Per-epoch metrics</summary>{history}</details>")
    scalars = {k: v for k, v in run.test.items() if isinstance(v, (int, float))}
    if scalars:
        sections += ["<h2>Test metrics</h2>", table_html([scalars])]
    return sections


def _test_report_sections(report_dir: Path) -> list[str]:
    """The confusion matrix, confused pairs, misclassified images and weakest classes."""
    if not report_dir.is_dir():  # Written when the run ends; no empty placeholders before that.
        return []
    confusion = figure_html(report_dir / "confusion.png", "confusion matrix", "no confusion matrix")
    sections = ["<h2>Confusion matrix</h2>", confusion]
    pairs = [row for row in read_csv_rows(report_dir / "confused_pairs.csv") if row.get("true")]
    sections += ["<h2>Most-confused pairs</h2>", table_html(pairs[:20])]
    sections += [
        "<h2>Misclassified examples</h2>",
        figure_html(report_dir / "misclassified.png", "misclassified test images", "none saved"),
    ]
    per_class = read_csv_rows(report_dir / "per_class.csv")
    if per_class:
        worst = sorted(per_class, key=lambda row: as_number(row.get("f1")) or 0.0)[:15]
        sections += ["<h2>Weakest classes (F1)</h2>", table_html(worst)]
    return sections


def training_sections(run_dir: Path) -> list[str]:
    """The report's sections for the training run in ``run_dir``, in page order."""
    run = _read_training_run(run_dir)
    sections = [_summary_cards(run), *_notes(run), *_curve_sections(run)]
    sections += _test_report_sections(run_dir / "report")
    sections += ["<h2>Configuration</h2>", pre_html(read_text(run_dir / "config.yaml"))]
    details = {k: v for k, v in run.info.items() if k != "config"}
    sections.append(pre_html(json.dumps(details, indent=2, default=str)) if details else "")
    return sections
