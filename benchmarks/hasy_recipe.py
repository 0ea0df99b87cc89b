"""HASYv2 fold-1 bars: the default recipe (>= 87% top-1, >= 99% top-5, <= 30 min including
data loading; time to first reach 81%) and the book's CNN with the book's settings (>= 76%).

    python benchmarks/hasy_recipe.py default      # cnnkit train --dataset hasy --fold 1
    python benchmarks/hasy_recipe.py book         # --model book_cnn (book-hasy preset)
    python benchmarks/hasy_recipe.py default --config variant.yaml --name hasy_variant

``--config`` layers a YAML file (the format of ``cnnkit train --config``) over the preset, for
trying a variant of the recipe; ``--name`` records it under another name. ``--cache-dir`` reuses
a decoded-image cache that another run filled (several variants at once on one GPU, as
``benchmarks/hasy_gpu_sweep.sh`` runs them); the wall time then leaves out the first decode.

Each epoch the test split is also evaluated (outside the timed training) to find when 81% is
first reached; that evaluation time is subtracted from the reported wall time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.record import record_result, shared_dataset
from cnnkit.config import build_run_config, config_to_dict, load_config_file
from cnnkit.data.loader import BatchLoader, build_eval_transform
from cnnkit.data.sources import build_splits
from cnnkit.presets import preset_for
from cnnkit.runtime import select_device, tune_allocator
from cnnkit.training.preprocessing import resolve_preprocessing
from cnnkit.training.run import train_run
from cnnkit.training.trainer import Callback

RECIPES = {"default": "hasy", "book": "book-hasy"}


class TestAccuracyProbe(Callback):
    """Evaluates the test split after each epoch and records when a target is first reached."""

    def __init__(self, target: float, start: float) -> None:
        self.target, self.start = target, start
        self.loader: BatchLoader | None = None
        self.probe_seconds = 0.0
        self.curve: list[tuple[int, float, float]] = []
        self.reached_at: float | None = None

    def on_epoch_end(self, trainer, metrics) -> None:
        began = time.perf_counter()
        elapsed = began - self.start - self.probe_seconds
        accuracy = trainer.evaluate(self.loader)["accuracy"]
        self.probe_seconds += time.perf_counter() - began
        self.curve.append((int(metrics["epoch"]), accuracy, elapsed))
        # Printed as it comes, so a run stopped at a time limit still shows its curve.
        print(f"epoch {int(metrics['epoch'])}: test top-1 {accuracy:.4f}", flush=True)
        if self.reached_at is None and accuracy >= self.target:
            self.reached_at = elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--option", action="append", default=[], help="model option KEY=INT")
    parser.add_argument("--config", help="YAML overrides on top of the preset (a variant)")
    parser.add_argument("--name", help="record under benchmarks/results/NAME.json")
    parser.add_argument("--keep-model", help="copy the trained model file to this path")
    parser.add_argument(
        "--cache-dir", help="reuse this decoded-image cache (default: a fresh one, timed)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    parser.add_argument(
        "--fill-cache-only",
        action="store_true",
        help="decode the data into --cache-dir and stop (before runs that share it)",
    )
    args = parser.parse_args()
    archive = shared_dataset("HASYv2-dev.tar.bz2")
    tune_allocator()
    options = {key: int(value) for key, value in (o.split("=") for o in args.option)}
    # The run folder and a fresh cache go in a temporary folder, removed at the end (the
    # results file, and the model with --keep-model, stay).
    with tempfile.TemporaryDirectory(prefix="cnnkit-hasy-bench-") as work:
        config = build_run_config(
            preset_for(RECIPES[args.recipe]),
            load_config_file(args.config) if args.config else {},
            {
                "data": {"dataset": "hasy", "data": str(archive), "fold": args.fold},
                "train": {"epochs": args.epochs},
                "model": {"options": options or None},
                "out": f"{work}/run",
            },
        )
        if args.fill_cache_only:
            if not args.cache_dir:
                parser.error("--fill-cache-only needs --cache-dir")
            began = time.perf_counter()
            build_splits(config.data, resolve_preprocessing(config), args.cache_dir, progress=False)
            print(f"filled {args.cache_dir} in {time.perf_counter() - began:.1f} s")
            return
        start = time.perf_counter()
        probe = TestAccuracyProbe(0.81, start)

        def attach_test_loader(data) -> None:
            probe.loader = BatchLoader(
                data.splits.test,
                1024,
                build_eval_transform(resolve_preprocessing(config)),
                device=select_device(config.train.device),
            )

        # A fresh cache folder unless --cache-dir: the timed figure then includes decoding.
        result = train_run(
            config,
            cache_dir=args.cache_dir or f"{work}/cache",
            progress=not args.no_progress,
            callbacks=[probe],
            on_data=attach_test_loader,
        )
        wall = time.perf_counter() - start - probe.probe_seconds
        for epoch, accuracy, elapsed in probe.curve:
            print(f"epoch {epoch:>2}: test top-1 {accuracy:.4f} at {elapsed / 60:.1f} min")
        metrics = result.test_metrics
        print(f"recipe {args.recipe}: {result.data_description}")
        print(f"test top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}")
        print(f"wall time {wall / 60:.1f} min (data {result.seconds['data']:.0f} s)")
        reached = f"{probe.reached_at / 60:.1f} min" if probe.reached_at else "not reached"
        print(f"first reached 81% test top-1: {reached}")
        path = record_result(
            args.name or f"hasy_{args.recipe}",
            {
                "config": config_to_dict(config),
                "epochs": result.fit.epochs_run,
                "test_top1": metrics["top1"],
                "test_top5": metrics["top5"],
                "wall_minutes": wall / 60,
                "data_seconds": result.seconds["data"],
                "minutes_to_81": probe.reached_at / 60 if probe.reached_at else None,
                "curve": probe.curve,
                "threads": torch.get_num_threads(),
                "device": str(select_device(config.train.device)),
                "cache": "shared, filled before the run" if args.cache_dir else "fresh",
            },
        )
        print(f"saved {path}")
        if args.keep_model:
            Path(args.keep_model).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.model_path, args.keep_model)
            print(f"kept the model as {args.keep_model}")


if __name__ == "__main__":
    main()
