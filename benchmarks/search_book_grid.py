"""The book's 40-model grid search on HASYv2 fold 1, with pruning; prints time and the best model.

Library equivalent of::

    cnnkit search --dataset hasy --data ../shared/data/HASYv2-dev.tar.bz2 --fold 1 \\
        --space book --sampler grid --pruner halving --epochs 10 --workers 2

Usage: ``python -m benchmarks.search_book_grid [--max-classes 20 --epochs 3] [--name NAME]``.
The bars (full grid, 10 epochs): at most 60 minutes of wall time on two cores, and the best
trial at 78% or more on both validation and test. Reduced runs (``--max-classes``) print the
measured cost per trained epoch and an estimate for the full grid from it.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.record import record_result
from cnnkit.config import build_run_config
from cnnkit.presets import preset_for
from cnnkit.runtime import tune_allocator
from cnnkit.search.config import SearchConfig
from cnnkit.search.driver import run_search
from cnnkit.search.spaces import BOOK_SPACE

DEFAULT_ARCHIVE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "HASYv2-dev.tar.bz2"
)
WALL_BAR_S = 60 * 60
ACCURACY_BAR = 0.78
FULL_TRAIN_IMAGES = 121_122  # HASYv2-dev fold 1 after the 10% validation split.


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_ARCHIVE))
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-classes", type=int, help="reduced run: first N classes only")
    parser.add_argument("--max-per-class", type=int)
    parser.add_argument("--pruner", choices=["halving", "median", "none"], default="halving")
    parser.add_argument("--prune-warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-trials", type=int, help="stop after N trials (default: all 40)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU")
    parser.add_argument("--out", default="runs/bench-search-book-grid")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cnnkit"))
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument(
        "--name",
        help="record as results/NAME.json (default: search_book_grid for the full grid; a run "
        "shrunk with --max-classes or --max-per-class is recorded only when named)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.fresh and Path(args.out).exists():
        import shutil

        shutil.rmtree(args.out)
    tune_allocator()
    base = build_run_config(
        preset_for(BOOK_SPACE.preset),
        {
            "data": {
                "dataset": "hasy",
                "data": args.data,
                "fold": args.fold,
                "max_classes": args.max_classes,
                "max_per_class": args.max_per_class,
            },
            "train": {"epochs": args.epochs, "bf16_cpu": args.bf16 or None},
            "out": args.out,
        },
    )
    search = SearchConfig(
        sampler="grid",
        pruner=args.pruner,
        prune_warmup=args.prune_warmup,
        workers=args.workers,
        n_trials=args.n_trials,
        sampler_seed=0,
    )
    data_seconds: list[float] = []
    start = time.perf_counter()
    result = run_search(
        base,
        BOOK_SPACE,
        search,
        cache_dir=args.cache_dir,
        progress=False,
        on_data=lambda data: data_seconds.append(time.perf_counter() - start),
    )
    wall = time.perf_counter() - start
    trials = result.trials
    epochs_trained = sum(t.epochs for t in trials)
    trial_seconds = sum(t.seconds or 0.0 for t in trials)
    best = result.best
    figures = {
        "wall_seconds": round(wall, 1),
        "data_seconds": round(data_seconds[0], 1) if data_seconds else None,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "trials_complete": result.counts.get("complete", 0),
        "trials_pruned": result.counts.get("pruned", 0),
        "trials_failed": result.counts.get("fail", 0),
        "epochs_trained": epochs_trained,
        "trial_seconds_per_epoch": round(trial_seconds / max(epochs_trained, 1), 2),
        "best_params": best.params if best else None,
        "best_val_accuracy": best.val_accuracy if best else None,
        "best_test_accuracy": best.test_top1 if best else None,
        "results": result.files.get("md"),
    }
    if args.max_classes or args.max_per_class:
        # Full-size estimate: each architecture's measured training throughput (from the trials'
        # metrics.csv, so without checkpoint and report overheads) applied to the full training
        # set, times the epochs successive halving trains over 40 trials of 10 epochs.
        epoch_seconds = full_epoch_seconds(result.run_dir)
        if epoch_seconds:
            mean_epoch = sum(epoch_seconds.values()) / len(epoch_seconds)
            full_epochs = simulate_trained_epochs(search, 40, 10)
            figures["estimated_full_epoch_seconds"] = {
                f"convs={c} dense={d}": round(v) for (c, d), v in sorted(epoch_seconds.items())
            }
            figures["simulated_full_epochs_trained"] = full_epochs
            figures["estimated_full_grid_minutes"] = round(
                mean_epoch * full_epochs / args.workers / 60, 1
            )
    figures["load_average"] = [round(v, 1) for v in os.getloadavg()]
    for key, value in figures.items():
        print(f"{key:>30}: {value}")
    if not (args.max_classes or args.max_per_class) and len(trials) == 40:
        within = wall <= WALL_BAR_S
        accurate = bool(
            best and best.val_accuracy >= ACCURACY_BAR and (best.test_top1 or 0) >= ACCURACY_BAR
        )
        print(f"{'bar (<= 60 min, >= 78%)':>30}: {'PASS' if within and accurate else 'FAIL'}")
    shrunk = bool(args.max_classes or args.max_per_class)
    name = args.name or (None if shrunk else "search_book_grid")
    if name:
        record_result(name, figures)


def simulate_trained_epochs(search: SearchConfig, trials: int, epochs: int, seed: int = 0) -> int:
    """Epochs the pruner lets ``trials`` sequential trials train, on random learning curves."""
    import optuna

    from cnnkit.search.study import build_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=build_pruner(search))
    random = np.random.default_rng(seed)
    trained = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal trained
        final, speed = random.uniform(0.5, 0.85), random.uniform(0.5, 2.0)
        for epoch in range(1, epochs + 1):
            trained += 1
            value = final * (1 - np.exp(-speed * epoch)) + random.normal(0, 0.01)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=trials)
    return trained


def full_epoch_seconds(run_dir: Path) -> dict[tuple[int, int], float]:
    """(convs, dense) -> seconds a full fold-1 epoch would take at the measured throughput."""
    rates: dict[tuple[int, int], list[float]] = {}
    for trial_dir in sorted((run_dir / "trials").glob("trial-*")):
        config_path, metrics_path = trial_dir / "config.yaml", trial_dir / "metrics.csv"
        if not (config_path.is_file() and metrics_path.is_file()):
            continue
        options = yaml.safe_load(config_path.read_text())["model"]["options"]
        with open(metrics_path, encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        key = (int(options["convs"]), int(options["dense"]))
        rates.setdefault(key, []).extend(float(row["images_per_second"]) for row in rows)
    return {key: FULL_TRAIN_IMAGES / (sum(v) / len(v)) for key, v in rates.items() if v}


if __name__ == "__main__":
    main()
