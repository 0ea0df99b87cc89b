"""PNG figures: confusion matrix (full or most-confused block), misclassified grid, curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnkit.atomic import write_atomically  # noqa: E402
from cnnkit.data.source import printable  # noqa: E402


def _plain(text: str) -> str:
    """``text`` as drawn literally: a name from a file name that is not UTF-8 holds surrogates,
    which matplotlib cannot draw (a TypeError as it saves), so those show as U+FFFD, as
    ``cnnkit predict`` prints them; paired "$" would start mathtext."""
    return printable(text).replace("$", r"\$")


def _shorten(caption: str, width: int = 26) -> str:
    """A caption that fits above its image: each line cut to ``width`` characters (about the
    panel's width at the grid's font size), with an ellipsis."""
    lines = []
    for part in caption.split("\n"):
        lines.append(part if len(part) <= width else part[: width - 1] + "…")
    return "\n".join(lines)


def _save(figure: plt.Figure, path: Path, tight: bool = True) -> Path:
    """Write the figure atomically (the format from ``path``'s suffix) and close it; ``tight``
    crops it to what is drawn (which draws it twice)."""
    try:
        write_atomically(
            Path(path),
            lambda temporary: figure.savefig(
                temporary,
                format=Path(path).suffix[1:] or "png",
                dpi=110,
                bbox_inches="tight" if tight else None,
            ),
        )
    finally:
        plt.close(figure)
    return path


def _involved(matrix: np.ndarray) -> np.ndarray:
    """Indices of the classes that are some image's true or predicted class."""
    return np.flatnonzero((matrix.sum(axis=0) + matrix.sum(axis=1)) > 0)


def confused_block(matrix: np.ndarray, max_classes: int = 30) -> np.ndarray:
    """Indices of the classes to draw: those that are true or predicted (a class that takes
    part in nothing fills no slot). Above ``max_classes`` of them, the classes of the largest
    confusions first (both classes of a pair, largest pair first), so the most-confused pairs
    are in the figure, then the classes most involved in confusions. A matrix of no images
    keeps every class."""
    involved = _involved(matrix)
    if len(involved) == 0:
        involved = np.arange(len(matrix))
    if len(involved) <= max_classes:
        return involved
    off = matrix.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    chosen: dict[int, None] = {}  # Ordered, without repeats.
    for cell in np.argsort(-off, axis=None, kind="stable"):
        if len(chosen) >= max_classes or off.flat[cell] == 0:
            break
        for index in np.unravel_index(cell, off.shape):
            if len(chosen) < max_classes:
                chosen.setdefault(int(index))
    involvement = (off.sum(axis=0) + off.sum(axis=1))[involved]
    for index in involved[np.argsort(-involvement, kind="stable")]:
        if len(chosen) >= max_classes:
            break
        chosen.setdefault(int(index))
    return np.sort(np.fromiter(chosen, dtype=np.int64))


def _subset_note(matrix: np.ndarray, chosen: np.ndarray) -> str:
    """What the title says about the classes left out, if any."""
    if len(chosen) == len(matrix):
        return ""
    if len(chosen) == len(_involved(matrix)):
        return f" ({len(chosen)} of {len(matrix)} classes: those tested or predicted)"
    return f" ({len(chosen)} most-confused classes)"


def plot_confusion(
    matrix: np.ndarray, class_names: Sequence[str], path: Path, max_classes: int = 30
) -> Path:
    """Row-normalised confusion matrix of the classes that are true or predicted; above
    ``max_classes`` of them only the most-confused block."""
    chosen = confused_block(matrix, max_classes)
    block = matrix[np.ix_(chosen, chosen)].astype(np.float64)
    rows = matrix[chosen].sum(axis=1, keepdims=True).astype(np.float64)
    normalised = np.divide(block, rows, out=np.zeros_like(block), where=rows > 0)
    size = max(5.0, 0.32 * len(chosen) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    labels = [_plain(class_names[i]) for i in chosen]
    axes.set_xticks(range(len(chosen)), labels, rotation=90, fontsize=7)
    axes.set_yticks(range(len(chosen)), labels, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"Confusion matrix, row-normalised{_subset_note(matrix, chosen)}")
    figure.colorbar(image, ax=axes, fraction=0.046)
    return _save(figure, path)


def plot_image_grid(
    images: np.ndarray, titles: Sequence[str], path: Path, columns: int = 6, title: str = ""
) -> Path:
    """A grid of uint8 images ``[N, H, W, C]`` with one caption each.

    The panels share one set of axes (an image and a caption each, in panel units): a subplot
    per panel made drawing the grid take over a second, in every report and search trial.
    """
    count = max(len(images), 1)
    columns = min(columns, max(count, 3))  # Room for the title above a short row.
    rows = -(-count // columns)
    panel_height = 1.2  # Panel units: each image is 1 wide and 1 high, its caption above it.
    figure = plt.figure(figsize=(columns * 2.0, rows * 2.0 * panel_height + (0.4 if title else 0)))
    axes = figure.add_axes((0, 0, 1, 1 if not title else 1 - 0.4 / figure.get_figheight()))
    axes.axis("off")
    axes.set_xlim(0, columns)
    axes.set_ylim(rows * panel_height, 0)
    for index, (image, caption) in enumerate(zip(images, titles, strict=False)):
        row, column = divmod(index, columns)
        top = row * panel_height + (panel_height - 1) + 0.03
        extent = (column + 0.06, column + 0.94, top + 0.88, top)
        if image.shape[-1] == 1:
            axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, extent=extent)
        else:
            axes.imshow(image, extent=extent)
        axes.text(
            column + 0.5,
            top - 0.02,
            _plain(_shorten(caption)),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    axes.set_aspect("auto")
    if len(images) == 0:
        axes.text(columns / 2, rows * panel_height / 2, "no misclassified images", ha="center")
    if title:
        figure.suptitle(title, y=1 - 0.1 / figure.get_figheight(), va="top")
    return _save(figure, path, tight=False)


def plot_learning_curves(
    histories: dict[str, list[dict[str, float]]], path: Path, metric: str = "val_accuracy"
) -> Path:
    """One line per run of ``metric`` over epochs (and training accuracy for a single run)."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        epochs = [row["epoch"] for row in history if metric in row]
        values = [row[metric] for row in history if metric in row]
        axes.plot(epochs, values, marker="o", markersize=3, label=_plain(name))
        if len(histories) == 1 and all("train_accuracy" in row for row in history):
            axes.plot(
                [row["epoch"] for row in history],
                [row["train_accuracy"] for row in history],
                linestyle="--",
                label="train_accuracy",
            )
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    if len(histories) <= 12:
        axes.legend(fontsize=7)
    return _save(figure, path)
