"""Evaluation reports: metrics JSON, per-class and most-confused CSVs, and their figures."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.atomic import write_atomically
from cnnkit.evaluation import plots
from cnnkit.evaluation.metrics import (
    confusion_matrix,
    involved_classes,
    most_confused_pairs,
    per_class_scores,
    summarize,
)


@dataclass
class EvaluationReport:
    """Test-set metrics and where the report files went."""

    metrics: dict[str, float]
    confused_pairs: list[dict[str, Any]]
    files: dict[str, str] = field(default_factory=dict)
    # What was scored: the model file and its architecture, the dataset, its fold and split.
    evaluated: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluated": self.evaluated,
            **self.metrics,
            "most_confused": self.confused_pairs,
            "files": self.files,
        }


def resolved(path: str | Path | None) -> str | None:
    """``path`` made absolute (how a report and a model file name their data), or None."""
    return str(Path(path).resolve()) if path else None


def evaluated_block(
    model: str | Path,
    architecture: str,
    dataset: str | None,
    data: str | Path | None,
    fold: int | None,
    split: str,
    **choices: Any,
) -> dict[str, Any]:
    """What a report scored (its ``evaluated`` block): the model file and architecture, the
    data (paths absolute), and ``choices``, the other settings that chose the images."""
    return {
        "model": resolved(model),
        "architecture": architecture,
        "dataset": dataset,
        "data": resolved(data),
        "fold": fold,
        "split": split,
        **choices,
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["empty"])
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def build_report(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str] | tuple[str, ...],
    out_dir: str | Path,
    images: np.ndarray | None = None,
    max_examples: int = 36,
    evaluated: dict[str, Any] | None = None,
) -> EvaluationReport:
    """Compute metrics and write ``metrics.json``, ``per_class.csv``, ``confused_pairs.csv``,
    ``confusion.png`` and (with ``images``) ``misclassified.png`` into ``out_dir``. The CSV and
    the figure list the classes that are some image's true or predicted class.

    Args:
        logits: ``[N, K]`` model outputs.
        labels: ``[N]`` true class indices.
        class_names: names in index order.
        out_dir: report folder (created).
        images: the stored uint8 images ``[N, S, S, C]`` for the misclassified grid.
        max_examples: most misclassified examples to draw.
        evaluated: what was scored (model file, architecture, dataset, fold, split), recorded
            in ``metrics.json`` so that the report names its model and data.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = summarize(logits, labels)
    predictions = logits.argmax(dim=1)
    matrix = confusion_matrix(predictions, labels, len(class_names))
    scores = per_class_scores(matrix)
    involved = involved_classes(matrix)
    per_class = [
        {
            "index": index,
            "class_name": name,
            "precision": round(scores["precision"][index].item(), 6),
            "recall": round(scores["recall"][index].item(), 6),
            "f1": round(scores["f1"][index].item(), 6),
            "support": int(scores["support"][index]),
        }
        for index, name in enumerate(class_names)
        if involved[index]  # A model's other classes would add rows of zeros.
    ]
    pairs = [
        {"true": class_names[t], "predicted": class_names[p], "count": n}
        for t, p, n in most_confused_pairs(matrix, 20)
    ]
    files = {
        "metrics": str(out_dir / "metrics.json"),
        "per_class": str(out_dir / "per_class.csv"),
        "confused_pairs": str(out_dir / "confused_pairs.csv"),
        "confusion": str(
            plots.plot_confusion(matrix.numpy(), class_names, out_dir / "confusion.png")
        ),
    }
    _write_csv(out_dir / "per_class.csv", per_class)
    _write_csv(out_dir / "confused_pairs.csv", pairs or [{"true": "", "predicted": "", "count": 0}])
    if images is not None:
        probabilities = torch.softmax(logits.float(), dim=1)
        wrong = torch.nonzero(predictions != labels).flatten()
        confidence = probabilities[wrong, predictions[wrong]]
        order = wrong[torch.argsort(confidence, descending=True)][:max_examples].numpy()
        titles = [
            f"{class_names[labels[i]]}\n-> {class_names[predictions[i]]} "
            f"({probabilities[i, predictions[i]].item():.2f})"
            for i in order
        ]
        grid = plots.plot_image_grid(
            np.asarray(images[order]) if len(order) else np.zeros((0, 1, 1, 1), np.uint8),
            titles,
            out_dir / "misclassified.png",
            title="Misclassified (true -> predicted, confidence)",
        )
        files["misclassified"] = str(grid)
    report = EvaluationReport(metrics, pairs, files, dict(evaluated or {}))
    text = json.dumps(report.to_dict(), indent=2) + "\n"
    write_atomically(out_dir / "metrics.json", lambda path: path.write_text(text, encoding="utf-8"))
    return report
