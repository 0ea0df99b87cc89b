"""A :class:`~cnnkit.training.trainer.Trainer`'s checkpoint: what it saves after each epoch,
and how a resumed fit restores it, after checking that it fits this run."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch

from cnnkit.errors import error_line
from cnnkit.training.checkpoint import (
    CheckpointError,
    check_epochs,
    check_identity,
    check_optimization,
    load_checkpoint,
    optimization_settings,
    save_checkpoint,
)
from cnnkit.training.fit_state import FitProgress

if TYPE_CHECKING:  # The trainer imports this module to save and resume.
    from cnnkit.training.trainer import Trainer

logger = logging.getLogger(__name__)


def save_progress(trainer: Trainer, progress: FitProgress) -> None:
    """Write the trainer's state and ``progress`` to its checkpoint (rank 0, when it has a
    run folder), and remember the epoch the file now holds."""
    if trainer.checkpoint_path and trainer.distributed.is_main:
        save_checkpoint(trainer.checkpoint_path, _checkpoint_state(trainer, progress))
        trainer.saved_epoch = trainer.epoch


def _checkpoint_state(trainer: Trainer, progress: FitProgress) -> dict:
    result = progress.result
    return {
        "model": trainer.module.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler else {},
        "average": trainer.average.state_dict() if trainer.average else {},
        "epoch": trainer.epoch,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "best_model": progress.best_state or {},
        "bad_epochs": progress.bad_epochs,
        "identity": trainer.identity,
        "optimization": _optimization_settings(trainer),
    }


def _optimization_settings(trainer: Trainer) -> dict[str, Any]:
    return optimization_settings(trainer.config, hasattr(trainer.module, "parameter_groups"))


def restore_progress(trainer: Trainer, progress: FitProgress, steps_per_epoch: int) -> None:
    """Load the trainer's checkpoint into the trainer (whose optimizer and schedule are built)
    and into ``progress``.

    Raises:
        CheckpointError: if the checkpoint is unreadable, or another run's (its data, model,
            optimizer settings, epochs or steps differ).
    """
    path = trainer.checkpoint_path
    state = load_checkpoint(path)
    check_identity(path, state.get("identity") or {}, trainer.identity)
    settings = _optimization_settings(trainer)
    check_optimization(path, state, settings, trainer.optimizer.param_groups)
    _load_weights(trainer, state)
    _load_schedule(trainer, state, steps_per_epoch)
    if trainer.scaler and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    if trainer.average and state.get("average"):
        trainer.average.load_state_dict(state["average"])
    elif trainer.average:
        logger.warning(
            "%s has no moving average of the weights; it starts from the resumed weights", path
        )
    trainer.epoch = int(state["epoch"])
    trainer.saved_epoch = trainer.epoch
    progress.result.history = list(state["history"])
    progress.result.best_epoch = int(state["best_epoch"])
    progress.result.best_val_accuracy = float(state["best_val_accuracy"])
    logger.info("resumed from %s after epoch %d", path, trainer.epoch)
    progress.best_state = state["best_model"] or None
    progress.bad_epochs = int(state["bad_epochs"])


def _load_weights(trainer: Trainer, state: dict[str, Any]) -> None:
    """Load the model's and the optimizer's state, or say that the checkpoint is another
    model's."""
    try:
        trainer.module.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        # A size mismatch lists every tensor after a heading; its last line says enough.
        detail = error_line(error, last=True)
        raise CheckpointError(
            f"{trainer.checkpoint_path}: does not match this run's model ({detail}); resume "
            "with the settings it was trained with, or train into a new --out"
        ) from None


def _load_schedule(trainer: Trainer, state: dict[str, Any], steps_per_epoch: int) -> None:
    """Continue this run's schedule from the step the checkpoint reached."""
    scheduler_state = dict(state["scheduler"])
    # The schedule's length comes from this run's epochs, so a resumed run may be longer.
    for key in ("total_steps", "_schedule_phases"):
        scheduler_state.pop(key, None)
    trainer.scheduler.load_state_dict(scheduler_state)
    check_epochs(trainer.checkpoint_path, int(state["epoch"]), trainer.config.epochs)
    _check_schedule_fits(trainer, int(state["epoch"]), steps_per_epoch)
    _align_schedule(trainer, int(state["epoch"]), steps_per_epoch)
    _take_this_schedules_rates(trainer.scheduler, trainer.optimizer)


def _align_schedule(trainer: Trainer, epochs_done: int, steps_per_epoch: int) -> None:
    """Put a warm-up-and-decay schedule (cosine or constant) at the end of the epochs done, as
    this run counts its steps: with another batch size the checkpoint's step count stands for
    another share of the run (at a quarter of the steps an epoch, cosine would sit past its
    end, at a rate of 0, for every epoch left). Checkpoints are written at an epoch's end."""
    scheduler = trainer.scheduler
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        return  # Checked above: it resumes only with room for the steps it has taken.
    here = epochs_done * steps_per_epoch
    if scheduler.last_epoch != here:
        logger.warning(
            "%s: its run took %d optimizer steps in %d epoch(s), this one takes %d an epoch "
            "(another batch size or --max-steps-per-epoch): the learning-rate schedule goes "
            "on from the end of epoch %d",
            trainer.checkpoint_path,
            scheduler.last_epoch,
            epochs_done,
            steps_per_epoch,
            epochs_done,
        )
        scheduler.last_epoch = here


def _take_this_schedules_rates(
    scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer
) -> None:
    """Set each group's rate to this run's schedule at the step the checkpoint reached.

    The checkpoint holds the rates its own schedule gave; with more epochs this run's
    schedule is longer, and without this the first resumed step would take the old rate.
    """
    with warnings.catch_warnings():
        # get_lr() outside step() warns that get_last_lr() gives the last computed rate,
        # which here is the checkpoint's: what is wanted is the rate at this step.
        warnings.simplefilter("ignore", UserWarning)
        rates = scheduler.get_lr()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = float(rate)


def _check_schedule_fits(trainer: Trainer, epochs_done: int, steps_per_epoch: int) -> None:
    """A one-cycle schedule cannot step past its end, so a resumed run must have room for
    the steps it has taken and the epochs left, as the checkpoint's run counted them."""
    scheduler, epochs = trainer.scheduler, trainer.config.epochs
    if not isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        return  # The other schedules hold their last value past the end.
    if epochs_done >= epochs:
        return  # Nothing left to train: no step is taken.
    steps_taken = scheduler.last_epoch
    needed = steps_taken + (epochs - epochs_done) * steps_per_epoch
    if needed > scheduler.total_steps:
        raise CheckpointError(
            f"{trainer.checkpoint_path}: its run took {steps_taken} optimizer steps in "
            f"{epochs_done} epoch(s), more than this run's schedule of "
            f"{scheduler.total_steps} ({epochs} epochs of {steps_per_epoch} "
            "steps) leaves room for; resume with the batch size and steps per epoch it was "
            "trained with, or train into a new --out"
        )
