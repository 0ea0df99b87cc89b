"""The epoch loop of :meth:`~cnnkit.training.trainer.Trainer.fit`: each epoch trains,
validates, keeps the best weights, saves the checkpoint and calls the hooks, until the last
epoch, an early stop or Ctrl-C."""

from __future__ import annotations

import copy
import logging
import sys
import time
from typing import TYPE_CHECKING

import torch

from cnnkit.data.loader import BatchLoader
from cnnkit.progress import plain_lines
from cnnkit.runtime import rank_seed
from cnnkit.training.fit_state import FitProgress, FitResult, TrainingInterrupted
from cnnkit.training.resume import save_progress

if TYPE_CHECKING:  # The trainer imports this module to run its epochs.
    from cnnkit.training.trainer import Trainer

logger = logging.getLogger(__name__)


def run_fit_loop(
    trainer: Trainer,
    train_loader: BatchLoader,
    val_loader: BatchLoader | None,
    progress: FitProgress,
    more_follows: bool = False,
) -> FitResult:
    """Train ``trainer`` from its epoch (and ``progress``, after a resume) to the last one;
    see :meth:`~cnnkit.training.trainer.Trainer.fit`.

    Raises:
        TrainingInterrupted: on Ctrl-C, naming the epoch the checkpoint holds.
    """
    result = progress.result
    patience = _early_stopping_patience(trainer, val_loader, progress, more_follows)
    for callback in trainer.callbacks:
        callback.on_fit_start(trainer)
    start = time.perf_counter()
    try:
        while trainer.epoch < trainer.config.epochs and not result.stopped_early:
            _run_epoch(trainer, train_loader, val_loader, progress, patience)
    except KeyboardInterrupt:
        # Report what is on disk: nothing before the first save, and the saved epoch when
        # Ctrl-C lands between counting an epoch and writing its checkpoint.
        saved = trainer.saved_epoch
        checkpoint = trainer.checkpoint_path if saved is not None else None
        raise TrainingInterrupted(saved or 0, checkpoint) from None
    _keep_chosen_weights(trainer, progress, has_validation=val_loader is not None)
    result.epochs_run = trainer.epoch
    result.seconds = time.perf_counter() - start
    for callback in trainer.callbacks:
        callback.on_fit_end(trainer, result)
    return result


def epoch_line(row: dict[str, float], epochs: int, label: str | None = None) -> str:
    """One epoch's figures as a plain line: ``epoch 3/24: train_loss 0.8123 ...``, after
    ``label`` where one names the fit (``fine-tune epoch 3/8: ...``)."""
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_top5")
    parts = [f"{key} {row[key]:.4f}" for key in keys if key in row]
    if "images_per_second" in row:
        parts.append(f"{row['images_per_second']:.0f} img/s")
    if "seconds" in row:
        parts.append(f"{row['seconds']:.0f} s")
    start = f"{label} " if label else ""
    return f"{start}epoch {int(row['epoch'])}/{epochs}: " + "  ".join(parts)


def _early_stopping_patience(
    trainer: Trainer, val_loader: BatchLoader | None, progress: FitProgress, more_follows: bool
) -> int | None:
    """The epochs without a better validation accuracy that stop the run (None: never).

    A resumed run that had stopped early is marked as stopped already.
    """
    config = trainer.config
    patience = config.early_stopping_patience
    if val_loader is None and patience is not None:
        # Training accuracy says nothing about generalisation, and stopping on it would cut
        # a one-cycle or cosine schedule short: the schedule's fixed epochs decide instead.
        logger.info("no validation split: early stopping is off; %d epochs run", config.epochs)
        patience = None
    if patience is not None and progress.bad_epochs >= patience:
        # A resumed run that had already stopped early: nothing is left to train, which a
        # resume asking for more epochs would not expect.
        progress.result.stopped_early = True
        log = logger.info if more_follows else logger.warning
        log(
            "%s: the run stopped early after epoch %d (%d epochs without a better validation "
            "accuracy), so nothing is left to train; resume with --patience above %d "
            "(train.early_stopping_patience) to go on",
            trainer.checkpoint_path,
            trainer.epoch,
            progress.bad_epochs,
            progress.bad_epochs,
        )
    return patience


def _run_epoch(
    trainer: Trainer,
    train_loader: BatchLoader,
    val_loader: BatchLoader | None,
    progress: FitProgress,
    patience: int | None,
) -> None:
    """Train and validate one epoch, record it, save the checkpoint and call the hooks."""
    config = trainer.config
    # Dropout, drop-path and Mixup draw from this stream, a different one per rank.
    epoch_seed = config.seed * 1_000_003 + trainer.epoch
    torch.manual_seed(rank_seed(epoch_seed, trainer.distributed.rank))
    train_loader.set_epoch(trainer.epoch)
    row = {"epoch": trainer.epoch + 1, **trainer.train_epoch(train_loader)}
    # Every process then scores and keeps rank 0's network, the one saved.
    _share_buffers(trainer)
    if val_loader is not None:
        val = trainer.evaluate(val_loader)
        row.update({f"val_{k}": v for k, v in val.items()})
    trainer.epoch += 1
    progress.result.history.append(row)
    if plain_lines(trainer.progress):
        print(epoch_line(row, config.epochs, trainer.label), file=sys.stderr, flush=True)
    _record_score(trainer, progress, row, has_validation=val_loader is not None)
    save_progress(trainer, progress)
    for callback in trainer.callbacks:
        callback.on_epoch_end(trainer, row)
    if patience is not None and progress.bad_epochs >= patience:
        progress.result.stopped_early = True
        logger.info("early stopping after epoch %d", trainer.epoch)


def _record_score(
    trainer: Trainer, progress: FitProgress, row: dict[str, float], has_validation: bool
) -> None:
    """Track the best epoch (by validation accuracy, else training accuracy) and the epochs
    since; with validation, keep a copy of the best epoch's evaluated weights."""
    result = progress.result
    score = row.get("val_accuracy", row["train_accuracy"])
    if not score <= result.best_val_accuracy:  # Also true when best is NaN.
        result.best_val_accuracy, result.best_epoch, progress.bad_epochs = score, trainer.epoch, 0
        if has_validation:
            progress.best_state = copy.deepcopy(trainer.eval_module.state_dict())
    else:
        progress.bad_epochs += 1
    if not has_validation:
        result.best_epoch = trainer.epoch  # The last epoch's weights are kept.


def _share_buffers(trainer: Trainer) -> None:
    """Give every process rank 0's buffers (batch-norm statistics), also the moving
    average's. Each process updates its own from its shard of the batches, DDP copies rank
    0's only at the next training forward pass, and rank 0's network is the one saved."""
    if not trainer.distributed.enabled:
        return
    modules = [trainer.module] + ([trainer.average.module] if trainer.average else [])
    for module in modules:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, 0)


def _keep_chosen_weights(trainer: Trainer, progress: FitProgress, has_validation: bool) -> None:
    """Load the weights the fit keeps into the model: the best validation epoch's, or without
    validation the last epoch's (averaged, where an average is kept); then drop the average."""
    best_state = progress.best_state
    if best_state is None and trainer.eval_module is not trainer.module:
        best_state = trainer.eval_module.state_dict()  # The moving average, without val.
    if best_state is not None:
        trainer.module.load_state_dict(best_state)
    if not has_validation:
        # Also for a resumed run with nothing left to train.
        progress.result.best_epoch = trainer.epoch
    # The model now holds the weights that are kept, and later evaluation scores them.
    trainer.average = None
