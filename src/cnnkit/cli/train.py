"""``cnnkit train``, ``demo`` and ``models``: run folders, and the lines that report a run."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import os
import re
import shlex
from pathlib import Path

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.model_files import path_test
from cnnkit.cli.predict import format_prediction
from cnnkit.cli.settings import print_config, resolve_run_config
from cnnkit.paths import SKIPPED_LIST, default_cache_dir, read_run_info


def distributed_from_env(device: str = "auto"):
    """Rank information set by torchrun, or a single-process context; ``device`` is the
    training device's name (its type picks NCCL or gloo)."""
    from cnnkit.runtime import init_distributed, select_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return init_distributed(rank, local_rank, world_size, select_device(device))


def print_data_summary(data, run_dir: Path | None = None) -> None:
    """The data line, and the bad images skipped (all listed in ``run_dir``'s skipped.txt)."""
    source = "cache" if data.from_cache else "decoded"
    print(f"Data: {data.splits.description} ({source})")
    if data.problems:
        listed = f" (all: {run_dir / SKIPPED_LIST})" if run_dir is not None else ""
        print(f"Skipped {len(data.problems)} bad image(s){listed}; first: {data.problems[0]}")


def note_an_unused_test_share(data, config) -> None:
    """Say that ``--test-fraction`` goes unused where the data brings its own test split."""
    from cnnkit.config import DataConfig

    if data.split_given and config.data.test_fraction != DataConfig.test_fraction:
        print(
            f"Note: {config.data.data} gives its own test split, so test_fraction "
            f"{config.data.test_fraction:g} (--test-fraction) is not used"
        )


# Fewer optimizer steps than this in all leave a network trained from scratch near chance.
FEW_STEPS = 20


def _report_data(data, config) -> None:
    """The data line, and notes where a test share goes unused or the run is too short to
    learn anything."""
    from cnnkit.data.loader import training_steps_per_epoch
    from cnnkit.models.registry import is_transfer_model

    print_data_summary(data, config.run_dir())
    note_an_unused_test_share(data, config)

    if is_transfer_model(config.model.name):
        return  # Its head learns on cached features; its fine-tune starts from ImageNet.
    train, batch, epochs = len(data.splits.train), config.train.batch_size, config.train.epochs
    cap = config.train.max_steps_per_epoch
    per_epoch = training_steps_per_epoch(train, config.train)
    capped = per_epoch < training_steps_per_epoch(train, config.train, capped=False)
    if per_epoch * epochs < FEW_STEPS:
        how = (
            f"--max-steps-per-epoch {cap}, {epochs} epoch(s)"
            if capped
            else f"{train} training images in batches of {batch}, {epochs} epoch(s)"
        )
        more = "a higher --max-steps-per-epoch" if capped else "a smaller --batch-size"
        print(
            f"Note: {per_epoch * epochs} optimizer step(s) in all ({how}): too few for a "
            "network trained from scratch, whose test figures may stay near chance; train "
            f"for more --epochs (or with {more})"
        )


def command_train(args: argparse.Namespace) -> int:
    from cnnkit.runtime import shutdown_distributed, tune_allocator
    from cnnkit.training.run import train_run
    from cnnkit.training.run_folder import checkpoint_to_resume
    from cnnkit.training.trainer import TrainingInterrupted

    config = resolve_run_config(args)
    if args.print_config:
        return print_config(config, getattr(args, "chosen_because", None))
    config, default_dir = _choose_run_dir(config, args.resume, getattr(args, "beside", None))
    if config.train.fast_path:
        tune_allocator()
    distributed = distributed_from_env(config.train.device)
    is_main = distributed.is_main
    # Every rank refuses a checkpoint it cannot resume before any work, rank 0 with its line.
    found = checkpoint_to_resume(config) if args.resume else None
    if is_main:
        _print_run_notes(args, config, default_dir, found)
    cache_dir = args.cache_dir or config.data.cache_dir or default_cache_dir()
    try:
        result = train_run(
            config,
            resume=args.resume,
            cache_dir=cache_dir,
            progress=not args.quiet,
            distributed=distributed,
            on_data=functools.partial(_report_data, config=config) if is_main else None,
        )
    except TrainingInterrupted as interrupted:
        if is_main:
            _print_interrupted(interrupted)
        return 130
    finally:
        shutdown_distributed()
    if is_main:
        _print_run_result(result, config, progress=not args.quiet)
    return 0


def _choose_run_dir(config, resume: bool, beside: Path | None = None):
    """The run's config with its run folder chosen, and the default folder it was chosen
    beside (None where ``--out`` named the folder): ``beside``, the folder of a run whose own
    ``config.yaml`` is the ``--config`` file, else ``runs/<dataset>-<model>``.

    Raises:
        CommandError: if ``--data`` names nothing, before a run folder is chosen and announced.
    """
    data = config.data.data
    if data is not None and not path_test(str(data), Path.exists):
        # Before a run folder is chosen and announced: no run starts.
        raise CommandError(f"{data}: no such archive, folder or file")
    default_dir = None
    if config.out is None:
        default_dir = _first_of_numbered(beside) if beside else config.run_dir()
    if default_dir is not None:
        # A default folder that holds a finished run is kept: a new run gets the next free
        # name (runs/x-2, runs/x-3...), and --resume continues the newest of them.
        chosen = _latest_run_dir(default_dir) if resume else _free_run_dir(default_dir)
        config = dataclasses.replace(config, out=str(chosen))
    return config, default_dir


def _print_run_notes(
    args: argparse.Namespace, config, default_dir: Path | None, found: Path | None
) -> None:
    """What rank 0 says before training: why the model was chosen, that --patience has no
    validation split to watch, and the state of the run folder (``found``: the checkpoint
    ``--resume`` continues)."""
    if getattr(args, "chosen_because", None):
        print(args.chosen_because)
    no_val = config.data.val_fraction == 0 or config.data.train_on_all
    if args.patience is not None and no_val:
        print(
            "Note: --patience needs a validation split (--val-fraction > 0, without "
            "--train-on-all); without one every epoch runs"
        )
    _print_run_folder_state(config.run_dir(), args.resume, default_dir, found)


def _print_interrupted(interrupted) -> None:
    """Say after how many epochs (and of which phase) training stopped, and how to resume."""
    print(f"\nInterrupted {interrupted.summary}.")
    if interrupted.checkpoint:
        print(f"Checkpoint: {interrupted.checkpoint}; rerun with --resume to continue.")


def _print_run_result(result, config, progress: bool) -> None:
    """The finished run's epochs, early stop, test figures, model file and run folder."""
    from cnnkit.training.phases import FROZEN_PHASE, frozen_line_printed_live

    history = result.fit.history
    if frozen_line_printed_live(config.transfer.phases, progress):
        # Printed as the phase ended, before the fine-tune's epoch lines.
        history = [row for row in history if row.get("phase") != FROZEN_PHASE]
    _print_history(history, progress=progress)
    _print_early_stop(result.fit, config.train.early_stopping_patience)
    metrics = result.test_metrics
    seen = " (images it trained on: --train-on-all)" if config.data.train_on_all else ""
    print(
        f"Test: top-1 {metrics.get('top1', float('nan')):.4f}, "
        f"top-5 {metrics.get('top5', float('nan')):.4f}{seen}"
    )
    print(f"Model: {result.model_path}")
    print(f"Run folder: {result.run_dir} (metrics.csv, tensorboard/, report/, config.yaml)")


def _numbered_run_dirs(run_dir: Path) -> list[Path]:
    """``run_dir`` and its existing numbered siblings ``run_dir-2``, ``run_dir-3``..., by
    number: a missing one in between (a deleted run) does not end the list."""
    pattern = re.compile(re.escape(run_dir.name) + r"-([2-9]|[1-9][0-9]+)")
    numbered = []
    with contextlib.suppress(OSError):
        for path in run_dir.parent.glob(glob.escape(run_dir.name) + "-*"):
            match = pattern.fullmatch(path.name)
            if match and path.is_dir():
                numbered.append((int(match.group(1)), path))
    return [run_dir, *(path for _, path in sorted(numbered))]


def _first_of_numbered(folder: Path) -> Path:
    """``runs/x`` for its numbered sibling ``runs/x-2`` where ``runs/x`` holds a run (a new run
    beside ``runs/x-2`` goes after the newest of them), else ``folder``."""
    base = folder.with_name(folder.name.rpartition("-")[0] or folder.name)
    if base != folder and folder in _numbered_run_dirs(base)[1:] and read_run_info(base):
        return base
    return folder


def _free_run_dir(run_dir: Path) -> Path:
    """The folder of a new run: the newest of ``run_dir``, ``run_dir-2``, ``run_dir-3``... if
    it holds neither a trained model nor a checkpoint, else the next number after it (never a
    gap before it: ``--resume`` continues the newest).

    Raises:
        CommandError: if the newest of them holds an unfinished run's checkpoint: a fresh
            run beside it would become the newest, out of reach. A run that diverged is no
            such run (it cannot be resumed): the new run goes beside it.
    """
    from cnnkit.training.run_folder import find_checkpoint

    latest = _numbered_run_dirs(run_dir)[-1]
    finished, checkpoint = (latest / "model.safetensors").exists(), find_checkpoint(latest)
    if checkpoint and not finished and (read_run_info(latest) or {}).get("status") != "diverged":
        raise CommandError(
            f"{latest} holds an unfinished run: pass --resume to continue it, or --out for a "
            "new run folder"
        )
    if not (finished or checkpoint):
        return latest
    number = 1 if latest == run_dir else int(latest.name.rsplit("-", 1)[1])
    return run_dir.with_name(f"{run_dir.name}-{number + 1}")


def _latest_run_dir(run_dir: Path) -> Path:
    """The newest of ``run_dir`` and its numbered siblings (the one ``--resume`` continues)."""
    return _numbered_run_dirs(run_dir)[-1]


def _print_run_folder_state(
    run_dir: Path, resume: bool, default_dir: Path | None, found: Path | None = None
) -> None:
    """Say whether ``--resume`` found a checkpoint (``found``), that a fresh run replaces an
    old one (in a folder given with ``--out``), or that it went to a new folder beside the
    default one."""
    from cnnkit.training.run_folder import holds_a_run

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
        # The newest run before this one (the default folder itself, unless it was deleted).
        before = [d for d in _numbered_run_dirs(default_dir) if d != run_dir and d.exists()]
        if before:
            newest = before[-1]
            held = "a finished run" if (newest / "model.safetensors").exists() else "a run"
            print(f"Note: {newest} holds {held}; this one goes to {run_dir}")


def _print_early_stop(fit, patience: int | None) -> None:
    """Say that a run stopped before its last epoch, and which epoch's weights it kept (a
    transfer run's epochs are counted within its last phase, as the history lists them)."""
    from cnnkit.training.phases import phase_label

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
    from cnnkit.training.phases import FROZEN_PHASE, phase_label

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


def command_demo(args: argparse.Namespace) -> int:
    from cnnkit.demo import run_demo
    from cnnkit.training.trainer import TrainingInterrupted

    out = Path(args.out)
    _print_run_folder_state(out, resume=False, default_dir=None)
    try:
        result = run_demo(out, epochs=args.epochs, progress=not args.quiet)
    except TrainingInterrupted as interrupted:
        print(f"\nInterrupted {interrupted.summary}.")  # The demo has no --resume.
        return 130
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
    print("\nThese are each model's own defaults. Presets (--preset; train picks one by --dataset)")
    print("train these models with these options:")
    for preset, model in _preset_models().items():
        print(f"  {preset}: {model}")
    print(
        "`cnnkit train ... --print-config` shows a run's settings, and --option KEY=VALUE (or"
        "\n--width, --dense, --dropout) changes one."
    )
    return 0


def _preset_models() -> dict[str, str]:
    """Each preset's model and the options it sets, as ``symbol_cnn (width=32)``."""
    from cnnkit.config import ModelConfig
    from cnnkit.presets import PRESETS, preset_for

    default = ModelConfig().name  # A preset that names no model trains this one.
    described = {}
    for name in PRESETS:
        model = preset_for(name).get("model") or {}
        options = ", ".join(f"{k}={v!r}" for k, v in (model.get("options") or {}).items())
        described[name] = model.get("name", default) + (f" ({options})" if options else "")
    return described
