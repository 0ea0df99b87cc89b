"""One training epoch of a :class:`~cnnkit.training.trainer.Trainer`: the memory check before
the first step, each batch's mixing, optimizer step, schedule step and weight average, the
running totals with their progress bar, and the check that the loss stayed finite."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from cnnkit.data.loader import BatchLoader
from cnnkit.progress import bar_disabled
from cnnkit.training.fit_state import TrainingDiverged
from cnnkit.training.memory import check_before_training
from cnnkit.training.mixing import mix_batch

if TYPE_CHECKING:  # The trainer imports this module to train its epochs.
    from cnnkit.training.trainer import Trainer


class RunningTotals:
    """Summed loss and right answers, kept on the device so that no step waits for them.

    Args:
        device: where the sums live (the model's device).
        dtype: float64, or float32 where the device lacks it (Apple's MPS).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.loss = torch.zeros((), device=device, dtype=dtype)
        self.correct = torch.zeros((), device=device, dtype=dtype)
        self.seen = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        """Add a batch's summed ``loss``, its ``correct`` answers and its sample ``count``."""
        self.loss += loss
        self.correct += correct
        self.seen += count


def run_training_epoch(trainer: Trainer, loader: BatchLoader) -> dict[str, float]:
    """One pass of ``trainer`` over ``loader``; see :meth:`Trainer.train_epoch`."""
    trainer.model.train()
    totals = RunningTotals(trainer.device, trainer.sum_dtype)
    config = trainer.config
    start = time.perf_counter()
    bar = tqdm(
        total=len(loader),
        desc=f"epoch {trainer.epoch + 1}/{config.epochs}",
        unit="batch",
        disable=bar_disabled(trainer.progress),
        leave=False,
    )
    learning_rate = trainer.optimizer.param_groups[-1]["lr"]  # What the first step uses.
    for inputs, labels in loader:
        inputs = inputs.contiguous(memory_format=trainer.memory_format)
        if trainer.memory_check_pending:
            _check_memory(trainer, inputs)
        batch = mix_batch(inputs, labels, config.mixup_alpha, config.cutmix_alpha)
        # Through the trainer, so that a benchmark can time its step.
        loss, right = trainer.train_step(batch)
        trainer.scheduler.step()
        if trainer.average:
            trainer.average.update(trainer.module)
        totals.add(loss, right, len(labels))
        if trainer.progress and (bar.n % 10 == 0 or bar.n == len(loader) - 1):
            _show_totals(bar, totals, time.perf_counter() - start)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = trainer.sum_over_processes(
        [totals.loss.item(), totals.correct.item(), totals.seen]
    )
    _check_not_diverged(trainer, loss_sum)
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "learning_rate": learning_rate,
        "seconds": seconds,
        "images_per_second": seen / max(seconds, 1e-9),
    }


def _check_memory(trainer: Trainer, inputs: torch.Tensor) -> None:
    """Check, once per fit, that a step on this process's share of the batch fits in memory,
    and take the samples per forward pass the check chooses."""
    trainer.memory_check_pending = False
    config = trainer.config
    # Optimizer states per parameter, plus the moving average's copy.
    states = (1 if config.optimizer == "sgd" else 2) + bool(trainer.average)
    trainer.micro_batch_size = check_before_training(
        trainer.module,
        inputs,
        config.batch_size // trainer.distributed.world_size,  # this process's share
        trainer.autocast,
        states,
        config.micro_batch_size,
    )


def _show_totals(bar: tqdm, totals: RunningTotals, elapsed: float) -> None:
    bar.set_postfix(
        loss=f"{totals.loss.item() / totals.seen:.3f}",
        acc=f"{totals.correct.item() / totals.seen:.3f}",
        img_s=f"{totals.seen / max(elapsed, 1e-9):.0f}",
    )


def _check_not_diverged(trainer: Trainer, loss_sum: float) -> None:
    """Raise :class:`TrainingDiverged` when the epoch's summed loss is not finite and the
    weights are lost.

    Under a GradScaler (CUDA float16) an overflowing step is skipped and the weights stay
    finite; only weights that are no longer finite mean the run is lost. The weights are
    looked at only once the loss says something went wrong.
    """
    if math.isfinite(loss_sum):
        return
    if trainer.scaler is None or not _weights_finite(trainer):
        raise TrainingDiverged(
            f"training diverged in epoch {trainer.epoch + 1} (loss {loss_sum}); lower the "
            f"learning rate (now {trainer.config.learning_rate:g}) and start a fresh run (a "
            "resumed one keeps its checkpoint's)"
        )


def _weights_finite(trainer: Trainer) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in trainer.module.parameters())
