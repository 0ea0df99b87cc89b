"""What drawing a report's misclassified-examples grid costs: one set of axes (what
``cnnkit.evaluation.plots.plot_image_grid`` draws) against a subplot per panel (how it drew the
grid before the eighteenth session).

    python -m benchmarks.report_grid

Every training run, evaluation and search trial writes this grid once. Both ways draw the same
36 random panels with two-line captions into a PNG, in alternating rounds; the figure is the
median time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.record import record_result
from cnnkit.evaluation import plots


def subplot_per_panel(
    images: np.ndarray, titles: list[str], path: Path, columns: int = 6, title: str = ""
) -> Path:
    """The grid as drawn before: a subplot and an axes title per panel, cropped tight."""
    count = max(len(images), 1)
    rows = -(-count // columns)
    figure, axes = plots.plt.subplots(
        rows, columns, figsize=(columns * 2.0, rows * 2.4), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, titles, strict=False):
        if image.shape[-1] == 1:
            axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            axis.imshow(image)
        axis.set_title(plots._plain(plots._shorten(caption)), fontsize=7)
    if title:
        figure.suptitle(title)
    return plots._save(figure, path)


def seconds(draw: Callable, images: np.ndarray, titles: list[str], path: Path) -> float:
    start = time.perf_counter()
    draw(images, titles, path, title="Misclassified (true -> predicted, confidence)")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--panels", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="report_grid", help="results/NAME.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    titles = [f"\\alpha_{i}\n-> \\beta (0.{i % 100:02d})" for i in range(args.panels)]
    ways = {"one_axes": plots.plot_image_grid, "subplot_per_panel": subplot_per_panel}
    figures: dict[str, object] = {"panels": args.panels, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "grid.png"
        for kind, shape in (("symbols", (32, 32, 1)), ("photos", (96, 96, 3))):
            images = rng.integers(0, 256, (args.panels, *shape), dtype=np.uint8)
            for draw in ways.values():  # Warm-up: fonts and the backend load once.
                seconds(draw, images, titles, path)
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.rounds):
                for name, draw in ways.items():
                    times[name].append(seconds(draw, images, titles, path))
            median = {name: statistics.median(values) for name, values in times.items()}
            figures[kind] = {
                **{f"{name}_s": round(value, 3) for name, value in median.items()},
                "speed_up": round(median["subplot_per_panel"] / median["one_axes"], 2),
            }
    for key, value in figures.items():
        print(f"{key:>8}: {value}")
    record_result(args.name, figures)


if __name__ == "__main__":
    main()
