"""``cnnkit search``: a hyperparameter study over the training command's settings."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from cnnkit.cli.settings import print_config, resolve_run_config
from cnnkit.cli.train import print_data_summary
from cnnkit.paths import default_cache_dir


def _print_trial(summary) -> None:
    from cnnkit.evaluation.search_plots import format_value

    params = "  ".join(f"{name}={format_value(value)}" for name, value in summary.params.items())
    accuracy = "" if summary.val_accuracy is None else f"val {summary.val_accuracy:.4f}"
    test = "" if summary.test_top1 is None else f"  test {summary.test_top1:.4f}"
    seconds = "" if summary.seconds is None else f"  {summary.seconds:.0f}s"
    print(
        f"trial {summary.number:>3}  {summary.state:<8}  {params}  {accuracy}{test}"
        f"  {summary.epochs} epoch(s){seconds}"
    )


def command_search(args: argparse.Namespace) -> int:
    from cnnkit.config import DataConfig
    from cnnkit.runtime import tune_allocator
    from cnnkit.training.search import SearchConfig, run_search
    from cnnkit.training.search_workers import default_workers
    from cnnkit.training.spaces import SPACES, resolve_space
    from cnnkit.training.trainer import TrainingInterrupted

    space = resolve_space(args.space)
    if args.preset is None and args.model is None and space.preset:
        args.preset = space.preset
    base = resolve_run_config(args, detect_photos=False)  # The space decides the model.
    given_out = base.out  # From --out, else from the --config file's out.
    if base.data.val_fraction == 0 and args.val_fraction is None:
        # Trials are ranked on held-out images; a preset without a validation split (it trains
        # on all of them) would rank them on training accuracy.
        share = DataConfig().val_fraction
        base = dataclasses.replace(base, data=dataclasses.replace(base.data, val_fraction=share))
        print(
            f"Trials are compared on a validation split: {share:.0%} of the training images are "
            "held out (the preset has none; --val-fraction sets the share).",
            file=sys.stderr,
        )
    if given_out is None:
        out = Path("runs") / f"search-{base.data.dataset}-{space.name}"
        base = dataclasses.replace(base, out=str(out))
    if args.print_config:
        # The trials' settings before the space varies them, and the folder only if given.
        return print_config(dataclasses.replace(base, out=given_out))
    if base.train.fast_path:
        tune_allocator()
    search = SearchConfig(
        sampler=args.sampler,
        pruner=args.pruner,
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study_name,
        sampler_seed=args.sampler_seed,
        prune_warmup=args.prune_warmup,
        retrain_best=args.retrain_best,
        keep_checkpoints=args.keep_checkpoints,
        workers=default_workers(base.train.device) if args.workers is None else args.workers,
    )
    cache_dir = args.cache_dir or base.data.cache_dir or default_cache_dir()
    try:
        result = run_search(
            base,
            space,
            search,
            cache_dir=cache_dir,
            progress=not args.quiet,
            on_trial=_print_trial,
            on_data=print_data_summary,
            space_file=None if args.space in SPACES else args.space,
        )
    except (TrainingInterrupted, KeyboardInterrupt) as interrupted:
        detail = f": {interrupted}" if str(interrupted) else ""
        print(f"\nInterrupted{detail}. Rerun the same command to continue the study.")
        return 130
    counts = result.counts
    rerun = f", {counts['rerun']} interrupted and queued again" if counts["rerun"] else ""
    print(
        f"\nStudy {result.study_name}: {counts['complete']} finished, {counts['pruned']} pruned, "
        f"{counts['fail']} failed{rerun} ({result.seconds:.0f}s); storage {result.storage}"
    )
    best = result.best
    if best is not None:
        params = ", ".join(f"{name}={value}" for name, value in best.params.items())
        test = "" if best.test_top1 is None else f", test {best.test_top1:.4f}"
        print(f"Best: trial {best.number} ({params}): val {best.val_accuracy:.4f}{test}")
        from cnnkit.training.search import trial_dir

        best_model = trial_dir(result.run_dir, best.number) / "model.safetensors"
        if result.retrained is None and best_model.is_file():
            print(f"Best trial's model: {best_model} (--retrain-best trains it on train+val)")
    if result.retrained is not None:
        metrics = result.retrained.test_metrics
        print(f"Retrained on train+val: test top-1 {metrics.get('top1', float('nan')):.4f}")
        print(f"Model: {result.retrained.model_path}")
    print(f"Results: {result.files.get('md')} (CSV, plots, tensorboard/ with HParams)")
    print(f"Report: cnnkit report {result.run_dir}")
    return 0
