"""The ``cnnkit`` command line: parse arguments, build configs, call the library, print results.

This is the only module that reads ``sys.argv`` and the environment, and the only one that
prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cnnkit import __version__
from cnnkit.errors import error_line
from cnnkit.paths import RUN_INFO, default_cache_dir, is_search_folder

PHOTO_MODELS_PRESET = {"book_bird_cnn": "book-cub", "book_cnn": "book-hasy"}
PHOTO_MODEL = "efficientnet_lite0"  # For a folder or CSV of photos when no model is named.
# Flags that set a model option (--dense 64 is --option dense=64).
MODEL_OPTION_FLAGS = ("dense", "dropout", "convs", "width")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def distributed_from_env(device: str = "auto"):
    """Rank information set by torchrun, or a single-process context; ``device`` is the
    training device's name (its type picks NCCL or gloo)."""
    from cnnkit.runtime import init_distributed, select_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return init_distributed(rank, local_rank, world_size, select_device(device))


# ----------------------------------------------------------------------------- arguments


DATASETS = ("hasy", "cub", "folder", "csv", "digits")


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[minimum, maximum]``, so a bad value is refused
    before any work, in a line that names the flag (``argument --patience: ...``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}; got {value}")
        return value

    return parse


def share(text: str) -> float:
    """An argparse type: a share of the images, in ``[0, 1)``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1; got {text}")
    return value


VERBOSE_HELP = "log debug details, and show the whole traceback of an error"


def _add_data_arguments(
    parser: argparse.ArgumentParser, required: bool = True, model_input: bool = True
) -> None:
    """The data options; ``model_input=False`` leaves out those a saved model decides itself
    (its channels and input size) and the validation share (evaluate holds none out)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        required=required,
        help="data source: HASYv2, CUB-200-2011, a folder per class, a path,label CSV, "
        "or scikit-learn's digits"
        + (
            ""
            if model_input
            else " (default: the data the model file records, with its --data and --fold)"
        ),
    )
    group.add_argument("--data", help="archive, folder or CSV file of the dataset")
    group.add_argument(
        "--fold", type=whole(1, 10), help="HASYv2 fold K (1-10): train/test from fold-K"
    )
    if model_input:
        group.add_argument(
            "--channels",
            type=int,
            choices=[1, 3],
            help="1 (symbols) or 3 (photos, the book's CNN)",
        )
        group.add_argument("--image-size", type=int, help="model input size for symbols (pixels)")
        group.add_argument(
            "--val-fraction",
            type=share,
            help="share of the training images held out for validation",
        )
    group.add_argument("--test-fraction", type=share, help="test share without an official split")
    group.add_argument(
        "--on-bad-image",
        choices=["error", "skip"],
        help="stop on a missing/corrupt image (default) or skip it with a warning",
    )
    group.add_argument("--cache-dir", help=f"decoded-image cache (default {default_cache_dir()})")
    group.add_argument(
        "--crop-to-bbox",
        action="store_true",
        default=None,
        help="CUB: crop each photo to its bird's bounding box (bounding_boxes.txt)",
    )
    group.add_argument("--max-classes", type=whole(1), help="use only the first N classes")
    group.add_argument("--max-per-class", type=whole(1), help="use at most N images per class")


def _add_train_arguments(parser: argparse.ArgumentParser, search: bool = False) -> None:
    _add_data_arguments(parser, required=False)  # --config may name the dataset instead.
    parser.add_argument(
        "--preset",
        help="named defaults: digits, hasy, book-hasy, book-hasy-search, cub, book-cub",
    )
    parser.add_argument("--config", help="YAML file with data/model/augment/train sections")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings (preset < --config < flags) as YAML and exit",
    )
    if search:
        parser.add_argument("--out", help="search folder (default runs/search-<dataset>-<space>)")
    else:
        parser.add_argument("--out", help="run folder (default runs/<dataset>-<model>)")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="nothing while training (no progress bars or per-epoch lines); the epochs are "
        "listed once at the end",
    )
    if not search:  # A search ranks its trials on held-out images.
        parser.add_argument(
            "--train-on-all", action="store_true", default=None, help="fit on train+test (final)"
        )
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="registry name (`cnnkit models` lists them)")
    model.add_argument("--dense", type=int, help="book_cnn: dense units (128; 1024 variant)")
    model.add_argument("--dropout", type=float, help="dropout before the classifier")
    model.add_argument("--convs", type=int, help="book_cnn: number of conv layers (1 or 2)")
    model.add_argument("--width", type=int, help="symbol_cnn: channels of the first stage")
    model.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="any model option"
    )
    train = parser.add_argument_group(
        "training",
        "Unset options come from the preset and --config (--print-config shows them all).",
    )
    train.add_argument(
        "--epochs",
        type=whole(1),
        help="passes over the training images (transfer models: the fine-tune's; the frozen "
        "phase's head uses transfer.head_epochs)",
    )
    train.add_argument(
        "--batch-size", type=whole(1), help="images per optimiser step (all processes)"
    )
    train.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="the optimiser")
    train.add_argument(
        "--lr", "--learning-rate", dest="learning_rate", type=float, help="peak learning rate"
    )
    train.add_argument(
        "--weight-decay", type=float, help="weight decay (decoupled for AdamW, L2 otherwise)"
    )
    train.add_argument(
        "--schedule",
        choices=["onecycle", "cosine", "constant"],
        help="learning-rate schedule, after a warm-up of train.warmup_fraction of the steps",
    )
    train.add_argument(
        "--label-smoothing", type=float, help="share of each target spread over all classes"
    )
    train.add_argument(
        "--mixup",
        dest="mixup_alpha",
        type=float,
        metavar="ALPHA",
        help="Mixup: train on blends of image pairs (0 off; 0.2-0.4 typical)",
    )
    train.add_argument(
        "--cutmix",
        dest="cutmix_alpha",
        type=float,
        metavar="ALPHA",
        help="CutMix: paste a box of another image (0 off; 1.0 typical)",
    )
    train.add_argument(
        "--ema",
        dest="ema_decay",
        type=float,
        metavar="DECAY",
        help="keep a moving average of the weights and save it as the model "
        "(0 off; 0.99-0.9999, longer runs higher)",
    )
    train.add_argument(
        "--micro-batch",
        dest="micro_batch_size",
        type=whole(1),
        metavar="N",
        help="at most N samples per forward pass (per process under torchrun); gradients add "
        "up over the batch (default: the whole batch, split when it would not fit in memory)",
    )
    train.add_argument(
        "--patience", type=whole(1), help="early stopping after N epochs without gain"
    )
    train.add_argument("--seed", type=int, help="seed for splits, init, shuffling, augmentation")
    train.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to train (auto: cuda, then mps, then cpu)",
    )
    train.add_argument("--no-amp", action="store_true", default=None, help="disable CUDA AMP")
    train.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast on CPU")
    train.add_argument(
        "--no-fast-path", action="store_true", default=None, help="no CPU allocator/layout tuning"
    )
    train.add_argument(
        "--max-steps-per-epoch", type=whole(1), help="cap batches per epoch (quick runs)"
    )
    train.add_argument("--no-augment", action="store_true", default=None, help="no augmentation")
    train.add_argument("--rotation", type=float, help="max rotation in degrees (augmentation)")
    train.add_argument(
        "--train-size",
        type=int,
        metavar="PX",
        help="side of the augmented training crops, for models that take any size (default: "
        "the model's input size; smaller trains faster and, with random resized crops, "
        "shows objects at their test-time size)",
    )
    train.add_argument(
        "--phases",
        help="transfer models: frozen,finetune (default both) or frozen",
    )


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise CommandError(f"--option needs KEY=VALUE; got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise CommandError(f"--option needs KEY=VALUE; got {text!r} (no key)")
    import yaml

    from cnnkit.config import number_from_text

    return key.strip(), number_from_text(yaml.safe_load(raw))


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit flags as nested config overrides (unset flags are absent)."""
    options = dict(_parse_option(text) for text in args.option)
    for key in MODEL_OPTION_FLAGS:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    seed = args.seed
    return {
        "data": {
            "dataset": args.dataset,
            "data": args.data,
            "fold": args.fold,
            "channels": args.channels,
            "image_size": args.image_size,
            "val_fraction": args.val_fraction,
            "test_fraction": args.test_fraction,
            "on_bad_image": args.on_bad_image,
            "crop_to_bbox": args.crop_to_bbox,
            "max_classes": args.max_classes,
            "max_per_class": args.max_per_class,
            "train_on_all": getattr(args, "train_on_all", None),
            "seed": seed,
        },
        "model": {"name": args.model, "options": options or None},
        "augment": {
            "enabled": False if args.no_augment else None,
            "max_rotation": args.rotation,
            "train_size": args.train_size,
        },
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": args.optimizer,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "schedule": args.schedule,
            "label_smoothing": args.label_smoothing,
            "mixup_alpha": args.mixup_alpha,
            "cutmix_alpha": args.cutmix_alpha,
            "ema_decay": args.ema_decay,
            "early_stopping_patience": args.patience,
            "seed": seed,
            "device": args.device,
            "amp": False if args.no_amp else None,
            "bf16_cpu": args.bf16,
            "fast_path": False if args.no_fast_path else None,
            "max_steps_per_epoch": args.max_steps_per_epoch,
            "micro_batch_size": args.micro_batch_size,
        },
        "transfer": {"phases": args.phases.split(",") if args.phases else None},
        "out": args.out,
    }


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` without its unset (``None``) settings, at every level."""
    return {
        key: _given(value) if isinstance(value, dict) else value
        for key, value in overrides.items()
        if value is not None
    }


def _file_text(file_layer: dict, dotted: str, path: str | None) -> str | None:
    """A text setting of the --config file (``model.name``) that picks the preset, checked
    before the preset is chosen with it: a list there would fail as "unhashable"."""
    section, key = dotted.split(".")
    value = (file_layer.get(section) or {}).get(key)
    if value is not None and not isinstance(value, str | os.PathLike):
        raise CommandError(f"{path}: {dotted} must be text; got {value!r}")
    return value


def resolve_run_config(args: argparse.Namespace, detect_photos: bool = True):
    """defaults < preset < --config file < flags.

    With ``detect_photos``, a folder or CSV dataset with no model, preset or model options
    given trains the photo recipe when its images are colour photos (see ``looks_like_photos``).
    """
    from cnnkit.config import PRESETS, build_run_config, load_config_file, preset_for

    file_layer = load_config_file(args.config) if args.config else {}
    dataset = args.dataset or _file_text(file_layer, "data.dataset", args.config)
    if dataset is None:
        raise CommandError("--dataset is required (or data.dataset in the --config file)")
    args.dataset = dataset  # Default folder names use it.
    model_name = args.model or _file_text(file_layer, "model.name", args.config)
    preset = args.preset
    data = args.data or _file_text(file_layer, "data.data", args.config)
    options_given = bool(
        args.option
        # Every model takes a dropout, so --dropout alone says nothing about which network.
        or any(getattr(args, key) is not None for key in ("dense", "convs", "width"))
        or (file_layer.get("model") or {}).get("options")
    )
    unnamed = preset is None and model_name is None and not options_given
    if detect_photos and unnamed and dataset in ("folder", "csv") and data:
        from cnnkit.data.sources import looks_like_photos

        photos, seen = looks_like_photos(dataset, str(data))
        if photos:  # The symbol network's 32 px grayscale input would waste these photos.
            model_name = args.model = PHOTO_MODEL
            args.chosen_because = (
                f"Photos ({seen}): training {PHOTO_MODEL} with the cub transfer recipe "
                "(--model symbol_cnn trains the small symbol network instead)"
            )
    if preset is None and model_name in PHOTO_MODELS_PRESET:
        preset = PHOTO_MODELS_PRESET[model_name]
    if preset is None and model_name and model_name.startswith("efficientnet"):
        preset = "cub"
    if preset is None:
        preset = dataset if dataset in PRESETS else "hasy"
    overrides = _given(overrides_from_args(args))
    try:
        # A null in the file turns a setting off; unset flags were left out above.
        config = build_run_config(preset_for(preset), file_layer, overrides, apply_nulls=True)
    except ValueError as error:
        if _file_at_fault(preset_for(preset), file_layer, overrides):
            raise CommandError(f"{args.config}: {error}") from None
        raise
    return _fit_to_model_input(config, args)


def _fit_to_model_input(config, args: argparse.Namespace):
    """Settle the input size between the data settings and the model, before any data loads.

    A photo model takes photos at its own input size: ``--image-size`` is refused unless it
    agrees, and the data settings (so config.yaml) record the size used. A symbol model whose
    layers are sized for its input (book_cnn) gets ``data.image_size`` as its ``image_size``
    option, which its model file then records.
    """
    from cnnkit.models.registry import check_options, model_input, model_options

    name, data = config.model.name, config.data
    options = check_options(name, config.model.options)
    takes_size = "image_size" in model_options(name)
    preprocessing = model_input(name, data.channels, options)
    if preprocessing.mode == "photo":
        if args.image_size is not None and args.image_size != preprocessing.image_size:
            how = "--option image_size=N sets it" if takes_size else "it is fixed"
            raise CommandError(
                f"--image-size {args.image_size}: {name} takes photos at its own input size "
                f"({preprocessing.image_size} px; {how})"
            )
        data = dataclasses.replace(
            data, image_size=preprocessing.image_size, stored_size=preprocessing.stored_size
        )
    elif takes_size:
        given = options.get("image_size")
        from_flags = "image_size" in dict(_parse_option(text) for text in args.option)
        if given not in (None, data.image_size) and (args.image_size is None or from_flags):
            raise CommandError(
                f"model option image_size={given} differs from the input size "
                f"({data.image_size} px): {name} is sized by --image-size (data.image_size)"
            )
        options = {**options, "image_size": data.image_size}
    model = dataclasses.replace(config.model, options=options)
    return dataclasses.replace(config, data=data, model=model)


def _file_at_fault(preset: dict, file_layer: dict, overrides: dict) -> bool:
    """Whether the settings build without the --config file's own (keeping its data section,
    which may name the dataset the flags' settings need): the error is then the file's."""
    from cnnkit.config import build_run_config

    if not file_layer:
        return False
    for kept in ({}, {"data": file_layer.get("data") or {}}):
        try:
            build_run_config(preset, kept, overrides, apply_nulls=True)
        except ValueError:
            continue
        return True
    return False


# ----------------------------------------------------------------------------- commands


def _print_data_summary(data) -> None:
    source = "cache" if data.from_cache else "decoded"
    print(f"Data: {data.splits.description} ({source})")
    if data.problems:
        print(f"Skipped {len(data.problems)} bad image(s); first: {data.problems[0]}")


def _print_config(config) -> int:
    """``--print-config``: the resolved settings as YAML that ``--config`` reads back, with all
    of the model's options (a preset chosen on reading cannot then add its own)."""
    from cnnkit.config import dump_config
    from cnnkit.models.registry import check_options
    from cnnkit.training.run import with_model_defaults

    check_options(config.model.name, config.model.options)  # What training would refuse.
    print(dump_config(with_model_defaults(config)), end="")
    return 0


def command_train(args: argparse.Namespace) -> int:
    from cnnkit.runtime import shutdown_distributed, tune_allocator
    from cnnkit.training.run import train_run
    from cnnkit.training.trainer import TrainingInterrupted

    config = resolve_run_config(args)
    if args.print_config:
        return _print_config(config)
    data = config.data.data
    if data is not None and not _path_test(str(data), Path.exists):
        # Before a run folder is chosen and announced: no run starts.
        raise CommandError(f"{data}: no such archive, folder or file")
    default_dir = config.run_dir() if config.out is None else None
    if default_dir is not None:
        # A default folder that holds a finished run is kept: a new run gets the next free
        # name (runs/x-2, runs/x-3...), and --resume continues the newest of them.
        chosen = _latest_run_dir(default_dir) if args.resume else _free_run_dir(default_dir)
        config = dataclasses.replace(config, out=str(chosen))
    if config.train.fast_path:
        tune_allocator()
    distributed = distributed_from_env(config.train.device)
    is_main = distributed.is_main
    if is_main and getattr(args, "chosen_because", None):
        print(args.chosen_because)
    no_val = config.data.val_fraction == 0 or config.data.train_on_all
    if is_main and args.patience is not None and no_val:
        print(
            "Note: --patience needs a validation split (--val-fraction > 0, without "
            "--train-on-all); without one every epoch runs"
        )
    if is_main:
        _print_run_folder_state(config.run_dir(), args.resume, default_dir)
    cache_dir = args.cache_dir or config.data.cache_dir or default_cache_dir()
    try:
        result = train_run(
            config,
            resume=args.resume,
            cache_dir=cache_dir,
            progress=not args.quiet,
            distributed=distributed,
            on_data=_print_data_summary if is_main else None,
        )
    except TrainingInterrupted as interrupted:
        if is_main:
            of = f" of {interrupted.phase}" if interrupted.phase else ""
            print(f"\nInterrupted after {interrupted.epochs_completed} completed epoch(s){of}.")
            if interrupted.checkpoint:
                print(f"Checkpoint: {interrupted.checkpoint}; rerun with --resume to continue.")
        return 130
    finally:
        shutdown_distributed()
    if is_main:
        _print_history(result.fit.history, progress=not args.quiet)
        _print_early_stop(result.fit, config.train.early_stopping_patience)
        metrics = result.test_metrics
        seen = " (images it trained on: --train-on-all)" if config.data.train_on_all else ""
        print(
            f"Test: top-1 {metrics.get('top1', float('nan')):.4f}, "
            f"top-5 {metrics.get('top5', float('nan')):.4f}{seen}"
        )
        print(f"Model: {result.model_path}")
        print(f"Run folder: {result.run_dir} (metrics.csv, tensorboard/, report/, config.yaml)")
    return 0


def _numbered_run_dirs(run_dir: Path) -> list[Path]:
    """``run_dir`` and its existing numbered siblings ``run_dir-2``, ``run_dir-3``..., in order."""
    found, number = [run_dir], 2
    while (candidate := run_dir.with_name(f"{run_dir.name}-{number}")).exists():
        found.append(candidate)
        number += 1
    return found


def _free_run_dir(run_dir: Path) -> Path:
    """The first of ``run_dir``, ``run_dir-2``, ``run_dir-3``... that holds neither a trained
    model nor a checkpoint (a run that ``--resume`` continues).

    Raises:
        CommandError: if the newest of them (the one ``--resume`` continues) holds an unfinished
            run's checkpoint: a fresh run beside it would become the newest, out of reach.
    """
    from cnnkit.training.run import find_checkpoint

    existing = _numbered_run_dirs(run_dir)
    latest = existing[-1]
    if find_checkpoint(latest) and not (latest / "model.safetensors").exists():
        raise CommandError(
            f"{latest} holds an unfinished run: pass --resume to continue it, or --out for a "
            "new run folder"
        )
    free = (d for d in existing if not ((d / "model.safetensors").exists() or find_checkpoint(d)))
    return next(free, run_dir.with_name(f"{run_dir.name}-{len(existing) + 1}"))


def _latest_run_dir(run_dir: Path) -> Path:
    """The newest of ``run_dir`` and its numbered siblings (the one ``--resume`` continues)."""
    return _numbered_run_dirs(run_dir)[-1]


def _print_run_folder_state(run_dir: Path, resume: bool, default_dir: Path | None) -> None:
    """Say whether ``--resume`` found a checkpoint, that a fresh run replaces an old one (in a
    folder given with ``--out``), or that it went to a new folder beside the default one."""
    from cnnkit.training.run import find_checkpoint, holds_a_run

    found = find_checkpoint(run_dir)
    if resume and found:
        print(f"Resuming from {found}")
    elif holds_a_run(run_dir):
        start = f"No checkpoint in {run_dir}: starting fresh. " if resume else ""
        print(
            f"{start}Note: {run_dir} holds an earlier run; this run replaces it (model, logs, "
            "reports; other files stay)"
        )
    elif resume:
        print(f"No checkpoint in {run_dir}: starting fresh")
    elif default_dir is not None and run_dir != default_dir:
        held = "a finished run" if (default_dir / "model.safetensors").exists() else "a run"
        print(f"Note: {default_dir} holds {held}; this one goes to {run_dir}")


def _print_early_stop(fit, patience: int | None) -> None:
    """Say that a run stopped before its last epoch, and which epoch's weights it kept (a
    transfer run's epochs are counted within its last phase, as the history lists them)."""
    from cnnkit.training.transfer import phase_label

    if not fit.stopped_early or not fit.history:
        return
    phase = fit.history[-1].get("phase")
    start = next(i for i, row in enumerate(fit.history) if row.get("phase") == phase)
    stopped, best = len(fit.history) - start, fit.best_epoch - start
    label = "" if phase is None else f"{phase_label(phase)} "
    without = "no validation improvement" + (f" for {patience} epochs" if patience else "")
    kept = f"; kept {label}epoch {best}'s weights" if 1 <= best <= stopped else ""
    if any((row.get("phase") or 0) > 2.0 for row in fit.history):  # An ensemble's members.
        kept = "; the model joins each member's best weights (phases.json lists them)"
    print(f"Stopped early after {label}epoch {stopped}: {without}{kept}.")


def _print_history(history: list[dict[str, float]], progress: bool = False) -> None:
    """The run's epochs, one line each; skipped when ``progress`` already printed them as
    they ended (output that is not a terminal). A transfer run's frozen phase, whose head
    trains for many quick epochs without such lines, gets one line: its epoch count and last
    epoch."""
    from cnnkit.progress import plain_lines
    from cnnkit.training.transfer import FROZEN_PHASE, phase_label

    printed = plain_lines(progress)
    phase_starts: dict[float, int] = {}
    for index, row in enumerate(history):
        label, phase = "", row.get("phase")
        if phase is not None:  # A transfer run: number each phase's epochs from 1.
            start = phase_starts.setdefault(phase, index)
            label = f"{phase_label(phase):<11} "
            row = {**row, "epoch": index - start + 1}
            last_of_phase = index + 1 == len(history) or history[index + 1].get("phase") != phase
            if phase == FROZEN_PHASE:
                if not last_of_phase:
                    continue
                label = f"{phase_label(phase):<11} {int(row['epoch'])} epochs, last: "
        if printed and phase != FROZEN_PHASE:
            continue
        parts = [f"{label}epoch {int(row['epoch']):>3}"]
        for key in ("train_loss", "train_accuracy", "val_accuracy", "val_top5"):
            if key in row:
                parts.append(f"{key} {row[key]:.4f}")
        if "images_per_second" in row:
            parts.append(f"{row['images_per_second']:.0f} img/s")
        print("  ".join(parts))


def _model_path(path: str | None) -> Path:
    """The model file a command means: a file, a training run's folder (its
    model.safetensors), or with none the bundled model; a search folder is refused."""
    from cnnkit.inference.predictor import resolve_model_path

    if path:
        _refuse_search_folder(Path(path))
        _refuse_an_architecture_name(path)
    return resolve_model_path(path or None)


def _refuse_an_architecture_name(path: str) -> None:
    """``--model symbol_cnn`` means an architecture to train, not a file to read: say so."""
    from cnnkit.models.registry import list_models

    if path in list_models() and not Path(path).exists():
        raise CommandError(
            f"{path}: an architecture name, not a trained model: give a model file "
            f"(.safetensors or .onnx) or a training run's folder (`cnnkit train --model {path}` "
            "trains one)"
        )


def _refuse_search_folder(folder: Path) -> None:
    """A search folder holds one model per trial: say which to pass instead."""
    if not is_search_folder(folder):
        return
    best = folder / "best" / "model.safetensors"
    hint = (
        str(best)
        if best.is_file()
        else f"{folder / 'trials' / 'trial-NNN' / 'model.safetensors'} (the best trial is "
        f"ranked first in {folder / 'results.md'}), or rerun the search with --retrain-best"
    )
    raise CommandError(f"{folder} is a search folder, not a model: pass {hint}")


def _report_folder(args: argparse.Namespace, model_path: Path) -> Path:
    """Where evaluate writes its report, refused before any work where a file stands in the
    way (the report would otherwise fail only after every image was scored)."""
    from cnnkit.paths import refuse_unusable_folder

    if args.out:
        out, named = Path(args.out), f"--out {args.out}"
    elif args.model:
        # A run's model file reports to evaluation/; any other file (an export, an int8 copy,
        # a renamed model) to its own folder, so scoring several files in one folder keeps
        # each report.
        own = model_path.name == "model.safetensors"
        out = model_path.parent / ("evaluation" if own else f"evaluation-{model_path.name}")
        named = str(out)
    else:  # Never into the installed package's folder.
        out = Path("runs") / "evaluation-bundled"
        named = str(out)
    refuse_unusable_folder(out, named, needs="the report")
    return out


def _data_the_model_names(args: argparse.Namespace, model_path: Path) -> None:
    """Without ``--dataset``, evaluate on the data the model file records it trained on (its
    dataset, data path and fold; the split settings follow in evaluate), and say so."""
    if model_path.suffix.lower() == ".onnx":  # An export keeps its model file's metadata.
        from cnnkit.inference.onnx_backend import OnnxPredictor

        training = OnnxPredictor.from_file(model_path, threads=1).metadata.training
    else:
        from cnnkit.inference.artifact import ModelMetadata, read_metadata

        training = ModelMetadata.from_dict(read_metadata(model_path), str(model_path)).training
    dataset = training.get("dataset")
    if dataset not in DATASETS:
        raise CommandError(
            f"--dataset is required: {model_path} does not record the data it was trained on"
        )
    data = args.data or training.get("data")
    if data is None and dataset != "digits":
        raise CommandError(
            f"--data is required: {model_path} was trained on {dataset} but does not record "
            "where that data is"
        )
    options = (("data", args.data), ("fold", args.fold))
    given = [f"--{name} {value}" for name, value in options if value is not None]
    args.dataset, args.data = dataset, data
    if args.fold is None:
        args.fold = training.get("fold")
    fold = f" fold {args.fold}" if args.fold is not None else ""
    where = f" ({data})" if data else ""
    source = (
        "as the model file records"
        if not given
        else (f"the dataset as the model file records, {' and '.join(given)} as given")
    )
    print(f"Data: {dataset}{fold}{where}, {source}", file=sys.stderr)


def command_evaluate(args: argparse.Namespace) -> int:
    from cnnkit.evaluation.evaluate import evaluate_model_file
    from cnnkit.runtime import tune_allocator

    model_path = _model_path(args.model)
    if args.dataset is None:
        _data_the_model_names(args, model_path)
    tune_allocator()  # As training does: large activations stay mapped (inference_layout.py).
    overrides = {
        "dataset": args.dataset,
        "data": args.data,
        "fold": args.fold,
        "on_bad_image": args.on_bad_image,
        "max_classes": args.max_classes,
        "max_per_class": args.max_per_class,
        "crop_to_bbox": args.crop_to_bbox,
        "test_fraction": args.test_fraction,
    }
    out = _report_folder(args, model_path)
    report = evaluate_model_file(
        model_path,
        {k: v for k, v in overrides.items() if v is not None},
        out,
        cache_dir=args.cache_dir or default_cache_dir(),
        split=args.split,
        progress=not args.json,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    metrics = report.metrics
    print(f"Evaluated {metrics['count']} images ({args.split} split)")
    for key in ("top1", "top5", "macro_precision", "macro_recall", "macro_f1"):
        print(f"  {key:<16} {metrics[key]:.4f}")
    print("Most confused pairs (true -> predicted: count):")
    for pair in report.confused_pairs[:10]:
        print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")
    print(f"Report: {out} (metrics.json, per_class.csv, confusion.png, misclassified.png)")
    return 0


def expand_images(paths: list[str], errors: list[str] | None = None) -> list[Path]:
    """Files as given, folders expanded to the image files inside them (sorted).

    Raises:
        CommandError: for a folder with no image files in it, unless ``errors`` is given: then
            the message is appended to it and the other paths are still expanded.
    """
    expanded: list[Path] = []
    for text in paths:
        message = None
        try:
            path = Path(text).expanduser()
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                if not found:
                    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                    message = f"{path}: no image files found (looked for {suffixes})"
                expanded.extend(found)
            else:
                expanded.append(path)
        # A name the system cannot look up (~nosuchuser/a.png, one too long, a NUL in it).
        except (OSError, ValueError, RuntimeError) as error:
            reason = error_line(error)
            if isinstance(error, OSError) and error.strerror:
                reason = error.strerror
            message = f"{text}: cannot read ({reason})"
        if message is not None:
            if errors is None:
                raise CommandError(message)
            errors.append(message)
    return expanded


def _path_test(text: str, test: Callable[[Path], bool]) -> bool:
    """``test(Path(text).expanduser())``, or False for a name the system cannot look up."""
    try:
        return test(Path(text).expanduser())
    except (OSError, ValueError, RuntimeError):
        return False


def format_prediction(prediction, kind: str) -> str:
    """The book's formats: symbols with a 0-1 confidence, photos with a percentage."""
    if kind == "photos":
        return f"Prediction: {prediction.label} ({prediction.confidence * 100:.2f}%)"
    return f"Prediction: {prediction.label}, confidence: {prediction.confidence:.2f}"


def command_predict(args: argparse.Namespace) -> int:
    from cnnkit.runtime import tune_allocator

    tune_allocator()
    inputs = list(args.inputs)
    model = args.model
    if model is None and inputs and inputs[0].lower().endswith((".safetensors", ".onnx")):
        model = inputs.pop(0)
    elif model is None and inputs and _path_test(inputs[0], _holds_a_model):
        model = inputs.pop(0)  # A training run's folder: open_predictor finds its model.
    elif model is None and inputs:
        # A name the system cannot look up is an image that cannot be read, reported below.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            _refuse_model_less_first_input(Path(inputs[0]).expanduser())
    if model:
        _refuse_an_architecture_name(model)
    for given in inputs:
        _refuse_a_model_among_images(given, model)
    empty_folders: list[str] = []
    images = expand_images(inputs, empty_folders)
    if not images and empty_folders:
        raise CommandError(empty_folders[0])
    if not images and not args.interactive:
        raise CommandError("no images given (pass files or folders, or use --interactive)")
    from cnnkit.inference.predictor import open_predictor

    predictor = open_predictor(model, args.backend, device=args.device)
    if model is None:
        _warn_of_photos_for_the_symbol_model(images)
    for message in empty_folders:  # Reported like a missing file; the other images go on.
        print(f"error: {message}", file=sys.stderr)
    failures = len(empty_folders)
    failures += _predict_and_print(predictor, images, args.top_k, args.json) if images else 0
    if args.interactive:
        failures += _interactive(predictor, args.top_k, args.json)
    return 1 if failures else 0


def _warn_of_photos_for_the_symbol_model(images: list[str]) -> None:
    """The bundled model answers with a symbol for anything: say once when an input looks like
    a colour photo rather than a symbol drawn black on white."""
    from PIL import Image

    from cnnkit.data.sources import PHOTO_MIN_SIDE

    for path in images:
        try:
            with Image.open(path) as image:
                mode, size = image.mode, image.size
        except (OSError, ValueError):
            continue  # Reported when it is predicted.
        if mode in ("RGB", "RGBA", "CMYK", "YCbCr") and min(size) >= PHOTO_MIN_SIDE:
            print(
                f"warning: {path} is a {size[0]}x{size[1]} colour image; the bundled model "
                "recognises handwritten maths symbols (black on white), so its answer for a "
                "photo means little: pass a model trained on photos",
                file=sys.stderr,
            )
            return


def _holds_a_model(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file()


def _refuse_model_less_first_input(path: Path) -> None:
    """Without ``--model`` the first input is an image (the bundled model answers), so refuse
    one that was meant as a model: predictions from the bundled model would pass for its."""
    _refuse_search_folder(path)  # Not a folder of images to classify.
    if path.is_dir() and (path / RUN_INFO).is_file():  # Written when a run starts.
        raise CommandError(
            f"{path}: a training run's folder without a model.safetensors (the run has not "
            "finished: `cnnkit train ... --resume` with the same --out continues it)"
        )
    if not path.exists() and path.suffix.lower() not in IMAGE_SUFFIXES:
        raise CommandError(
            f"{path}: no such model file, run folder or image (a model ends in .safetensors "
            "or .onnx; a run folder holds model.safetensors)"
        )


def _refuse_a_model_among_images(path: str, model: str | None) -> None:
    """A model file, checkpoint or run folder among the images is a mistake (arguments swapped,
    or a second model): reading it as an image, or its pictures, would answer with another
    model's predictions."""
    chosen = f"the model is {model}" if model else "no model was given, so the bundled one answers"
    first = "the model goes first (cnnkit predict MODEL IMAGE...) or after --model"
    suffix = Path(path).suffix.lower()
    if suffix in (".safetensors", ".onnx") or _path_test(path, _holds_a_model):
        kind = "a training run's folder" if _path_test(path, Path.is_dir) else "a model file"
        raise CommandError(f"{path}: {kind}, not an image ({chosen}): {first}")
    if suffix in (".pt", ".pth"):
        raise CommandError(
            f"{path}: a checkpoint, not an image ({chosen}); a run's model is its "
            f"model.safetensors, and {first}"
        )


def _predict_and_print(
    predictor, images: list[Path], top_k: int, as_json: bool, errors=None, one_line=False
) -> int:
    """Print the predictions for ``images`` and an error line for each bad file (to ``errors``,
    stderr by default); return the number of bad files. ``one_line`` prints the JSON document
    on one line (the interactive loop: one line of JSON per answer, as JSON Lines)."""
    from cnnkit.data.image import BadImageError

    errors = errors or sys.stderr
    results, failures = [], 0
    for path in images:
        try:
            ranked = predictor.predict([path], top_k=top_k)[0]
        except BadImageError as error:
            failures += 1
            print(f"error: {error}", file=errors)
            continue
        except (OSError, ValueError) as error:  # A name the system cannot open (a NUL in it).
            failures += 1
            print(f"error: {path}: cannot read ({error_line(error)})", file=errors)
            continue
        if not all(math.isfinite(prediction.confidence) for prediction in ranked):
            failures += 1
            print(
                f"error: {path}: the model gives no finite probabilities (NaN): its weights "
                "or preprocessing are broken",
                file=errors,
            )
            continue
        results.append((path, ranked))
    if as_json:
        # Always one JSON document (``[]`` when every file was bad), so stdout always parses.
        payload = [
            {"image": str(path), "predictions": [p.to_dict() for p in ranked]}
            for path, ranked in results
        ]
        indent = None if one_line else 2
        print(json.dumps(payload, indent=indent, ensure_ascii=False, allow_nan=False))
        return failures
    kind = predictor.metadata.kind
    for path, ranked in results:
        prefix = f"{path}: " if len(images) > 1 else ""
        print(prefix + format_prediction(ranked[0], kind))
        for rank, prediction in enumerate(ranked[1:], start=2):
            print(f"  {rank}. " + format_prediction(prediction, kind).removeprefix("Prediction: "))
    return failures


def _ask(prompt: str, to_stderr: bool) -> str:
    """``input(prompt)``, or with the prompt on stderr so that stdout stays pure JSON."""
    if not to_stderr:
        return input(prompt)
    print(prompt, end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def _interactive(predictor, top_k: int, as_json: bool) -> int:
    """The book's ``Enter filename:`` loop; an empty line or end of input ends it.

    A bad name prints an error in the conversation and the loop goes on (with ``--json`` the
    prompts and errors go to stderr, and stdout holds one line of JSON per name: ``[]`` for a
    name that gave no predictions). Quotes or backslashes around a name (a file dragged into a
    terminal) and ``~`` are understood, and a folder gives every image in it. Returns the number
    of names and files that failed, so that names piped in end with the same exit status as
    files given on the command line.
    """
    print("Enter image files or folders, one per line; an empty line ends.", file=sys.stderr)
    errors = sys.stderr if as_json else sys.stdout
    failures = 0
    while True:
        try:
            name = _ask("Enter filename: ", to_stderr=as_json)
        except EOFError:
            break
        name = _typed_name(name)
        if not name:
            break
        problems: list[str] = []
        images = expand_images([name], problems)
        for problem in problems:
            print(f"error: {problem}", file=errors)
        failures += len(problems)
        if images or as_json:  # With --json, one line per name.
            failures += _predict_and_print(predictor, images, top_k, as_json, errors, one_line=True)
    return failures


def _typed_name(line: str) -> str:
    """The file a typed line names: without surrounding quotes, or as the shell reads it where
    only that exists (macOS Terminal escapes a dragged file's spaces: ``my\\ sym.png``)."""
    name = line.strip().strip("'\"").strip()
    if not name or _path_test(name, Path.exists):
        return name
    try:
        words = shlex.split(line)
    except ValueError:  # An unclosed quote.
        return name
    if len(words) == 1 and _path_test(words[0], Path.exists):
        return words[0]
    return name


def command_fetch(args: argparse.Namespace) -> int:
    from cnnkit.data.fetch import compute_checksum, fetch_archive

    if args.from_file and args.url:
        raise CommandError("--from imports a local copy and --url downloads one: give either")
    try:
        path = fetch_archive(
            args.name,
            args.to,
            from_file=args.from_file,
            url=args.url,
            verify=not args.no_verify,
            progress=True,
            sha256=args.sha256,
        )
    except FileNotFoundError as error:
        raise CommandError(str(error)) from error
    print(f"Archive ready: {path}")
    # The publishers give only an MD5; this lets the next fetch check with --sha256.
    checked = "" if not args.no_verify else " (of the file as it is: not verified)"
    print(f"SHA-256: {compute_checksum(path, 'sha256')}{checked}")
    fold = " --fold 1" if args.name == "hasy" else ""  # The paper's protocol; its figures.
    print(f"Next: cnnkit train --dataset {args.name} --data {shlex.quote(str(path))}{fold}")
    return 0


def command_serve(args: argparse.Namespace) -> int:
    from cnnkit.web.app import serve

    if args.max_upload_mb <= 0:
        raise CommandError(f"--max-upload-mb must be more than 0; got {args.max_upload_mb:g}")
    from cnnkit.runtime import tune_allocator

    tune_allocator()  # And each process of --workers tunes its own (app_from_environment).
    if args.model:
        _refuse_an_architecture_name(args.model)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_upload_bytes=args.max_upload_mb * 1_000_000,
        allow_remote=args.allow_remote,
        workers=args.workers,
        on_ready=lambda url: print(f"Serving on {url}  (Ctrl-C stops)", flush=True),
    )
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from cnnkit.demo import run_demo

    out = Path(args.out)
    _print_run_folder_state(out, resume=False, default_dir=None)
    result = run_demo(out, epochs=args.epochs, progress=not args.quiet)
    print(f"\nDemo: {result.description}")
    _print_history(result.run.fit.history, progress=not args.quiet)
    metrics = result.run.test_metrics
    print(f"Test: top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}")
    print(
        f"Report: {result.run.run_dir / 'report'} (metrics.json, confusion.png, misclassified.png)"
    )
    print(f"Model: {result.run.model_path}")
    print("\nPredictions on held-out images:")
    for name, prediction, truth in result.samples:
        print(f"  {name} (true {truth}): {format_prediction(prediction, 'symbols')}")
    # Commands to paste into a shell: a folder with a space or a quote must stay one word.
    model, samples = shlex.quote(str(result.run.model_path)), shlex.quote(str(result.sample_dir))
    print("\nNext steps:")
    print(f"  cnnkit predict {model} {samples}")
    print(f"  cnnkit evaluate {model} --dataset digits")
    print("  cnnkit fetch hasy --to data    # or: --from a HASYv2.tar.bz2 you have")
    print("  cnnkit train --dataset hasy --data data/HASYv2.tar.bz2 --fold 1")
    print("  cnnkit serve            # draw a symbol in your browser (bundled model)")
    return 0


def command_models(args: argparse.Namespace) -> int:
    from cnnkit.models.registry import list_models, model_options, model_summary

    for name in list_models():
        options = ", ".join(f"{k}={v!r}" for k, v in model_options(name).items())
        print(f"{name}: {model_summary(name)}")
        print(f"    options: {options}")
    print(
        "\nThese are each model's own defaults; a preset may set others (the hasy preset trains"
        "\nsymbol_cnn at width 32). `cnnkit train ... --print-config` shows a run's settings,"
        "\nand --option KEY=VALUE (or --width, --dense, --dropout) changes one."
    )
    return 0


def command_export(args: argparse.Namespace) -> int:
    from cnnkit.inference.export import DEFAULT_OPSET, export_onnx

    model_path = _model_path(args.model)
    if model_path.suffix.lower() == ".onnx":
        raise CommandError(
            f"{model_path}: is an ONNX export already; export reads the .safetensors model "
            "file (or the training run's folder) it came from"
        )
    # The bundled model's export goes to the current folder, not into the installed package.
    named = model_path if args.model is not None else Path(model_path.name)
    opset = args.opset or DEFAULT_OPSET
    if args.out and Path(args.out).suffix.lower() != ".onnx":
        raise CommandError(f"--out {args.out}: an ONNX file's name ends in .onnx")
    if args.quantize is None:
        if args.dataset or args.data:
            raise CommandError(
                "--dataset and --data give --quantize int8 its calibration images; "
                "add --quantize int8, or leave them out"
            )
        out = Path(args.out) if args.out else named.with_suffix(".onnx")
        _refuse_overwriting(model_path, out)
        print(export_onnx(model_path, out, opset=opset))
        return 0
    from cnnkit.config import DataConfig
    from cnnkit.inference.quantize import calibration_inputs, quantize_onnx

    if args.dataset is None:
        try:
            _data_the_model_names(args, model_path)
        except CommandError as error:
            raise CommandError(f"--quantize int8 calibrates on training images: {error}") from None
    data = DataConfig(dataset=args.dataset, data=args.data, fold=args.fold)
    inputs = calibration_inputs(
        model_path, data, args.calibration_images, cache_dir=args.cache_dir or default_cache_dir()
    )
    out = Path(args.out) if args.out else named.with_name(f"{named.stem}-int8.onnx")
    _refuse_overwriting(model_path, out)
    source = args.data or args.dataset
    print(f"Calibrating int8 ranges on {len(inputs)} training images of {source}", file=sys.stderr)
    print(quantize_onnx(model_path, out, inputs, opset=opset))
    return 0


def _refuse_overwriting(model_path: Path, out: Path) -> None:
    if out.exists() and out.resolve() == model_path.resolve():
        raise CommandError(f"{out}: is the model file itself; give another --out")


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
        return _print_config(dataclasses.replace(base, out=given_out))
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
            on_data=_print_data_summary,
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


def command_report(args: argparse.Namespace) -> int:
    from cnnkit.evaluation.html_report import write_html_report

    print(write_html_report(args.run_dir, args.out))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnkit",
        description="Train, evaluate and serve convolutional image classifiers.",
        epilog="Start with `cnnkit demo`. Each command has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fetch = commands.add_parser("fetch", help="download or import a dataset archive")
    fetch.add_argument("name", choices=["hasy", "cub"])
    fetch.add_argument("--to", default="data", help="destination folder (default ./data)")
    fetch.add_argument("--from", dest="from_file", help="import this local archive instead")
    fetch.add_argument(
        "--url", help="download from this mirror instead of the publisher (checked the same)"
    )
    fetch.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    fetch.add_argument(
        "--sha256",
        metavar="HEX",
        help="check this SHA-256 instead of the publisher's MD5 (each fetch prints the "
        "archive's SHA-256)",
    )
    fetch.set_defaults(handler=command_fetch)

    train = commands.add_parser("train", help="train a model and save RUN_DIR/model.safetensors")
    _add_train_arguments(train)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's last checkpoint (after Ctrl-C, or with more epochs)",
    )
    train.set_defaults(handler=command_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a model file on a dataset")
    _add_model_argument(
        evaluate,
        "model file, its .onnx export, or a training run's folder (default: the bundled model)",
    )
    _add_data_arguments(evaluate, required=False, model_input=False)
    evaluate.add_argument(
        "--split",
        choices=["test", "all"],
        default="test",
        help="score the test split (default) or every image of the dataset",
    )
    evaluate.add_argument(
        "--out",
        help="report folder (default: MODEL's folder/evaluation for a run's model.safetensors, "
        "evaluation-FILE beside any other model file; runs/evaluation-bundled for the bundled "
        "model)",
    )
    evaluate.add_argument("--json", action="store_true", help="print metrics as JSON")
    evaluate.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="where the model runs (auto: cuda, then mps, then cpu; an .onnx file runs on "
        "ONNX Runtime's CPU provider)",
    )
    evaluate.set_defaults(handler=command_evaluate)

    predict = commands.add_parser("predict", help="classify image files or folders")
    predict.add_argument("inputs", nargs="*", metavar="[MODEL] IMAGE", help="model file, images")
    predict.add_argument(
        "--model",
        help="model file, its .onnx export, or a training run's folder (default: the first "
        "argument when it is one of those, else the bundled model)",
    )
    predict.add_argument("--top-k", type=whole(1), default=1, help="show the K best classes (1)")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.add_argument(
        "--interactive",
        action="store_true",
        help="then ask for filenames, one per line, until an empty line (the book's loop)",
    )
    predict.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        help="run the model with PyTorch or ONNX Runtime (default: onnx for a .onnx file)",
    )
    predict.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="cpu",
        help="where a PyTorch model runs (default cpu, the quickest to start for a few images; "
        "auto: cuda, then mps, then cpu; ONNX Runtime runs on the CPU)",
    )
    predict.set_defaults(handler=command_predict)

    serve = commands.add_parser("serve", help="web page and REST API for a model")
    _add_model_argument(
        serve,
        "model file, its .onnx export, or a training run's folder (default: the bundled "
        "symbol model, as its shipped int8 export where onnxruntime is installed)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; others need --allow-remote)",
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--max-upload-mb",
        type=int,
        default=5,
        help="largest accepted upload in MB; larger ones get 413 (default 5)",
    )
    serve.add_argument(
        "--allow-remote", action="store_true", help="allow binding to a non-loopback address"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes, each with a copy of the model (more serve more requests/s "
        "on several cores)",
    )
    serve.set_defaults(handler=command_serve)

    demo = commands.add_parser("demo", help="train and use a CNN on the embedded digits")
    demo.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    demo.add_argument("--epochs", type=whole(1), default=12, help="training epochs (default 12)")
    demo.add_argument(
        "--quiet",
        action="store_true",
        help="nothing while training (no progress bars or per-epoch lines); the epochs are "
        "listed once at the end",
    )
    demo.set_defaults(handler=command_demo)

    models = commands.add_parser("models", help="list registered models and their options")
    models.set_defaults(handler=command_models)

    export = commands.add_parser("export", help="export a model file to ONNX")
    _add_model_argument(
        export,
        "model file (.safetensors) or a training run's folder (default: the bundled "
        "symbol model, exported into the current folder)",
    )
    export.add_argument("--format", choices=["onnx"], default="onnx", help="file format (onnx)")
    export.add_argument("--out", help="output file (default: MODEL with a .onnx suffix)")
    export.add_argument("--opset", type=int, help="ONNX opset version (default 18)")
    export.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8 static quantization, calibrated on training images of --dataset/--data "
        "(default output MODEL-int8.onnx); faster on CPUs, check the accuracy",
    )
    export.add_argument("--dataset", choices=DATASETS, help="calibration data source")
    export.add_argument("--data", help="calibration dataset path")
    export.add_argument(
        "--fold", type=whole(1, 10), help="HASYv2 fold whose training images calibrate"
    )
    export.add_argument(
        "--calibration-images",
        type=whole(1),
        default=512,
        help="training images that calibrate --quantize int8 (default 512)",
    )
    export.add_argument("--cache-dir", help=f"decoded-image cache (default {default_cache_dir()})")
    export.set_defaults(handler=command_export)

    search = commands.add_parser(
        "search", help="hyperparameter search (Optuna grid, TPE or random) with pruning"
    )
    _add_train_arguments(search, search=True)
    search.add_argument(
        "--space",
        default="book",
        help="named space (book, book-wide, symbol) or a YAML file (default: book). "
        "--sampler grid takes book, or a file whose values are all listed",
    )
    search.add_argument(
        "--sampler", choices=["grid", "tpe", "random"], default="tpe", help="(default: tpe)"
    )
    search.add_argument(
        "--pruner",
        choices=["halving", "median", "none"],
        default="halving",
        help="stop weak trials early: successive halving (default), median, or none",
    )
    search.add_argument("--n-trials", type=whole(1), help="finished trials the study should hold")
    search.add_argument("--timeout", type=float, help="stop starting trials after N seconds")
    search.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    search.add_argument("--study-name", help="study name in the storage (default: OUT's name)")
    search.add_argument("--sampler-seed", type=int, help="seed the sampler (reproducible order)")
    search.add_argument(
        "--prune-warmup", type=int, default=2, help="epochs before a trial can be pruned"
    )
    search.add_argument(
        "--workers",
        type=int,
        help="processes sharing the study and the cores (default: one per core up to 4 on a "
        "CPU, 1 with a GPU)",
    )
    search.add_argument(
        "--retrain-best", action="store_true", help="retrain the best on train+val, save model"
    )
    search.add_argument(
        "--keep-checkpoints", action="store_true", help="keep each trial's checkpoint.pt"
    )
    search.set_defaults(handler=command_search)

    report = commands.add_parser("report", help="one self-contained HTML page for a run folder")
    report.add_argument("run_dir", help="a training run or search folder")
    report.add_argument("--out", help="HTML file (default RUN_DIR/report.html)")
    report.set_defaults(handler=command_report)
    for sub in commands.choices.values():  # -v after the command too; unset, the top's holds.
        sub.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Make ``kill PID`` (SIGTERM: what nohup jobs, schedulers and ``docker stop`` send) stop a
    command as Ctrl-C does: a training run then records that it was interrupted and keeps its
    last checkpoint for ``--resume``, instead of dying with run.json still saying "running"."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # Only the main thread may set handlers (main() called from a thread).
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand of ``parser``."""
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def _add_model_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The model a command reads, as its first word or, as predict takes it, ``--model``."""
    parser.add_argument("model", nargs="?", help=help)
    parser.add_argument(
        "--model",
        dest="model_flag",
        metavar="MODEL",
        help="the same as MODEL (as predict takes it)",
    )


def _one_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fold ``--model`` into the MODEL argument, refusing two different models."""
    flag = getattr(args, "model_flag", None)
    if flag is not None:
        if args.model is not None and _model_file(args.model) != _model_file(flag):
            _subparser(parser, args.command).error(
                f"two models given: {args.model} and --model {flag}; give one"
            )
        args.model = flag
    return args


def _model_file(text: str) -> Path:
    """The file a model argument names (a run folder: its model.safetensors), resolved, so
    that two spellings of one model compare equal."""
    path = Path(text).expanduser()
    if _path_test(text, _holds_a_model):
        path = path / "model.safetensors"
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """``parser.parse_args(argv)``, except that predict's options may come between its inputs
    (``predict model.safetensors --top-k 2 a.png --json b.png``): argparse stops filling a
    positional list at the first option and would call the rest unrecognized."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top-level options take no values, so the first other word is the command.
    command_at = next((index for index, word in enumerate(argv) if not word.startswith("-")), None)
    if command_at is None or argv[command_at] != "predict":
        return _one_model(parser, parser.parse_args(argv))
    args = parser.parse_args(argv[: command_at + 1])
    rest = argv[command_at + 1 :]
    # After "--" every word is an input (argparse's intermixed mode would refuse them).
    end = rest.index("--") if "--" in rest else len(rest)
    predict = _subparser(parser, "predict").parse_intermixed_args(rest[:end])
    predict.inputs += rest[end + 1 :]
    return argparse.Namespace(**{**vars(args), **vars(predict)})


def _discard_stdout() -> None:
    """Point stdout at the null device, so that Python's flush at exit finds no closed pipe."""
    with contextlib.suppress(OSError, ValueError):  # No file descriptor (a test's capture).
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with _stop_on_sigterm():
            status = args.handler(args)
        sys.stdout.flush()  # Where the reader has gone, buffered output fails here.
        return status
    except BrokenPipeError:
        # The reader went away (`cnnkit predict FOLDER | head -1`): stop quietly, as Unix tools
        # do, with the status of a process that SIGPIPE ended.
        _discard_stdout()
        return 128 + getattr(signal, "SIGPIPE", 13)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, ImportError) as error:
        if args.verbose and not isinstance(error, CommandError):
            raise  # -v: the whole traceback, for a bug report.
        # "[Errno 17] cannot write ..." reads better without Python's errno prefix.
        message = re.sub(r"^\[Errno \d+\] ", "", str(error)).splitlines()
        print(f"cnnkit {args.command}: error: {message[0] if message else error}", file=sys.stderr)
        for line in message[1:]:
            print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
