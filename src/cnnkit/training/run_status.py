"""A run's record in ``run.json`` as it goes: running once it starts (for ``--resume`` once
its checkpoint is restored), then finished with its figures, or how it ended otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from cnnkit.config import RunConfig, config_to_dict
from cnnkit.data.dataset import DataSplits
from cnnkit.data.sources import LoadedData
from cnnkit.errors import error_line
from cnnkit.runtime import DistributedContext
from cnnkit.training.final_model import best_val_accuracy
from cnnkit.training.run_folder import (
    checkpoint_to_resume,
    clear_run_outputs,
    data_roots,
    with_model_defaults,
    write_run_info,
)
from cnnkit.training.trainer import (
    Callback,
    FitResult,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
)


class RunInfoOnStart(Callback):
    """Writes the run's ``config.yaml`` and ``run.json`` (status running) when training
    starts: for ``--resume`` only once the trainer has checked and restored the checkpoint,
    so that a refused resume leaves the earlier run's files as they were."""

    def __init__(self, write: Callable[[], None], resuming: bool = False) -> None:
        self.write = write
        self.written = False
        self.resuming = resuming  # A checkpoint is there to continue from.

    def on_fit_start(self, trainer: Trainer) -> None:
        self.write_once()

    def write_once(self) -> None:
        if not self.written:
            self.written = True
            self.write()


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
    resuming = resume and checkpoint_to_resume(run_dir, config.model.name) is not None
    description = data.splits.description
    started = RunInfoOnStart(
        lambda: write_run_info(run_dir, config, {"status": "running", "data": description}),
        resuming,
    )
    if distributed.is_main and not resuming:
        # A fresh start (also --resume without a checkpoint) replaces the earlier run, once
        # the data has loaded and its batches are set up: a run that fails before keeps it.
        clear_run_outputs(run_dir, keep=data_roots(config))
        started.write_once()
    if distributed.is_main and resuming:
        # The checkpoint is checked against this run's settings first (see RunInfoOnStart).
        callbacks = [started, *callbacks]
    return started, callbacks


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
            "config": config_to_dict(with_model_defaults(config)),
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
        write_run_info(run_dir, config, details)
        return
    # Any other error (a full disk) ends the run too; a checkpoint that does not fit this
    # run's settings leaves the earlier run's files as they were.
    details = {"status": "failed", "data": splits.description, "error": error_line(error)}
    with contextlib.suppress(OSError):  # The full disk must not hide the first error.
        write_run_info(run_dir, config, details)
