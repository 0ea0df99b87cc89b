"""``cnnkit search``: a hyperparameter study over the training command's settings."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.overrides import overrides_from_args
from cnnkit.cli.settings import print_config, resolve_run_config
from cnnkit.cli.train import note_an_unused_test_share, print_data_summary
from cnnkit.paths import default_cache_dir

if TYPE_CHECKING:
    from cnnkit.config import RunConfig
    from cnnkit.search.config import SearchConfig
    from cnnkit.search.driver import SearchResult


def _print_trial(summary) -> None:
    from cnnkit.evaluation.search_plots import format_value

    params = "  ".join(f"{name}={format_value(value)}" for name, value in summary.params.items())
    accuracy = "" if summary.val_accuracy is None else f"val {summary.val_accuracy:.4f}"
    test = "" if summary.test_top1 is None else f"  test {summary.test_top1:.4f}"
    seconds = "" if summary.seconds is None else f"  {summary.seconds:.0f}s"
    if summary.repeats is not None:
        seconds = f"  (repeats trial {summary.repeats}: not trained again)"
    print(
        f"trial {summary.number:>3}  {summary.state:<8}  {params}  {accuracy}{test}"
        f"  {summary.epochs} epoch(s){seconds}"
    )


# Flags whose names are not their settings' (argparse dest -> the flag a user types).
_FLAG_NAMES = {
    "learning_rate": "--lr",
    "mixup_alpha": "--mixup",
    "cutmix_alpha": "--cutmix",
    "ema_decay": "--ema",
    "micro_batch_size": "--micro-batch",
}
_MISSING = object()


def _setting(nested: dict, target: str) -> object:
    """The value at a dotted ``target`` of nested settings, or ``_MISSING`` (a null is set)."""
    node: object = nested
    for key in target.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _flag_setting(args: argparse.Namespace, target: str) -> str | None:
    """The flag (as typed, with its value) that sets ``target``, or None: found by leaving out
    one given flag at a time, so every flag counts however it maps onto the settings."""
    overrides = overrides_from_args(args)
    if _setting(overrides, target) in (_MISSING, None):
        return None
    for text in args.option:
        key = text.split("=", 1)[0].strip()
        if target == f"model.options.{key}":
            return f"--option {text}"
    for dest, value in vars(args).items():
        if value is None or value is False or dest == "option":
            continue
        without = argparse.Namespace(**{**vars(args), dest: None})
        try:
            unset = _setting(overrides_from_args(without), target) in (_MISSING, None)
        except (AttributeError, TypeError):
            continue
        if unset:
            flag = _FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))
            return flag if value is True else f"{flag} {value}"
    return None


def refuse_settings_the_space_searches(args: argparse.Namespace, space, file_layer: dict) -> None:
    """Refuse a flag, ``--option`` or ``--config`` setting that a space parameter also sets:
    every trial would silently train with the space's value instead of the one given. A file's
    value that the preset gives anyway (as ``--print-config`` writes it) is no such setting.

    Raises:
        CommandError: naming the flag (or the file and the setting) and the parameter.
    """
    reference: dict | None = None
    for parameter in space.parameters:
        target = parameter.target
        flag = _flag_setting(args, target)
        if flag is not None:
            raise CommandError(
                f"{flag}: the space {args.space!r} searches {target}; drop the flag or the "
                "parameter"
            )
        given = _setting(file_layer, target)
        if given is _MISSING:
            continue
        if reference is None:
            reference = _settings_without_the_file(args, space, file_layer)
        # A value the preset gives anyway (a file --print-config wrote) changes nothing.
        if given != _setting(reference, target):
            raise CommandError(
                f"{args.config}: {target} is set there to {given!r}, and the space "
                f"{args.space!r} searches it; remove it from the file or drop the parameter"
            )


def _settings_without_the_file(args: argparse.Namespace, space, file_layer: dict) -> dict:
    """The search's base settings as the preset, the model's own options and the flags give
    them, without the --config file (whose dataset and model still pick the preset); empty
    where they do not resolve without it."""
    from cnnkit.config import config_to_dict
    from cnnkit.training.run_folder import with_model_defaults

    bare = argparse.Namespace(**{**vars(args), "config": None})
    picking = (("dataset", "data.dataset"), ("data", "data.data"), ("model", "model.name"))
    for dest, target in picking:
        value = _setting(file_layer, target)
        if getattr(bare, dest) is None and value is not _MISSING:
            setattr(bare, dest, value)
    if bare.preset is None and bare.model is None and space.preset:
        bare.preset = space.preset
    try:
        return config_to_dict(with_model_defaults(resolve_run_config(bare, detect_photos=False)))
    except (CommandError, ValueError):
        return {}


def command_search(args: argparse.Namespace) -> int:
    from cnnkit.runtime import tune_allocator
    from cnnkit.search.driver import run_search
    from cnnkit.search.spaces import SPACES, resolve_space
    from cnnkit.training.trainer import TrainingInterrupted

    space = resolve_space(args.space)
    base, given_out = _base_config(args, space)
    if args.print_config:
        # The trials' settings before the space varies them, and the folder only if given.
        return print_config(dataclasses.replace(base, out=given_out))
    if base.train.fast_path:
        tune_allocator()
    search = _search_config(args, base)
    cache_dir = args.cache_dir or base.data.cache_dir or default_cache_dir()
    try:
        result = run_search(
            base,
            space,
            search,
            cache_dir=cache_dir,
            progress=not args.quiet,
            on_trial=_print_trial,
            on_data=lambda data: _report_data(data, base),
            space_file=None if args.space in SPACES else args.space,
        )
    except (TrainingInterrupted, KeyboardInterrupt) as interrupted:
        detail = f" {interrupted.summary}" if isinstance(interrupted, TrainingInterrupted) else ""
        print(f"\nInterrupted{detail}. Rerun the same command to continue the study.")
        return 130
    _print_result(result)
    return 0


def _base_config(args: argparse.Namespace, space) -> tuple[RunConfig, str | None]:
    """The config every trial starts from, and the search folder given by ``--out`` or the
    ``--config`` file (None where neither gives one, and the base's ``out`` is the default).

    Raises:
        CommandError: for a setting the space also searches.
    """
    from cnnkit.config import DataConfig, load_config_file

    file_layer = load_config_file(args.config) if args.config else {}
    refuse_settings_the_space_searches(args, space, file_layer)
    if args.preset is None and args.model is None and space.preset:
        args.preset = space.preset
    base = resolve_run_config(args, detect_photos=False)  # The space decides the model.
    given_out = base.out  # From --out, else from the --config file's out.
    held_out_given = args.val_fraction is not None or _setting(
        file_layer, "data.val_fraction"
    ) not in (_MISSING, None)
    if base.data.val_fraction == 0 and not held_out_given:
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
    return base, given_out


def _search_config(args: argparse.Namespace, base: RunConfig) -> SearchConfig:
    """The search's own settings from its flags (workers: one per core on a CPU, up to 4)."""
    from cnnkit.search.config import SearchConfig
    from cnnkit.search.workers import default_workers

    return SearchConfig(
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


def _report_data(data, base) -> None:
    """The data line, and a note where the search's test share goes unused."""
    print_data_summary(data)
    note_an_unused_test_share(data, base)


def _print_result(result: SearchResult) -> None:
    """The study's counts, its best trial (and its model), and where the results are."""
    from cnnkit.evaluation.run_files import retrained_from
    from cnnkit.search.trials import trial_dir

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
        best_model = trial_dir(result.run_dir, best.number) / "model.safetensors"
        if result.retrained is None and best_model.is_file():
            print(f"Best trial's model: {best_model} (--retrain-best trains it on train+val)")
        earlier = result.run_dir / "best"
        stale = retrained_from(earlier, trial_dir(result.run_dir, best.number)) is False
        if result.retrained is None and stale:
            print(
                f"Note: {earlier} holds an earlier best trial's retraining, not trial "
                f"{best.number}'s (--retrain-best with the same --out retrains it)"
            )
    if result.retrained is not None:
        metrics = result.retrained.test_metrics
        print(f"Retrained on train+val: test top-1 {metrics.get('top1', float('nan')):.4f}")
        print(f"Model: {result.retrained.model_path}")
    print(f"Results: {result.files.get('md')} (CSV, plots, tensorboard/ with HParams)")
    print(f"Report: cnnkit report {shlex.quote(str(result.run_dir))}")
