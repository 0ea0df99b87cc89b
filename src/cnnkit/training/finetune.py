"""Phase ``finetune`` of transfer learning: the backbone unfrozen and every layer trained on
augmented batches (batch-norm statistics kept), and the checks a resumed fine-tune must pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.config import Preprocessing, RunConfig, TrainConfig
from cnnkit.data.dataset import DataSplits
from cnnkit.data.loader import build_loaders
from cnnkit.paths import finetune_folder
from cnnkit.runtime import DistributedContext
from cnnkit.training.checkpoint import (
    CHECKPOINT_NAME,
    check_epochs,
    check_identity,
    check_optimization_settings,
    load_checkpoint,
    optimization_settings,
)
from cnnkit.training.phases import PhaseReport, phase_loggers
from cnnkit.training.trainer import Callback, FitResult, Trainer


class FrozenBatchNorm(nn.Module):
    """Wraps a model so that its batch-norm layers keep their statistics while it trains.

    The head of phase 1 was fitted to features normalised with the pretrained statistics; batch
    statistics of small augmented batches differ from them, and training with them cost 3-5
    points of CUB test accuracy. In eval mode the layers keep normalising with the pretrained
    statistics while their scale and shift still learn.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        super().train(mode)
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> logits ``[B, K]``."""
        return self.model(x)

    def parameter_groups(self, learning_rate: float, backbone_lr_scale: float) -> list[dict]:
        """The wrapped model's parameter groups."""
        return self.model.parameter_groups(learning_rate, backbone_lr_scale)


def fit_finetune(
    model: nn.Module,
    config: RunConfig,
    splits: DataSplits,
    preprocessing: Preprocessing,
    device: torch.device,
    run_dir: Path,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    freeze_batch_norm: bool = True,
    resume: bool = False,
    distributed: DistributedContext | None = None,
    identity: dict[str, Any] | None = None,
    member: int = 0,
    more_follows: bool = False,
    label: str | None = None,
) -> tuple[FitResult, PhaseReport]:
    """Phase 2: unfreeze everything and train with the generic trainer on augmented batches.

    Augmentation runs as batched tensor ops on the decoded uint8 images; the backbone learns at
    ``learning_rate * backbone_lr_scale`` and the schedule, warm-up and early stopping (only with
    a val split) come from ``config.train``. Under torchrun each process trains on its shard of
    every batch and DDP averages the gradients, as for any other model.

    Args:
        member: which member of an ensemble this fine-tunes (0 for a single model): its
            metrics and checkpoint go to :func:`finetune_folder` and its random streams start
            from ``train.seed + member``.
        more_follows: whether ensemble members follow this one (see :meth:`Trainer.fit`).
        label: what the run calls this fine-tune in its epoch lines (see :class:`Trainer`).

    Returns:
        The trainer's fit (best validation weights restored) and the phase's report.
    """
    model.unfreeze_backbone()
    distributed = distributed or DistributedContext()
    config = _member_config(config, member)
    folder = finetune_folder(member)
    train_loader, val_loader, _ = build_loaders(splits, config, preprocessing, device, distributed)
    loggers = [*(phase_loggers(run_dir, folder) if distributed.is_main else []), *callbacks]
    network = FrozenBatchNorm(model) if freeze_batch_norm else model
    trainer = Trainer(
        network,
        config.train,
        device,
        run_dir / folder,
        loggers,
        distributed,
        progress,
        identity,
        label=label,
    )
    fit = trainer.fit(train_loader, val_loader, resume=resume, more_follows=more_follows)
    report = PhaseReport.from_fit(
        folder,
        fit,
        val_loader is not None,
        seconds=fit.seconds,
        details={"stopped_early": fit.stopped_early},
    )
    return fit, report


def _member_config(config: RunConfig, member: int) -> RunConfig:
    """``config`` with the seed of ensemble member ``member`` (``train.seed + member``); the
    first member (and a single model) keeps the run's own."""
    if not member:
        return config
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, seed=config.train.seed + member)
    )


def refuse_a_resume_early(
    folder: Path, config: TrainConfig, identity: dict[str, Any] | None, grouped: bool
) -> None:
    """The checks :class:`Trainer` makes of ``folder``'s checkpoint on resume that need no
    model built (the data it trained on, its optimizer settings and epochs); nothing where
    there is no checkpoint (the fine-tune then starts fresh).

    Raises:
        CheckpointError: as the trainer would, naming what differs.
    """
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        return
    state = load_checkpoint(path)
    if identity is not None:
        check_identity(path, state.get("identity") or {}, identity)
    check_optimization_settings(path, state, optimization_settings(config, grouped))
    check_epochs(path, int(state["epoch"]), config.epochs)
