"""Tests for the pure metric functions and the evaluation report files."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.evaluation.metrics import (
    confusion_matrix,
    most_confused_pairs,
    per_class_scores,
    summarize,
    topk_accuracy,
)
from cnnkit.evaluation.report import build_report

# Three classes; targets and predictions chosen so every ratio below is easy to check by hand.
TARGETS = torch.tensor([0, 0, 0, 1, 1, 2])
PREDICTIONS = torch.tensor([0, 0, 1, 1, 2, 2])
EXPECTED_MATRIX = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def _logits_for(predictions: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Logits whose argmax is ``predictions``; the runner-up is the previous class index."""
    logits = torch.zeros(len(predictions), num_classes)
    logits[torch.arange(len(predictions)), predictions] = 2.0
    logits[torch.arange(len(predictions)), (predictions - 1) % num_classes] = 1.0
    return logits


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_confusion_matrix_known_values() -> None:
    matrix = confusion_matrix(PREDICTIONS, TARGETS, 3)
    assert matrix.tolist() == EXPECTED_MATRIX
    assert matrix.dtype == torch.int64
    assert confusion_matrix(torch.tensor([3]), torch.tensor([3]), 5)[3, 3] == 1


def test_topk_accuracy() -> None:
    logits = _logits_for(PREDICTIONS)
    assert topk_accuracy(logits, TARGETS, 1) == pytest.approx(4 / 6)
    # The runner-up (prediction - 1) rescues both mistakes: 0 -> (1, 0) and 1 -> (2, 1).
    assert topk_accuracy(logits, TARGETS, 2) == 1.0
    assert topk_accuracy(logits, TARGETS, 5) == 1.0  # k larger than the class count clamps.
    assert math.isnan(topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)))
    # Tied logits (an int8 export's): top-1 counts what argmax, the confusion matrix and
    # prediction answer, the first of the tied classes.
    tied = torch.zeros(6, 5)
    targets = torch.tensor([0, 0, 0, 1, 2, 3])
    assert topk_accuracy(tied, targets, 1) == 0.5
    matrix = confusion_matrix(tied.argmax(dim=1), targets, 5)
    assert summarize(tied, targets)["top1"] == matrix.trace().item() / 6 == 0.5
    assert topk_accuracy(_logits_for(PREDICTIONS), TARGETS, 1) == 4 / 6  # Exactly.
    # Top-k holds top-1's answer however the ties fall: never below top-1.
    many = torch.zeros(3, 20)
    many[1, 5] = -1.0  # Below the 19 tied others: in no top-5.
    many[2, 7] = 1.0
    labels = torch.tensor([0, 5, 7])
    assert [topk_accuracy(many, labels, k) for k in (1, 2, 5)] == [2 / 3, 2 / 3, 2 / 3]


def test_a_report_of_outputs_that_are_not_finite_is_refused(tmp_path: Path) -> None:
    logits = _logits_for(PREDICTIONS)
    logits[2, 1] = float("nan")
    logits[4] = float("inf")
    with pytest.raises(ValueError, match=r"not finite \(NaN or infinite\) for 2 of 6 images"):
        build_report(logits, TARGETS, [str(k) for k in range(logits.shape[1])], tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_per_class_scores_known_values() -> None:
    scores = per_class_scores(torch.tensor(EXPECTED_MATRIX))
    assert scores["precision"].tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert scores["recall"].tolist() == pytest.approx([2 / 3, 0.5, 1.0])
    assert scores["f1"].tolist() == pytest.approx([0.8, 0.5, 2 / 3])
    assert scores["support"].tolist() == [3, 2, 1]


def test_undefined_ratios_are_zero() -> None:
    # Class 2 is never predicted and never present.
    scores = per_class_scores(torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 0]]))
    assert scores["precision"][2] == 0 and scores["recall"][2] == 0 and scores["f1"][2] == 0
    assert scores["support"][2] == 0


def test_most_confused_pairs_order_and_filtering() -> None:
    matrix = torch.tensor([[9, 1, 4], [0, 9, 2], [3, 0, 9]])
    assert most_confused_pairs(matrix, 3) == [(0, 2, 4), (2, 0, 3), (1, 2, 2)]
    assert most_confused_pairs(matrix, 100) == [(0, 2, 4), (2, 0, 3), (1, 2, 2), (0, 1, 1)]
    assert most_confused_pairs(torch.eye(3, dtype=torch.int64) * 5) == []


def test_summarize_uses_classes_present_in_the_targets() -> None:
    # Class 3 exists in the model but not in the test set: it must not drag the macro means down.
    logits = torch.cat([_logits_for(PREDICTIONS), torch.full((6, 1), -5.0)], dim=1)
    summary = summarize(logits, TARGETS)
    assert summary["count"] == 6
    assert summary["top1"] == pytest.approx(4 / 6) and summary["top5"] == 1.0
    assert summary["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert summary["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert summary["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_build_report_writes_every_file(tmp_path: Path) -> None:
    class_names = ["\\alpha", "$x$", "a,b"]
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    out = tmp_path / "report"
    report = build_report(_logits_for(PREDICTIONS), TARGETS, class_names, out, images)

    for name in ("metrics.json", "per_class.csv", "confused_pairs.csv"):
        assert (out / name).is_file(), name
    for name in ("confusion.png", "misclassified.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 50
    # Every file was written to a temporary and renamed: none is left behind.
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(4 / 6) and metrics["count"] == 6
    assert metrics["most_confused"][0]["count"] == 1
    assert set(metrics["files"]) == {
        "metrics",
        "per_class",
        "confused_pairs",
        "confusion",
        "misclassified",
    }
    assert report.metrics == {k: metrics[k] for k in report.metrics}

    per_class = _read_csv(out / "per_class.csv")
    assert [row["class_name"] for row in per_class] == class_names
    assert float(per_class[0]["recall"]) == pytest.approx(2 / 3, abs=1e-6)
    assert [row["support"] for row in per_class] == ["3", "2", "1"]

    pairs = _read_csv(out / "confused_pairs.csv")
    assert {(row["true"], row["predicted"], row["count"]) for row in pairs} == {
        ("\\alpha", "$x$", "1"),
        ("$x$", "a,b", "1"),
    }


def test_a_class_named_by_a_file_name_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    """A folder dataset's class from a non-UTF-8 folder name holds a surrogate, which neither
    matplotlib nor a UTF-8 file can take: the report (and so the run's model) used to fail."""
    class_names = ["a", os.fsdecode(b"cr\xffoss"), "c"]
    images = np.zeros((6, 8, 8, 1), dtype=np.uint8)
    out = tmp_path / "report"
    build_report(_logits_for(PREDICTIONS), TARGETS, class_names, out, images)
    for name in ("confusion.png", "misclassified.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    with open(out / "per_class.csv", newline="", encoding="utf-8") as handle:
        names = [row["class_name"] for row in csv.DictReader(handle)]
    assert names == ["a", "cr\\udcffoss", "c"]
    assert json.loads((out / "metrics.json").read_text())["count"] == 6


def test_build_report_when_everything_is_right(tmp_path: Path) -> None:
    images = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    report = build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], tmp_path, images)
    assert report.metrics["top1"] == 1.0 and report.confused_pairs == []
    assert (tmp_path / "misclassified.png").is_file()
    # The header alone: no made-up pair.
    assert (tmp_path / "confused_pairs.csv").read_text().splitlines() == ["true,predicted,count"]


def test_build_report_without_images_skips_the_grid(tmp_path: Path) -> None:
    report = build_report(_logits_for(PREDICTIONS), TARGETS, ["a", "b", "c"], tmp_path)
    assert "misclassified" not in report.files
    assert not (tmp_path / "misclassified.png").exists()
    assert (tmp_path / "confusion.png").is_file()


def test_grid_captions_and_parameter_labels_stay_short() -> None:
    from cnnkit.evaluation.plots import _shorten
    from cnnkit.evaluation.search_plots import format_value

    caption = "Black_footed_Albatross_long_name\n-> Laysan_Albatross_long_name (0.91)"
    lines = _shorten(caption).split("\n")
    assert [len(line) for line in lines] == [26, 26] and lines[0].endswith("…")
    assert _shorten("alpha\n-> beta (0.50)") == "alpha\n-> beta (0.50)"
    assert format_value(0.0017826497151386949) == "0.001783"
    assert [format_value(v) for v in (3, "adamw", True, 0.5)] == ["3", "adamw", "True", "0.5"]


def _subset_of_a_many_class_model() -> tuple[torch.Tensor, torch.Tensor]:
    """A 40-class model scored on classes 0-2 only: two mistakes land on classes 7 and 30,
    which have no test images; classes 3-39 otherwise take part in nothing."""
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 7, 1, 1, 2, 30])
    logits = torch.zeros(len(targets), 40)
    logits[torch.arange(len(targets)), predictions] = 1.0
    return logits, targets


def test_macro_averages_count_the_classes_wrong_predictions_land_on() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    logits, targets = _subset_of_a_many_class_model()
    summary = summarize(logits, targets)
    # scikit-learn's default labels: the classes that are true or predicted (0, 1, 2, 7, 30).
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets.numpy(), logits.argmax(dim=1).numpy(), average="macro", zero_division=0
    )
    assert summary["macro_precision"] == pytest.approx(precision) == pytest.approx(3 / 5)
    assert summary["macro_recall"] == pytest.approx(recall)
    assert summary["macro_f1"] == pytest.approx(f1)


def test_the_report_lists_only_classes_that_are_true_or_predicted(tmp_path: Path) -> None:
    from cnnkit.evaluation.plots import confused_block

    logits, targets = _subset_of_a_many_class_model()
    class_names = [f"class_{index}" for index in range(40)]
    report = build_report(logits, targets, class_names, tmp_path)
    per_class = _read_csv(tmp_path / "per_class.csv")
    assert [row["index"] for row in per_class] == ["0", "1", "2", "7", "30"]
    assert [row["support"] for row in per_class] == ["2", "2", "2", "0", "0"]
    assert report.metrics["macro_precision"] == pytest.approx(3 / 5)
    # The figure draws the same five classes, not 30 slots filled with idle ones.
    matrix = confusion_matrix(logits.argmax(dim=1), targets, 40).numpy()
    assert confused_block(matrix).tolist() == [0, 1, 2, 7, 30]
    # Two slots: the first of the two largest confusions (0 -> 7 and 2 -> 30, once each).
    assert confused_block(matrix, max_classes=2).tolist() == [0, 7]
    assert confused_block(np.zeros((3, 3), np.int64)).tolist() == [0, 1, 2]


def test_the_confusion_figure_holds_the_largest_confusion() -> None:
    """Big classes with scattered mistakes must not push the most-confused pair out."""
    from cnnkit.evaluation.plots import confused_block

    matrix = np.zeros((369, 369), np.int64)
    matrix[0, 1] = 8  # The largest single confusion, between two small classes.
    for big in range(10, 50):  # Forty classes with many small mistakes each.
        matrix[big, big] = 50
        for other in range(big + 1, big + 11):
            matrix[big, 100 + other] = 1
    chosen = confused_block(matrix).tolist()
    assert len(chosen) == 30 and {0, 1} <= set(chosen)


def _report_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("earlier", [True, False])
def test_an_interrupted_report_leaves_the_earlier_one_untouched(
    tmp_path: Path, monkeypatch, earlier: bool
) -> None:
    """Ctrl-C (or SIGTERM, which the CLI turns into it) while the last figure is drawn: the
    folder holds the earlier report as it was (or nothing), not new CSVs beside old metrics."""
    from cnnkit.evaluation import plots

    images = np.zeros((6, 8, 8, 1), dtype=np.uint8)
    out = tmp_path / "evaluation"
    if earlier:
        build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], out, images)
    before = _report_files(out) if earlier else None

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_image_grid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_report(_logits_for(PREDICTIONS), TARGETS, ["a", "b", "c"], out, images)
    if earlier:
        assert _report_files(out) == before
    else:
        assert not out.exists()
    assert [path.name for path in tmp_path.iterdir()] == (["evaluation"] if earlier else [])


def test_a_new_report_replaces_every_file_of_the_earlier_one(tmp_path: Path) -> None:
    out = tmp_path / "evaluation"
    images = np.zeros((6, 8, 8, 1), dtype=np.uint8)
    build_report(_logits_for(PREDICTIONS), TARGETS, ["a", "b", "c"], out, images)
    (out / ".metrics.json.abc.tmp").write_text("left by a killed write")
    build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], out)
    # No stale grid of the earlier report's mistakes beside the new metrics.
    assert sorted(path.name for path in out.iterdir()) == [
        "confused_pairs.csv",
        "confusion.png",
        "metrics.json",
        "per_class.csv",
    ]
    assert json.loads((out / "metrics.json").read_text())["top1"] == 1.0
    assert [path.name for path in tmp_path.iterdir()] == ["evaluation"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # As mkdir makes it, not private.


def test_an_earlier_report_whose_parent_takes_no_new_entries_is_replaced_inside(
    tmp_path: Path, monkeypatch
) -> None:
    """A read-only run folder (or one of someone else's) holding a writable evaluation/: the
    report cannot be staged beside it, so its files are replaced inside, after all the scoring
    (root passes permission checks, so the parent's refusal is the operating system's answer
    made here)."""
    import tempfile

    out = tmp_path / "evaluation"
    images = np.zeros((6, 8, 8, 1), dtype=np.uint8)
    build_report(_logits_for(PREDICTIONS), TARGETS, ["a", "b", "c"], out, images)
    make = tempfile.mkdtemp

    def refusing_the_parent(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied", str(dir))
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", refusing_the_parent)
    build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], out)
    assert json.loads((out / "metrics.json").read_text())["top1"] == 1.0
    assert not (out / "misclassified.png").exists()  # No stale grid of the earlier report.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["evaluation"]
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]
    # A new folder there cannot be made at all: refused before anything is written.
    with pytest.raises(ValueError, match=f"new: cannot write in {tmp_path} \\(Permission"):
        build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], tmp_path / "new")


def test_a_report_into_a_folder_of_other_files_keeps_them(tmp_path: Path) -> None:
    """A folder that holds more than a report (a run folder, notes of one's own) is not
    swapped away: its other files stay, and only the earlier report's files are replaced."""
    images = np.zeros((6, 8, 8, 1), dtype=np.uint8)
    build_report(_logits_for(PREDICTIONS), TARGETS, ["a", "b", "c"], tmp_path, images)
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "confusion.png").write_bytes(b"my own figure")
    build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "plots" / "confusion.png").read_bytes() == b"my own figure"
    assert not (tmp_path / "misclassified.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["top1"] == 1.0
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_a_file_in_the_way_of_the_report_folder_is_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    for out in (taken, taken / "report"):
        with pytest.raises(ValueError, match=f"{taken}.* is a file; the report needs a folder"):
            build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], out)
    assert taken.read_text() == "mine\n"


def test_a_report_into_the_working_folder_updates_it_in_place(tmp_path: Path, monkeypatch) -> None:
    """``--out .`` from inside an earlier report (or an empty folder made for it): the folder
    the shell stands in is written into, never renamed away."""
    out = tmp_path / "evaluation"
    build_report(_logits_for(PREDICTIONS), TARGETS, ["a", "b", "c"], out)
    monkeypatch.chdir(out)
    report = build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], ".")
    assert report.files["metrics"] == "metrics.json"
    assert Path.cwd().samefile(out)
    assert json.loads((out / "metrics.json").read_text())["top1"] == 1.0
    assert [path.name for path in tmp_path.iterdir()] == ["evaluation"]
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]
    (tmp_path / "empty").mkdir()
    build_report(_logits_for(TARGETS), TARGETS, ["a", "b", "c"], tmp_path / "empty")
    assert (tmp_path / "empty" / "metrics.json").is_file()
