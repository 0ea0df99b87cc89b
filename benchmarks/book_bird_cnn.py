"""The book's bird CNN from scratch on CUB (dev copy, official split) with the book's settings.

    python -m benchmarks.book_bird_cnn              # book-cub preset, 5 epochs (about 10 min)
    python -m benchmarks.book_bird_cnn --epochs 30  # the book's 30 epochs

The ``book-cub`` preset: 256 px photos, rotation 45, shift/scale/shear 0.2, horizontal flips,
Adam at 1e-3. The book reports 22.3% top-1 on all 200 classes; this copy has 30 classes, so
chance is 3.3% instead of 0.5%.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchmarks.record import record_result, shared_dataset
from cnnkit.config import build_run_config
from cnnkit.presets import preset_for
from cnnkit.runtime import tune_allocator
from cnnkit.training.run import train_run

ARCHIVE = "CUB_200_2011-dev.tgz"
BOOK_TOP1_200_CLASSES = 0.223


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (book: 30)")
    parser.add_argument("--cache-dir", help="decoded-image cache (default: a fresh temp folder)")
    parser.add_argument("--name", default="book_bird_cnn", help="results file name")
    args = parser.parse_args()
    archive = shared_dataset(ARCHIVE)
    tune_allocator()
    # Removed when the benchmark ends (its fresh cache takes hundreds of megabytes).
    scratch = tempfile.TemporaryDirectory(prefix="cnnkit-book-bird-")
    work = scratch.name
    config = build_run_config(
        preset_for("book-cub"),
        {
            "data": {"dataset": "cub", "data": str(archive)},
            "train": {"epochs": args.epochs},
            "out": f"{work}/run",
        },
    )
    start = time.perf_counter()
    result = train_run(config, cache_dir=args.cache_dir or f"{work}/cache", progress=False)
    wall = time.perf_counter() - start
    for row in result.fit.history:
        print(
            f"epoch {int(row['epoch']):>2}: train_acc {row['train_accuracy']:.4f}  "
            f"val_acc {row.get('val_accuracy', float('nan')):.4f}  "
            f"{row['images_per_second']:.1f} img/s"
        )
    metrics = result.test_metrics
    print(f"book_bird_cnn ({config.train.epochs} epochs): {result.data_description}")
    print(f"test top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}")
    print(f"book: {BOOK_TOP1_200_CLASSES:.1%} top-1 on 200 classes (30 epochs)")
    print(f"wall time {wall / 60:.1f} min (data {result.seconds['data']:.0f} s)")
    path = record_result(
        args.name,
        {
            "epochs": result.fit.epochs_run,
            "data": result.data_description,
            "test_top1": metrics["top1"],
            "test_top5": metrics["top5"],
            "wall_minutes": wall / 60,
            "history": result.fit.history,
        },
    )
    print(f"recorded: {path}")


if __name__ == "__main__":
    main()
