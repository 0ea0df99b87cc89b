"""A generic trainer: ``fit`` -> ``train_epoch`` -> ``evaluate``, with hooks and resume.

Nothing here knows which network it trains: a model maps ``[B, C, H, W]`` to logits, and may
offer ``parameter_groups(learning_rate, backbone_lr_scale)`` for per-group learning rates.
The :class:`Trainer` holds the run's state and takes each step; its loops are
:mod:`~cnnkit.training.fit_loop` and :mod:`~cnnkit.training.epoch_loop`, and its checkpoint
is :mod:`~cnnkit.training.resume`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnkit.config import TrainConfig
from cnnkit.data.loader import BatchLoader
from cnnkit.progress import bar_disabled
from cnnkit.runtime import DistributedContext
from cnnkit.training.averaging import WeightAverage
from cnnkit.training.callbacks import Callback
from cnnkit.training.checkpoint import CHECKPOINT_NAME
from cnnkit.training.epoch_loop import RunningTotals, run_training_epoch
from cnnkit.training.fit_loop import run_fit_loop
from cnnkit.training.fit_state import FitProgress, FitResult, TrainingDiverged, TrainingInterrupted
from cnnkit.training.memory import pass_count
from cnnkit.training.mixing import MixedBatch
from cnnkit.training.optimization import (
    amp_settings,
    build_average,
    build_optimizer,
    build_scheduler,
)
from cnnkit.training.resume import restore_progress

# What callers of the trainer use with it (its hooks, result and errors), importable from here.
__all__ = ["Callback", "FitResult", "Trainer", "TrainingDiverged", "TrainingInterrupted"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Trainer:
    """Trains a classifier with cross-entropy.

    Args:
        model: any ``nn.Module`` producing logits ``[B, K]``.
        config: optimiser, schedule, epochs, AMP and early-stopping settings.
        device: where the model runs (batches come from the loaders already there).
        run_dir: where the checkpoint goes; ``None`` disables checkpoints.
        callbacks: hooks (metrics CSV, TensorBoard, pruning...).
        distributed: this process's rank information under torchrun.
        progress: show progress bars (rank 0 only).
        identity: what the run trains on (for example its class names), saved in each
            checkpoint; resuming from a checkpoint with another identity is an error.
        label: what the caller calls this fit (``fine-tune``), put before each plain epoch
            line (``fine-tune epoch 3/8: ...``) to tell it from the run's other fits; None
            prints the lines bare.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        device: torch.device,
        run_dir: Path | None = None,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        distributed: DistributedContext | None = None,
        progress: bool = True,
        identity: dict[str, Any] | None = None,
        label: str | None = None,
    ) -> None:
        self.config = config
        self.label = label
        self.identity = identity or {}
        self.device = device
        # Running sums of loss and correct answers: float64, which Apple's MPS lacks.
        self.sum_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.run_dir = Path(run_dir) if run_dir else None
        self.callbacks = list(callbacks)
        self.distributed = distributed or DistributedContext()
        self.progress = progress and self.distributed.is_main
        self.memory_format = (
            torch.channels_last if config.channels_last else torch.contiguous_format
        )
        model = model.to(device, memory_format=self.memory_format)
        if self.distributed.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.model = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.average: WeightAverage | None = None  # The weights' moving average, when on.
        self.autocast_dtype, self.scaler = amp_settings(device, config)
        self.epoch = 0
        self.saved_epoch: int | None = None  # The epoch the checkpoint on disk holds.
        self.history: list[dict[str, float]] = []
        # Whether the next training step first checks that the batch fits in memory.
        self.memory_check_pending = False
        # Samples per forward pass (None: the whole batch); the memory check may lower it.
        self.micro_batch_size: int | None = config.micro_batch_size

    @property
    def module(self) -> nn.Module:
        """The model without its DistributedDataParallel wrapper."""
        return _unwrap(self.model)

    @property
    def eval_module(self) -> nn.Module:
        """The network that is evaluated: the weights' moving average while one is kept (and
        has seen a step); after ``fit``, the model itself, which then holds the chosen weights."""
        if self.average is not None and self.average.updates > 0:
            return self.average.module
        return self.module

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context forward passes run in (bf16 or float16 autocast, or
        none)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.module, self.config, self.device)

    def fit(
        self,
        train_loader: BatchLoader,
        val_loader: BatchLoader | None = None,
        resume: bool = False,
        more_follows: bool = False,
    ) -> FitResult:
        """Train for ``config.epochs`` epochs (continuing from the checkpoint when ``resume``).

        ``more_follows`` says that this fit is one part of a longer run (an ensemble's member
        before the last): a resumed part that had stopped early is then done, not a run with
        nothing left to train, and no warning says so.

        With ``config.ema_decay`` set, a moving average of the weights is kept, evaluated
        after each epoch, and becomes the model's weights at the end. At the end the weights of
        the best validation epoch (averaged or not) are restored when there is a validation set.

        Before the first step, the memory the batch size needs is estimated and checked
        (``config.memory_check``; see :mod:`cnnkit.training.memory`).

        Raises:
            TrainingInterrupted: on Ctrl-C, after saving the last completed epoch.
            InsufficientMemoryError: if even a micro-batch would not fit in memory.
        """
        config = self.config
        self.optimizer = self._build_optimizer()
        total_steps = config.epochs * len(train_loader)
        self.scheduler = build_scheduler(self.optimizer, config, total_steps)
        if config.ema_decay:
            self.average = build_average(self.module, config.ema_decay, total_steps)
        progress = FitProgress()
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            restore_progress(self, progress, len(train_loader))
        self.history = progress.result.history
        self.memory_check_pending = config.memory_check
        try:
            return run_fit_loop(self, train_loader, val_loader, progress, more_follows)
        finally:
            for callback in self.callbacks:
                callback.teardown(self)

    def train_epoch(self, loader: BatchLoader) -> dict[str, float]:
        """One pass over ``loader``; returns loss, accuracy, learning rate and throughput.

        ``learning_rate`` is the rate of the epoch's first optimizer step (of the last
        parameter group: a transfer model's head), which the schedule then moves on from.
        """
        return run_training_epoch(self, loader)

    def train_step(self, batch: MixedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on ``batch``, computed in the fewest even micro-batches of at
        most ``micro_batch_size`` samples, whose gradients add up to the whole batch's; returns
        the batch's summed loss and its count of right answers. With batch norm in training
        mode, each micro-batch normalises with its own statistics."""
        size = len(batch.labels)
        chunks = batch.split(pass_count(size, self.micro_batch_size or size))
        self.optimizer.zero_grad(set_to_none=True)
        totals = RunningTotals(self.device, self.sum_dtype)
        # DDP averages gradients across processes once, on the batch's last backward.
        no_sync = getattr(self.model, "no_sync", None)
        for index, chunk in enumerate(chunks):
            last, count = index == len(chunks) - 1, len(chunk.labels)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with self.autocast():
                    logits = self.model(chunk.inputs)
                    loss = chunk.loss(logits.float(), self.config.label_smoothing)
                share = loss * (count / size)
                (self.scaler.scale(share) if self.scaler else share).backward()
            totals.add(loss.detach() * count, chunk.correct(logits.detach()), count)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return totals.loss, totals.correct

    def sum_over_processes(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all processes (a no-op when not distributed)."""
        if not self.distributed.enabled:
            return values
        tensor = torch.tensor(values, dtype=self.sum_dtype, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    @torch.inference_mode()
    def predict(
        self, loader: BatchLoader, desc: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[N, K]`` (float32, CPU) and labels ``[N]`` over this process's share.

        With ``desc``, a progress bar of that name counts the images (on a terminal, when the
        trainer shows progress): a run's final test of large photos takes minutes on a CPU.
        """
        module = self.eval_module
        module.eval()
        all_logits, all_labels = [], []
        shown = desc is not None and self.progress
        with tqdm(
            total=loader.num_samples if shown else None,
            desc=desc,
            unit="img",
            disable=not shown or bar_disabled(self.progress),
            leave=False,
        ) as bar:
            for inputs, labels in loader:
                with self.autocast():
                    logits = module(inputs.contiguous(memory_format=self.memory_format))
                all_logits.append(logits.float().cpu())
                all_labels.append(labels.cpu())
                bar.update(len(labels))
        if not all_logits:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
        return torch.cat(all_logits), torch.cat(all_labels)

    def evaluate(self, loader: BatchLoader) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy over ``loader``, summed across processes."""
        logits, labels = self.predict(loader)
        count = len(labels)
        if count:
            loss = F.cross_entropy(logits, labels, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 = (top[:, 0] == labels).sum().item()
            correct5 = (top == labels.view(-1, 1)).any(dim=1).sum().item()
        else:
            loss = correct1 = correct5 = 0.0
        loss, correct1, correct5, count = self.sum_over_processes([loss, correct1, correct5, count])
        count = max(count, 1)
        return {"loss": loss / count, "accuracy": correct1 / count, "top5": correct5 / count}

    def checkpoint_state(self) -> dict[str, Any]:
        """The model's current weights (unwrapped)."""
        return self.module.state_dict()
