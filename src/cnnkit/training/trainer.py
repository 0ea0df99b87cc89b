"""A generic training loop: ``fit`` -> ``train_epoch`` -> ``evaluate``, with hooks and resume.

Nothing here knows which network it trains: a model maps ``[B, C, H, W]`` to logits, and may
offer ``parameter_groups(learning_rate, backbone_lr_scale)`` for per-group learning rates.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnkit.config import TrainConfig
from cnnkit.data.loader import BatchLoader
from cnnkit.errors import error_line
from cnnkit.progress import bar_disabled, plain_lines
from cnnkit.runtime import DistributedContext, cpu_supports_bf16, rank_seed
from cnnkit.training.averaging import WeightAverage, start_share
from cnnkit.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_epochs,
    check_identity,
    check_optimization,
    load_checkpoint,
    optimization_settings,
    save_checkpoint,
)
from cnnkit.training.memory import check_before_training, pass_count
from cnnkit.training.mixing import MixedBatch, mix_batch

logger = logging.getLogger(__name__)


class TrainingDiverged(ValueError):
    """The training loss became infinite or NaN; the weights are useless from there on."""


class TrainingInterrupted(RuntimeError):
    """Raised after Ctrl-C; the last completed epoch is saved in the checkpoint."""

    def __init__(
        self, epochs_completed: int, checkpoint: Path | None, phase: str | None = None
    ) -> None:
        of = f" of {phase}" if phase else ""
        super().__init__(f"training interrupted after {epochs_completed} completed epoch(s){of}")
        self.epochs_completed = epochs_completed
        self.checkpoint = checkpoint
        self.phase = phase  # Which phase of a transfer run (fine-tune 2...), where it says.


class Callback:
    """Hooks called by :class:`Trainer`; override the ones you need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once before the first epoch (after resuming)."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called on every process after each epoch with that epoch's metrics row."""

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """Called once after training ends normally."""

    def teardown(self, trainer: Trainer) -> None:
        """Called once when ``fit`` returns or raises (Ctrl-C, a pruned trial): free resources."""


@dataclass
class FitResult:
    """What a call to :meth:`Trainer.fit` did.

    Attributes:
        history: one metrics row per epoch, resumed epochs included.
        best_epoch: the epoch whose weights were kept: the best on validation, or without a
            validation split the last.
        best_val_accuracy: the best epoch's validation accuracy; without a validation split,
            the highest training accuracy of an epoch (search ranks such trials by it), which
            is no validation figure: :func:`cnnkit.training.run.train_run` records null.
        epochs_run: the epochs trained in all, resumed ones included; after an early stop,
            the epoch it stopped after.
        stopped_early: early stopping ended the run, in this call or (resumed) an earlier one.
        seconds: this call's training time.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def epoch_line(row: dict[str, float], epochs: int) -> str:
    """One epoch's figures as a plain line: ``epoch 3/24: train_loss 0.8123 ...``."""
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_top5")
    parts = [f"{key} {row[key]:.4f}" for key in keys if key in row]
    if "images_per_second" in row:
        parts.append(f"{row['images_per_second']:.0f} img/s")
    if "seconds" in row:
        parts.append(f"{row['seconds']:.0f} s")
    return f"epoch {int(row['epoch'])}/{epochs}: " + "  ".join(parts)


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
    ) -> None:
        self.config = config
        self.identity = identity or {}
        self.device = device
        # Running sums of loss and correct answers: float64, which Apple's MPS lacks.
        self._sum_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
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
        self.autocast_dtype, self.scaler = self._amp_settings()
        self.epoch = 0
        self.saved_epoch: int | None = None  # The epoch the checkpoint on disk holds.
        self.history: list[dict[str, float]] = []
        self._memory_unchecked = False
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

    def _amp_settings(self) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
        if self.device.type == "cuda" and self.config.amp:
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, None
            return torch.float16, torch.amp.GradScaler("cuda")
        if self.device.type == "cpu" and self.config.bf16_cpu:
            if cpu_supports_bf16():
                return torch.bfloat16, None
            logger.info("bf16 autocast skipped: this CPU has no native bf16 instructions")
        return None, None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        module = self.module
        if hasattr(module, "parameter_groups"):
            groups = module.parameter_groups(config.learning_rate, config.backbone_lr_scale)
        else:
            groups = [{"params": [p for p in module.parameters() if p.requires_grad]}]
        groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
        if not groups:
            raise ValueError("the model has no trainable parameters")
        lr, decay = config.learning_rate, config.weight_decay
        # The fused kernels update all parameters in one pass: on the CPU the optimizer step of
        # a 15M-parameter model fell from about 80 ms to 8 ms.
        fused = self.device.type in ("cpu", "cuda")
        if config.optimizer == "adam":
            return torch.optim.Adam(groups, lr=lr, weight_decay=decay, fused=fused)
        if config.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=lr, weight_decay=decay, fused=fused)
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay)

    def _build_scheduler(self, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        config, optimizer = self.config, self.optimizer
        if config.schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=max(total_steps, 2),
                pct_start=max(config.warmup_fraction, 1e-3),
            )
        warmup = int(config.warmup_fraction * total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if config.schedule == "constant":
                return 1.0
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _state(self, result: FitResult, best_state: dict | None, bad_epochs: int) -> dict:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "average": self.average.state_dict() if self.average else {},
            "epoch": self.epoch,
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "best_model": best_state or {},
            "bad_epochs": bad_epochs,
            "identity": self.identity,
            "optimization": self._optimization_settings(),
        }

    def _save(self, result: FitResult, best_state: dict | None, bad_epochs: int) -> None:
        if self.checkpoint_path and self.distributed.is_main:
            save_checkpoint(self.checkpoint_path, self._state(result, best_state, bad_epochs))
            self.saved_epoch = self.epoch

    def _restore(self, result: FitResult, steps_per_epoch: int) -> tuple[dict | None, int]:
        state = load_checkpoint(self.checkpoint_path)
        check_identity(self.checkpoint_path, state.get("identity") or {}, self.identity)
        settings = self._optimization_settings()
        check_optimization(self.checkpoint_path, state, settings, self.optimizer.param_groups)
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            # A size mismatch lists every tensor after a heading; its last line says enough.
            detail = error_line(error, last=True)
            raise CheckpointError(
                f"{self.checkpoint_path}: does not match this run's model ({detail}); resume "
                "with the settings it was trained with, or train into a new --out"
            ) from None
        scheduler_state = dict(state["scheduler"])
        # The schedule's length comes from this run's epochs, so a resumed run may be longer.
        for key in ("total_steps", "_schedule_phases"):
            scheduler_state.pop(key, None)
        self.scheduler.load_state_dict(scheduler_state)
        check_epochs(self.checkpoint_path, int(state["epoch"]), self.config.epochs)
        self._check_schedule_fits(int(state["epoch"]), steps_per_epoch)
        self._take_this_schedules_rates()
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.average and state.get("average"):
            self.average.load_state_dict(state["average"])
        elif self.average:
            logger.warning(
                "%s has no moving average of the weights; it starts from the resumed weights",
                self.checkpoint_path,
            )
        self.epoch = int(state["epoch"])
        self.saved_epoch = self.epoch
        result.history = list(state["history"])
        result.best_epoch = int(state["best_epoch"])
        result.best_val_accuracy = float(state["best_val_accuracy"])
        logger.info("resumed from %s after epoch %d", self.checkpoint_path, self.epoch)
        return (state["best_model"] or None), int(state["bad_epochs"])

    def _optimization_settings(self) -> dict[str, Any]:
        return optimization_settings(self.config, hasattr(self.module, "parameter_groups"))

    def _take_this_schedules_rates(self) -> None:
        """Set each group's rate to this run's schedule at the step the checkpoint reached.

        The checkpoint holds the rates its own schedule gave; with more epochs this run's
        schedule is longer, and without this the first resumed step would take the old rate.
        """
        with warnings.catch_warnings():
            # get_lr() outside step() warns that get_last_lr() gives the last computed rate,
            # which here is the checkpoint's: what is wanted is the rate at this step.
            warnings.simplefilter("ignore", UserWarning)
            rates = self.scheduler.get_lr()
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = float(rate)

    def _check_schedule_fits(self, epochs_done: int, steps_per_epoch: int) -> None:
        """A one-cycle schedule cannot step past its end, so a resumed run must have room for
        the steps it has taken and the epochs left, as the checkpoint's run counted them."""
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR):
            return  # The other schedules hold their last value past the end.
        if epochs_done >= self.config.epochs:
            return  # Nothing left to train: no step is taken.
        steps_taken = self.scheduler.last_epoch
        needed = steps_taken + (self.config.epochs - epochs_done) * steps_per_epoch
        if needed > self.scheduler.total_steps:
            raise CheckpointError(
                f"{self.checkpoint_path}: its run took {steps_taken} optimizer steps in "
                f"{epochs_done} epoch(s), more than this run's schedule of "
                f"{self.scheduler.total_steps} ({self.config.epochs} epochs of {steps_per_epoch} "
                "steps) leaves room for; resume with the batch size and steps per epoch it was "
                "trained with, or train into a new --out"
            )

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
        self.scheduler = self._build_scheduler(total_steps)
        if config.ema_decay:
            self.average = WeightAverage(self.module, config.ema_decay)
            share = start_share(config.ema_decay, total_steps)
            if share > 0.05:
                logger.warning(
                    "ema_decay %g is high for %d steps: the starting weights keep %.0f%% of the "
                    "average; lower it (about 1 - 5 / steps) or train longer",
                    config.ema_decay,
                    total_steps,
                    100 * share,
                )
        result, best_state, bad_epochs = FitResult(), None, 0
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            best_state, bad_epochs = self._restore(result, len(train_loader))
        self.history = result.history
        self._memory_unchecked = config.memory_check
        try:
            return self._fit_epochs(
                train_loader, val_loader, result, best_state, bad_epochs, more_follows
            )
        finally:
            for callback in self.callbacks:
                callback.teardown(self)

    def _fit_epochs(
        self,
        train_loader: BatchLoader,
        val_loader: BatchLoader | None,
        result: FitResult,
        best_state: dict | None,
        bad_epochs: int,
        more_follows: bool = False,
    ) -> FitResult:
        config = self.config
        patience = config.early_stopping_patience
        if val_loader is None and patience is not None:
            # Training accuracy says nothing about generalisation, and stopping on it would cut
            # a one-cycle or cosine schedule short: the schedule's fixed epochs decide instead.
            logger.info("no validation split: early stopping is off; %d epochs run", config.epochs)
            patience = None
        if patience is not None and bad_epochs >= patience:
            # A resumed run that had already stopped early: nothing is left to train, which a
            # resume asking for more epochs would not expect.
            result.stopped_early = True
            log = logger.info if more_follows else logger.warning
            log(
                "%s: the run stopped early after epoch %d (%d epochs without a better validation "
                "accuracy), so nothing is left to train; resume with --patience above %d "
                "(train.early_stopping_patience) to go on",
                self.checkpoint_path,
                self.epoch,
                bad_epochs,
                bad_epochs,
            )
        for callback in self.callbacks:
            callback.on_fit_start(self)
        start = time.perf_counter()
        try:
            while self.epoch < config.epochs and not result.stopped_early:
                # Dropout, drop-path and Mixup draw from this stream, a different one per rank.
                epoch_seed = config.seed * 1_000_003 + self.epoch
                torch.manual_seed(rank_seed(epoch_seed, self.distributed.rank))
                train_loader.set_epoch(self.epoch)
                row = {"epoch": self.epoch + 1, **self.train_epoch(train_loader)}
                # Every process then scores and keeps rank 0's network, the one saved.
                self._share_buffers()
                if val_loader is not None:
                    val = self.evaluate(val_loader)
                    row.update({f"val_{k}": v for k, v in val.items()})
                self.epoch += 1
                result.history.append(row)
                if plain_lines(self.progress):
                    print(epoch_line(row, config.epochs), file=sys.stderr, flush=True)
                score = row.get("val_accuracy", row["train_accuracy"])
                if not score <= result.best_val_accuracy:  # Also true when best is NaN.
                    result.best_val_accuracy, result.best_epoch, bad_epochs = score, self.epoch, 0
                    if val_loader is not None:
                        best_state = copy.deepcopy(self.eval_module.state_dict())
                else:
                    bad_epochs += 1
                if val_loader is None:
                    result.best_epoch = self.epoch  # The last epoch's weights are kept.
                self._save(result, best_state, bad_epochs)
                for callback in self.callbacks:
                    callback.on_epoch_end(self, row)
                if patience is not None and bad_epochs >= patience:
                    result.stopped_early = True
                    logger.info("early stopping after epoch %d", self.epoch)
        except KeyboardInterrupt:
            # Report what is on disk: nothing before the first save, and the saved epoch when
            # Ctrl-C lands between counting an epoch and writing its checkpoint.
            saved = self.saved_epoch
            checkpoint = self.checkpoint_path if saved is not None else None
            raise TrainingInterrupted(saved or 0, checkpoint) from None
        if best_state is None and self.eval_module is not self.module:
            best_state = self.eval_module.state_dict()  # The moving average, without val.
        if best_state is not None:
            self.module.load_state_dict(best_state)
        if val_loader is None:
            result.best_epoch = self.epoch  # Also for a resumed run with nothing left to train.
        # The model now holds the weights that are kept, and later evaluation scores them.
        self.average = None
        result.epochs_run = self.epoch
        result.seconds = time.perf_counter() - start
        for callback in self.callbacks:
            callback.on_fit_end(self, result)
        return result

    def train_epoch(self, loader: BatchLoader) -> dict[str, float]:
        """One pass over ``loader``; returns loss, accuracy, learning rate and throughput.

        ``learning_rate`` is the rate of the epoch's first optimizer step (of the last
        parameter group: a transfer model's head), which the schedule then moves on from.
        """
        self.model.train()
        total_loss = torch.zeros((), device=self.device, dtype=self._sum_dtype)
        correct = torch.zeros((), device=self.device, dtype=self._sum_dtype)
        seen = 0
        config = self.config
        start = time.perf_counter()
        bar = tqdm(
            total=len(loader),
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            unit="batch",
            disable=bar_disabled(self.progress),
            leave=False,
        )
        learning_rate = self.optimizer.param_groups[-1]["lr"]  # What the first step uses.
        for inputs, labels in loader:
            inputs = inputs.contiguous(memory_format=self.memory_format)
            if self._memory_unchecked:
                self._memory_unchecked = False
                # Optimizer states per parameter, plus the moving average's copy.
                states = (1 if config.optimizer == "sgd" else 2) + bool(self.average)
                self.micro_batch_size = check_before_training(
                    self.module,
                    inputs,
                    config.batch_size // self.distributed.world_size,  # this process's share
                    self._autocast,
                    states,
                    config.micro_batch_size,
                )
            batch = mix_batch(inputs, labels, config.mixup_alpha, config.cutmix_alpha)
            loss, right = self._step(batch)
            self.scheduler.step()
            if self.average:
                self.average.update(self.module)
            total_loss += loss
            correct += right
            seen += len(labels)
            if self.progress and (bar.n % 10 == 0 or bar.n == len(loader) - 1):
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{total_loss.item() / seen:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                )
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - start
        totals = self._reduce([total_loss.item(), correct.item(), seen])
        # Under a GradScaler (CUDA float16) an overflowing step is skipped and the weights
        # stay finite; only weights that are no longer finite mean the run is lost. The
        # weights are looked at only once the loss says something went wrong.
        if not math.isfinite(totals[0]) and (self.scaler is None or not self._weights_finite()):
            raise TrainingDiverged(
                f"training diverged in epoch {self.epoch + 1} (loss {totals[0]}); lower the "
                f"learning rate (now {self.config.learning_rate:g}) and start a fresh run (a "
                "resumed one keeps its checkpoint's)"
            )
        return {
            "train_loss": totals[0] / max(totals[2], 1),
            "train_accuracy": totals[1] / max(totals[2], 1),
            "learning_rate": learning_rate,
            "seconds": seconds,
            "images_per_second": totals[2] / max(seconds, 1e-9),
        }

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.module.parameters())

    def _step(self, batch: MixedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on ``batch``, computed in the fewest even micro-batches of at
        most ``micro_batch_size`` samples, whose gradients add up to the whole batch's; returns
        the batch's summed loss and its count of right answers. With batch norm in training
        mode, each micro-batch normalises with its own statistics."""
        size = len(batch.labels)
        chunks = batch.split(pass_count(size, self.micro_batch_size or size))
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=self.device, dtype=self._sum_dtype)
        correct = torch.zeros((), device=self.device, dtype=self._sum_dtype)
        # DDP averages gradients across processes once, on the batch's last backward.
        no_sync = getattr(self.model, "no_sync", None)
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with self._autocast():
                    logits = self.model(chunk.inputs)
                    loss = chunk.loss(logits.float(), self.config.label_smoothing)
                share = loss * (len(chunk.labels) / size)
                (self.scaler.scale(share) if self.scaler else share).backward()
            total_loss += loss.detach() * len(chunk.labels)
            correct += chunk.correct(logits.detach())
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return total_loss, correct

    def _share_buffers(self) -> None:
        """Give every process rank 0's buffers (batch-norm statistics), also the moving
        average's. Each process updates its own from its shard of the batches, DDP copies rank
        0's only at the next training forward pass, and rank 0's network is the one saved."""
        if not self.distributed.enabled:
            return
        modules = [self.module] + ([self.average.module] if self.average else [])
        for module in modules:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, 0)

    def _reduce(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all processes (a no-op when not distributed)."""
        if not self.distributed.enabled:
            return values
        tensor = torch.tensor(values, dtype=self._sum_dtype, device=self.device)
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
                with self._autocast():
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
        loss, correct1, correct5, count = self._reduce([loss, correct1, correct5, count])
        count = max(count, 1)
        return {"loss": loss / count, "accuracy": correct1 / count, "top5": correct5 / count}

    def checkpoint_state(self) -> dict[str, Any]:
        """The model's current weights (unwrapped)."""
        return self.module.state_dict()
