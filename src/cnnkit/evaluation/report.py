"""Evaluation reports: metrics JSON, per-class and most-confused CSVs, and their figures."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.atomic import fsync_directory, write_atomically
from cnnkit.evaluation import plots
from cnnkit.evaluation.metrics import (
    confusion_matrix,
    involved_classes,
    most_confused_pairs,
    per_class_scores,
    summarize,
)
from cnnkit.paths import refuse_unusable_folder


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


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Write ``rows`` with a header of ``columns`` (default: the first row's keys)."""

    def write(temporary: Path) -> None:
        # A class named by a file name that is not UTF-8 holds surrogates: written as \udcXX.
        with open(
            temporary, "w", newline="", encoding="utf-8", errors="backslashreplace"
        ) as handle:
            header = columns or (list(rows[0]) if rows else ["empty"])
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


# The files build_report writes; a folder holding only these (and the temporaries of their
# atomic writes) holds nothing but an earlier report.
REPORT_FILES = (
    "metrics.json",
    "per_class.csv",
    "confused_pairs.csv",
    "confusion.png",
    "misclassified.png",
)


def _per_class_rows(matrix: torch.Tensor, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class that is some image's true or predicted class (a model's other
    classes would add rows of zeros)."""
    scores = per_class_scores(matrix)
    involved = involved_classes(matrix)
    return [
        {
            "index": index,
            "class_name": name,
            "precision": round(scores["precision"][index].item(), 6),
            "recall": round(scores["recall"][index].item(), 6),
            "f1": round(scores["f1"][index].item(), 6),
            "support": int(scores["support"][index]),
        }
        for index, name in enumerate(class_names)
        if involved[index]
    ]


def _plot_misclassified(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    images: np.ndarray,
    path: Path,
    max_examples: int,
) -> None:
    """The most confident mistakes, with their true and predicted names and confidence."""
    predictions = logits.argmax(dim=1)
    probabilities = torch.softmax(logits.float(), dim=1)
    wrong = torch.nonzero(predictions != labels).flatten()
    confidence = probabilities[wrong, predictions[wrong]]
    order = wrong[torch.argsort(confidence, descending=True)][:max_examples].numpy()
    titles = [
        f"{class_names[labels[i]]}\n-> {class_names[predictions[i]]} "
        f"({probabilities[i, predictions[i]].item():.2f})"
        for i in order
    ]
    plots.plot_image_grid(
        np.asarray(images[order]) if len(order) else np.zeros((0, 1, 1, 1), np.uint8),
        titles,
        path,
        title="Misclassified (true -> predicted, confidence)",
    )


def _swappable(folder: Path) -> bool:
    """Whether ``folder`` may be replaced whole: absent, or a real folder that holds an
    earlier report (or one cut short) and nothing else. Never an empty folder someone made,
    nor the working folder or one above it."""
    if not folder.exists() and not folder.is_symlink():
        return True
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    working = Path.cwd()
    if not entries or folder.resolve() in (working, *working.parents):
        return False
    return all(
        path.is_file() and not path.is_symlink() and _is_report_file(path.name) for path in entries
    )


def _is_report_file(name: str) -> bool:
    return name in REPORT_FILES or (name.startswith(".") and name.endswith(".tmp"))


def _move_into_place(staging: Path, out_dir: Path, swap: bool) -> None:
    """Put the finished report in ``staging`` at ``out_dir``.

    With ``swap`` (see :func:`_swappable`) the folder is replaced whole. A folder that holds
    other things too (a run folder, files of the user's own) keeps them, as clearing a run
    folder does: the new files are renamed in, ``metrics.json`` last, and the earlier report's
    files that this one lacks are removed, so no stale figure sits beside new metrics.
    """
    if swap:
        earlier = staging.with_suffix(".earlier.tmp")
        if out_dir.exists():
            os.replace(out_dir, earlier)
        os.replace(staging, out_dir)
        shutil.rmtree(earlier, ignore_errors=True)
    else:
        written = sorted(path.name for path in staging.iterdir())
        for name in REPORT_FILES:
            if name not in written:
                (out_dir / name).unlink(missing_ok=True)
        for name in sorted(written, key=lambda name: name == "metrics.json"):
            os.replace(staging / name, out_dir / name)
        staging.rmdir()
    fsync_directory(out_dir.parent)


def _staging_folder(out_dir: Path, swap: bool) -> Path:
    """An empty hidden folder, named like the temporaries of atomic writes, on the report's
    file system (so renames are atomic) and with the mode a plain ``mkdir`` gives: beside
    ``out_dir`` when it is to be swapped in, else inside it (its parent may be read-only)."""
    home = out_dir.parent if swap else out_dir
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", suffix=".tmp", dir=home))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


class NonFiniteOutputError(ValueError):
    """A model's outputs hold NaN or infinite values: its weights are unusable."""


def _refuse_non_finite(logits: torch.Tensor) -> None:
    """Raise :class:`NonFiniteOutputError` where some image's logits are NaN or infinite:
    argmax would take NaN for the largest value and the report would show believable figures."""
    broken = int((~torch.isfinite(logits)).any(dim=1).sum())
    if broken:
        raise NonFiniteOutputError(
            f"the model's outputs are not finite (NaN or infinite) for {broken} of {len(logits)} "
            "images: its weights have diverged or are broken, so no figures are reported"
        )


def _write_json(path: Path, content: dict[str, Any]) -> None:
    text = json.dumps(content, indent=2) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


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

    The files are written into a hidden temporary folder and moved into place at the end, so
    an interrupted report leaves the earlier one as it was, not a mix of both; files in
    ``out_dir`` that are not a report's stay.

    Args:
        logits: ``[N, K]`` model outputs.
        labels: ``[N]`` true class indices.
        class_names: names in index order.
        out_dir: report folder (created).
        images: the stored uint8 images ``[N, S, S, C]`` for the misclassified grid.
        max_examples: most misclassified examples to draw.
        evaluated: what was scored (model file, architecture, dataset, fold, split), recorded
            in ``metrics.json`` so that the report names its model and data.

    Raises:
        ValueError: if ``out_dir`` or a folder above it is a file, or a logit is not finite.
    """
    given = Path(out_dir)
    out_dir = given.absolute()  # "." too has a name and a parent.
    refuse_unusable_folder(out_dir, needs="the report")
    _refuse_non_finite(logits)
    metrics = summarize(logits, labels)
    matrix = confusion_matrix(logits.argmax(dim=1), labels, len(class_names))
    pairs = [
        {"true": class_names[t], "predicted": class_names[p], "count": n}
        for t, p, n in most_confused_pairs(matrix, 20)
    ]
    names = {
        "metrics": "metrics.json",
        "per_class": "per_class.csv",
        "confused_pairs": "confused_pairs.csv",
        "confusion": "confusion.png",
    }
    if images is not None:
        names["misclassified"] = "misclassified.png"
    files = {key: str(given / name) for key, name in names.items()}
    report = EvaluationReport(metrics, pairs, files, dict(evaluated or {}))
    swap = _swappable(out_dir)
    try:
        staging = _staging_folder(out_dir, swap)
    except OSError:
        if not (swap and out_dir.is_dir()):
            raise
        # Its parent takes no new entries (read-only, or a run folder of someone else's): the
        # earlier report's files are replaced inside the folder instead.
        swap = False
        staging = _staging_folder(out_dir, swap)
    try:
        plots.plot_confusion(matrix.numpy(), class_names, staging / "confusion.png")
        _write_csv(staging / "per_class.csv", _per_class_rows(matrix, class_names))
        # No confusion: the header alone.
        _write_csv(staging / "confused_pairs.csv", pairs, ["true", "predicted", "count"])
        if images is not None:
            path = staging / "misclassified.png"
            _plot_misclassified(logits, labels, class_names, images, path, max_examples)
        _write_json(staging / "metrics.json", report.to_dict())
        _move_into_place(staging, out_dir, swap)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
