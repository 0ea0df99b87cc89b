"""Pure tensor metrics: accuracy, top-k, confusion matrix, per-class precision/recall/F1."""

from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Share of rows whose target is among the ``k`` highest logits (``[N, K]``, ``[N]``)."""
    if len(targets) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    # Argmax's answer comes first, as the confusion matrix and prediction take it: among tied
    # logits (common in int8 exports) topk may pick other indices, and top-5 could then
    # miss what top-1 counts.
    top = logits.argmax(dim=1, keepdim=True)
    if k > 1:
        others = logits.scatter(1, top, float("-inf")).topk(k - 1, dim=1).indices
        top = torch.cat([top, others], dim=1)
    hits = int((top == targets.view(-1, 1)).any(dim=1).sum())
    return hits / len(targets)  # Exact, and on any device (MPS has no float64).


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """``[K, K]`` int64 counts; row = true class, column = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def per_class_scores(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support per class from a confusion matrix.

    A class that is never predicted (or never present) gets 0 for the undefined ratio.
    """
    matrix = matrix.double()
    true_positive = matrix.diag()
    predicted = matrix.sum(dim=0)
    support = matrix.sum(dim=1)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, true_positive / support.clamp(min=1), 0.0)
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.long()}


def most_confused_pairs(matrix: torch.Tensor, count: int = 20) -> list[tuple[int, int, int]]:
    """The ``count`` largest off-diagonal cells as ``(true, predicted, n)``, largest first."""
    off_diagonal = matrix.clone()
    off_diagonal.fill_diagonal_(0)
    values, flat = off_diagonal.flatten().topk(min(count, off_diagonal.numel()))
    size = matrix.shape[0]
    return [
        (int(i // size), int(i % size), int(v)) for v, i in zip(values, flat, strict=True) if v > 0
    ]


def involved_classes(matrix: torch.Tensor) -> torch.Tensor:
    """``[K]`` bool: the classes that are some image's true or predicted class (the labels
    scikit-learn averages over by default). A model of many classes scored on a few of them
    then averages over those, and the classes its mistakes land on, not over all ``K``."""
    return (matrix.sum(dim=1) > 0) | (matrix.sum(dim=0) > 0)


def summarize(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1, top-5 and macro precision/recall/F1 over the classes that are true or predicted:
    a class that only wrong predictions land on counts, with precision 0."""
    num_classes = logits.shape[1]
    matrix = confusion_matrix(logits.argmax(dim=1), targets, num_classes)
    scores = per_class_scores(matrix)
    involved = involved_classes(matrix)
    return {
        "top1": topk_accuracy(logits, targets, 1),
        "top5": topk_accuracy(logits, targets, 5),
        "macro_precision": scores["precision"][involved].mean().item(),
        "macro_recall": scores["recall"][involved].mean().item(),
        "macro_f1": scores["f1"][involved].mean().item(),
        "count": int(len(targets)),
    }
