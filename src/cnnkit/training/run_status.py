"""A run's record in ``run.json`` as it goes: running once it starts (for ``--resume`` once
its checkpoint is restored), then finished with its figures, or how it ended otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from cnnkit.atomic import write_atomically
from cnnkit.config import RunConfig, config_to_dict
from cnnkit.config.files import load_yaml
from cnnkit.data.dataset import DataSplits
from cnnkit.data.sources import LoadedData
from cnnkit.errors import error_line
from cnnkit.evaluation.report import resolved
from cnnkit.paths import SKIPPED_LIST, read_run_info
from cnnkit.runtime import DistributedContext
from cnnkit.training.final_model import best_val_accuracy
from cnnkit.training.run_folder import (
    checkpoint_to_resume,
    clear_run_outputs,
    data_roots,
    recorded_config,
    write_run_info,
)
from cnnkit.training.trainer import (
    Callback,
    FitResult,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
)

logger = logging.getLogger(__name__)

# run.json's list of the run's resumes: the epoch each went on from, and the settings it changed.
RESUMES_KEY = "resumes"
# Settings a resume is expected to change (--epochs to train on), or that change nothing the
# model learns: recorded, without a warning.
_CHANGED_BY_RESUMES = frozenset(
    (
        "train.epochs",
        "train.early_stopping_patience",  # As a run that stopped early says to.
        "train.device",
        "train.fast_path",
        "train.channels_last",
        "train.eval_batch_size",
        "train.micro_batch_size",
        "train.memory_check",
        "data.cache_dir",
    )
)


class RunInfoOnStart(Callback):
    """Writes the run's ``config.yaml`` and ``run.json`` (status running) when training
    starts: for ``--resume`` only once the trainer has checked and restored the checkpoint,
    so that a refused resume leaves the earlier run's files as they were."""

    def __init__(self, write: Callable[[int], None], checkpoint: Path | None = None) -> None:
        self.write = write  # Given the epoch the fit starts from.
        self.written = False
        self.checkpoint = checkpoint  # The checkpoint to continue from (None: a fresh start).

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None

    def on_fit_start(self, trainer: Trainer) -> None:
        # An ensemble's members that finished before the stop restore and start first: the
        # fit that goes on from the resumed checkpoint is the one whose epoch is recorded.
        if trainer.checkpoint_path == self.checkpoint:
            self.write_once(trainer.epoch)

    def write_once(self, epoch: int = 0) -> None:
        if not self.written:
            self.written = True
            self.write(epoch)


def start_run(
    config: RunConfig,
    data: LoadedData,
    resume: bool,
    distributed: DistributedContext,
    callbacks: Sequence[Callback],
) -> tuple[RunInfoOnStart, Sequence[Callback]]:
    """Mark the run as started in ``run.json``: now for a fresh start (after clearing the
    earlier run's outputs), or for a resume once the trainer has restored its checkpoint.

    Returns:
        The writer of the started run's info, and the callbacks to train with.
    """
    run_dir = config.run_dir()
    checkpoint = checkpoint_to_resume(config) if resume else None
    resuming = checkpoint is not None
    description = data.splits.description

    def write(epoch: int) -> None:
        details = {"status": "running", "data": description}
        if resuming:
            details["resumes"] = _resumes(run_dir, config, epoch)
        write_run_info(run_dir, config, details)
        # Once the run has started for good: a refused resume leaves the earlier run's list.
        write_skipped_list(run_dir, data.problems, replaces=resuming)

    started = RunInfoOnStart(write, checkpoint)
    if distributed.is_main and not resuming:
        # A fresh start (also --resume without a checkpoint) replaces the earlier run, once
        # the data has loaded and its batches are set up: a run that fails before keeps it.
        clear_run_outputs(run_dir, keep=data_roots(config))
        started.write_once()
    if distributed.is_main and resuming:
        # The checkpoint is checked against this run's settings first (see RunInfoOnStart).
        callbacks = [started, *callbacks]
    return started, callbacks


def write_skipped_list(run_dir: Path, problems: Sequence[str], replaces: bool) -> None:
    """List the images ``--on-bad-image skip`` left out, one a line, in ``RUN/skipped.txt``
    (the terminal shows the first). ``replaces``: the folder holds this run's earlier list (a
    resume), which goes when none is skipped now; a fresh run's folder was cleared of one, and
    a file of that name in a folder that held no run is the user's."""
    path = run_dir / SKIPPED_LIST
    if not problems:
        if replaces:
            path.unlink(missing_ok=True)  # Of data since fixed.
        return
    text = "".join(f"{problem}\n" for problem in problems)
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _resumes(run_dir: Path, config: RunConfig, epoch: int) -> list[dict[str, Any]]:
    """The run's resumes so far (from its ``run.json``) and this one: the epoch it goes on
    from, and each setting it changes from the run it continues (its ``config.yaml``), which
    a warning names too: the run's records show only the latest settings."""
    resumes = list(_resumes_so_far(run_dir).get(RESUMES_KEY, []))
    changed = changed_settings(run_dir / "config.yaml", config)
    unexpected = {key: step for key, step in changed.items() if key not in _CHANGED_BY_RESUMES}
    if unexpected:
        steps = (f"{key} {step['before']!r} -> {step['now']!r}" for key, step in unexpected.items())
        logger.warning(
            "%s: resumed with other settings than its run's: %s (run.json lists them under %r)",
            run_dir,
            "; ".join(steps),
            RESUMES_KEY,
        )
    return [*resumes, {"from_epoch": epoch, "changed": changed}]


def changed_settings(config_file: Path, config: RunConfig) -> dict[str, dict[str, Any]]:
    """The settings of ``config`` that differ from those ``config_file`` (a run's
    ``config.yaml``) records, by dotted name (``model.options.dropout``), each with its value
    ``before`` and ``now``; nothing where the file is missing or unreadable."""
    try:
        before = _flat(load_yaml(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    for key in ("data.data", "data.cache_dir"):
        # A file written before runs recorded absolute paths may hold a relative one: taken
        # from the current folder, where such a run was most likely started too.
        if isinstance(before.get(key), str):
            before[key] = resolved(before[key])
    now = _flat(config_to_dict(recorded_config(config)))  # What config.yaml would hold.
    return {
        key: {"before": before[key], "now": value}
        for key, value in now.items()
        if key in before and before[key] != value and key != "out"  # The same folder.
    }


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping's leaves by dotted name (nothing for anything but a mapping)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items() if isinstance(tree, dict) else ():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resumes_so_far(run_dir: Path) -> dict[str, Any]:
    """The ``resumes`` a run's ``run.json`` lists, to carry into its next record."""
    resumes = (read_run_info(run_dir) or {}).get(RESUMES_KEY)
    return {RESUMES_KEY: resumes} if resumes else {}


def write_finished(
    config: RunConfig,
    splits: DataSplits,
    timings: dict[str, float],
    fit: FitResult,
    test_metrics: dict[str, float],
) -> None:
    """Record the finished run in ``run.json``: its data, timings, fit and test figures."""
    write_run_info(
        config.run_dir(),
        config,
        {
            "status": "finished",
            "data": splits.description,
            "seconds": timings,
            "fit": {
                "epochs_run": fit.epochs_run,
                "best_epoch": fit.best_epoch,
                "best_val_accuracy": best_val_accuracy(fit, splits),
                "stopped_early": fit.stopped_early,
            },
            "test": test_metrics,
            "config": config_to_dict(recorded_config(config)),
            **_resumes_so_far(config.run_dir()),
        },
    )


def write_ended(config: RunConfig, splits: DataSplits, error: BaseException) -> None:
    """Record in ``run.json`` how a started run ended other than finished."""
    run_dir = config.run_dir()
    if isinstance(error, (TrainingInterrupted, TrainingDiverged, KeyboardInterrupt)):
        # run.json says how the run ended, not "running"; also when Ctrl-C or kill lands
        # outside an epoch (the stop then says when). A resume stopped before its checkpoint
        # was restored leaves the earlier run's files.
        status = "diverged" if isinstance(error, TrainingDiverged) else "interrupted"
        reason = str(error) or "interrupted"
        details = {"status": status, "data": splits.description, "error": reason}
        write_run_info(run_dir, config, {**details, **_resumes_so_far(run_dir)})
        return
    # Any other error (a full disk) ends the run too; a checkpoint that does not fit this
    # run's settings leaves the earlier run's files as they were.
    details = {"status": "failed", "data": splits.description, "error": error_line(error)}
    with contextlib.suppress(OSError):  # The full disk must not hide the first error.
        write_run_info(run_dir, config, {**details, **_resumes_so_far(run_dir)})
