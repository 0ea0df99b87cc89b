"""Two-phase transfer learning: a head trained on cached frozen features, then a fine-tune.

Phase ``frozen`` computes the backbone's features once per image view (see
:mod:`cnnkit.training.features`) and trains only the head on them, in seconds. Phase
``finetune`` unfreezes the backbone and trains every layer, the backbone at a lower learning
rate. Both phases run the generic :class:`~cnnkit.training.trainer.Trainer`; each writes its
metrics into ``RUN_DIR/<phase>/metrics.csv`` and ``RUN_DIR/tensorboard`` (``<phase>/`` tags),
and ``RUN_DIR/phases.json`` records every phase's validation and test figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit.atomic import write_atomically
from cnnkit.config import Preprocessing, RunConfig, TrainConfig
from cnnkit.data.dataset import DataSplits, ImageSet
from cnnkit.data.loader import BatchLoader, build_loaders
from cnnkit.evaluation.metrics import topk_accuracy
from cnnkit.models.transfer import TransferEnsemble
from cnnkit.paths import finetune_folder
from cnnkit.runtime import DistributedContext, cpu_supports_bf16, main_process_first
from cnnkit.training.callbacks import CsvLogger, TensorBoardLogger, write_metrics_csv
from cnnkit.training.checkpoint import (
    CHECKPOINT_NAME,
    check_epochs,
    check_identity,
    check_optimization_settings,
    load_checkpoint,
    optimization_settings,
)
from cnnkit.training.features import FeatureCache, FeatureExtractor, FeatureSource, digest_module
from cnnkit.training.trainer import Callback, FitResult, Trainer, TrainingInterrupted

logger = logging.getLogger(__name__)
PHASES_NAME = "phases.json"
FEATURES_FOLDER = "features"


@dataclass
class PhaseReport:
    """What one phase achieved (``None`` where there is no val split or no test score yet).

    Attributes:
        name: ``frozen`` or ``finetune``.
        epochs_run: epochs the phase trained.
        kept_epoch: the epoch whose weights the phase kept (the best on validation, or the last).
        val_accuracy: validation top-1 of the kept weights.
        test_top1, test_top5: test accuracy of the kept weights.
        seconds: the phase's wall time.
        details: timings and counts specific to the phase.
    """

    name: str
    epochs_run: int
    kept_epoch: int
    val_accuracy: float | None
    test_top1: float | None = None
    test_top5: float | None = None
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_fit(cls, name: str, fit: FitResult, has_val: bool, **fields: Any) -> PhaseReport:
        """The report of a trainer's fit; without a val split the last epoch is the one kept."""
        if has_val:
            return cls(name, fit.epochs_run, fit.best_epoch, fit.best_val_accuracy, **fields)
        return cls(name, fit.epochs_run, fit.epochs_run, None, **fields)


class FeatureHead(nn.Module):
    """A transfer model's head applied to cached features stored as ``[B, F, 1, 1]``.

    It shares the model's head modules, so training it trains the model's head.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.dense = model.dense
        self.classifier = model.classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, F, 1, 1]`` (or ``[B, F]``) -> logits ``[B, K]``."""
        return self.classifier(self.dense(features.flatten(1)))


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


def feature_set(features: np.ndarray, labels: np.ndarray, class_names: list[str]) -> ImageSet:
    """Feature vectors ``[N, F]`` as an image set of 1x1 images ``[N, F, 1, 1]``.

    The loader and the trainer handle 4-D arrays, so this shape lets both serve the head.
    """
    array = np.ascontiguousarray(features, dtype=np.float32)[:, :, None, None]
    return ImageSet(array, np.asarray(labels, dtype=np.int64), class_names)


def _as_float(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return batch.float()


def fit_head(
    model: nn.Module,
    config: RunConfig,
    train_set: ImageSet,
    val_set: ImageSet | None,
    device: torch.device,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
) -> tuple[FitResult, Trainer]:
    """Train ``model``'s head on feature vectors with the generic trainer.

    AdamW (``config.train.optimizer``) for ``transfer.head_epochs`` epochs at
    ``transfer.head_learning_rate`` with the run's schedule, warm-up, weight decay and label
    smoothing; the epoch with the best validation accuracy is kept when ``val_set`` is given.

    Args:
        model: a transfer model whose ``dense`` and ``classifier`` form the head.
        config: the run configuration.
        train_set, val_set: features as 1x1 images ``[N, F, 1, 1]`` (see :func:`feature_set`).
        device: where to train.
        callbacks: trainer hooks (metrics loggers).

    Returns:
        The fit and the trainer (to score more features with ``trainer.predict``).
    """
    head_config = dataclasses.replace(
        config.train,
        epochs=config.transfer.head_epochs,
        learning_rate=config.transfer.head_learning_rate,
        early_stopping_patience=None,
        max_steps_per_epoch=None,
        channels_last=False,
        bf16_cpu=False,
        ema_decay=0.0,  # Sized for the fine-tune's steps; the head fits in seconds anyway.
        micro_batch_size=None,  # Cached feature vectors are small: no need to split batches.
    )
    train_loader = BatchLoader(
        train_set,
        head_config.batch_size,
        _as_float,
        shuffle=True,
        drop_last=len(train_set) > head_config.batch_size,
        device=device,
        seed=config.train.seed,
    )
    val_loader = None
    if val_set is not None:
        val_loader = BatchLoader(val_set, head_config.eval_batch_size, _as_float, device=device)
    # An epoch takes milliseconds, so a progress bar per epoch would only be noise.
    trainer = Trainer(FeatureHead(model), head_config, device, None, callbacks, progress=False)
    return trainer.fit(train_loader, val_loader), trainer


def fit_frozen_head(
    model: nn.Module,
    config: RunConfig,
    splits: DataSplits,
    preprocessing: Preprocessing,
    device: torch.device,
    run_dir: Path,
    progress: bool = True,
    feature_cache_dir: str | Path | None = None,
    distributed: DistributedContext | None = None,
) -> tuple[FitResult, PhaseReport]:
    """Phase 1: freeze the backbone and train the head on cached features.

    The training set is every training image's centre crop plus ``augmented_views`` augmented
    views of it (none with augmentation off: each would be the centre crop again); the head
    with the best validation accuracy is kept when there is a val split.
    Under torchrun rank 0 computes and caches the features first and the other ranks read them;
    every rank then fits the same seeded head (the fine-tune's DDP starts from rank 0's anyway).

    Returns:
        The head trainer's fit and the phase's report (validation and test figures).
    """
    start = time.perf_counter()
    distributed = distributed or DistributedContext()
    model.freeze_backbone()
    model.to(device).eval()
    source = FeatureSource(
        config.model.name,
        digest_module(getattr(model, "backbone", model)),
        preprocessing,
        config.train.bf16_cpu and device.type == "cpu" and cpu_supports_bf16(),
    )
    cache = FeatureCache(feature_cache_dir or run_dir / FEATURES_FOLDER)
    frozen = FeatureExtractor(model, source, cache, device, progress and distributed.is_main)
    with main_process_first(distributed):
        train_views = frozen.views(
            splits.train.images,
            config.transfer.augmented_views if config.augment.enabled else 0,
            config.augment,
            config.train.seed,
        )
        val_features = frozen.views(splits.val.images)[0] if splits.val is not None else None
        (test_features,) = frozen.views(splits.test.images)
    extraction_seconds = time.perf_counter() - start
    train_labels = np.tile(splits.train.labels, len(train_views))
    train_set = feature_set(np.concatenate(train_views), train_labels, splits.class_names)
    val_set = None
    if splits.val is not None:
        val_set = feature_set(val_features, splits.val.labels, splits.class_names)

    loggers = _phase_loggers(run_dir, "frozen") if distributed.is_main else []
    fit, trainer = fit_head(model, config, train_set, val_set, device, loggers)
    test_set = feature_set(test_features, splits.test.labels, splits.class_names)
    logits, labels = trainer.predict(BatchLoader(test_set, 4096, _as_float, device=device))
    test_top1, test_top5 = topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)
    report = PhaseReport.from_fit(
        "frozen",
        fit,
        val_set is not None,
        test_top1=test_top1,
        test_top5=test_top5,
        seconds=time.perf_counter() - start,
        details={
            "feature_seconds": extraction_seconds,
            "head_seconds": fit.seconds,
            "views_computed": frozen.computed,
            "views_from_cache": frozen.reused,
            "train_vectors": len(train_set),
        },
    )
    logger.info(
        "frozen phase: val %s, test top-1 %.4f (%.0f s, %.0f s of it features)",
        report.val_accuracy,
        test_top1,
        report.seconds,
        extraction_seconds,
    )
    return fit, report


def _phase_loggers(run_dir: Path, phase: str) -> list[Callback]:
    return [
        CsvLogger(run_dir / phase / "metrics.csv"),
        TensorBoardLogger(run_dir / "tensorboard", prefix=f"{phase}/"),
    ]


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

    Returns:
        The trainer's fit (best validation weights restored) and the phase's report.
    """
    model.unfreeze_backbone()
    distributed = distributed or DistributedContext()
    if member:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, seed=config.train.seed + member)
        )
    folder = finetune_folder(member)
    train_loader, val_loader, _ = build_loaders(splits, config, preprocessing, device, distributed)
    loggers = [*(_phase_loggers(run_dir, folder) if distributed.is_main else []), *callbacks]
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


# The history tag of the frozen phase; fine-tune phases are tagged 2.0 and on.
FROZEN_PHASE = 1.0


def phase_label(tag: float) -> str:
    """How a history row's ``phase`` tag reads: 1 frozen, 2 fine-tune, 3 on each further
    ensemble member's fine-tune."""
    if tag == FROZEN_PHASE:
        return "frozen"
    return "fine-tune" if tag == 2.0 else f"fine-tune {int(tag) - 1}"


def _combine(fits: list[tuple[float, FitResult]], seconds: float) -> FitResult:
    """One FitResult over the phases: epochs numbered on, each row tagged with its phase."""
    history: list[dict[str, float]] = []
    for phase, fit in fits:
        offset = len(history)
        history += [{**row, "epoch": offset + row["epoch"], "phase": phase} for row in fit.history]
    last_offset = len(history) - fits[-1][1].epochs_run
    last = fits[-1][1]
    return FitResult(
        history=history,
        best_epoch=last_offset + last.best_epoch,
        best_val_accuracy=last.best_val_accuracy,
        epochs_run=len(history),
        stopped_early=last.stopped_early,
        seconds=seconds,
    )


def save_phase_reports(run_dir: Path, reports: list[PhaseReport]) -> Path:
    """Write ``RUN_DIR/phases.json`` (one entry per phase, in order) atomically."""
    payload = {"phases": [dataclasses.asdict(report) for report in reports]}
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    path = Path(run_dir) / PHASES_NAME
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return path


def record_final_test(run_dir: Path, test_metrics: dict[str, float]) -> None:
    """Fill in the last phase's test figures in ``phases.json`` from the run's test report.

    The run scores the final model on the test split anyway; this saves scoring it twice.
    """
    path = Path(run_dir) / PHASES_NAME
    if not path.exists() or "top1" not in test_metrics:
        return
    payload = json.loads(path.read_text(encoding="utf-8"))
    last = payload["phases"][-1]
    last["test_top1"] = float(test_metrics["top1"])
    last["test_top5"] = float(test_metrics["top5"]) if "top5" in test_metrics else None
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _score_ensemble(
    model: TransferEnsemble,
    config: RunConfig,
    splits: DataSplits,
    preprocessing: Preprocessing,
    device: torch.device,
    distributed: DistributedContext,
) -> PhaseReport:
    """The ensemble's entry in ``phases.json``: its validation accuracy where there is a val
    split (the run's test figures are filled in by :func:`record_final_test`)."""
    start = time.perf_counter()
    _, val_loader, _ = build_loaders(splits, config, preprocessing, device, distributed)
    val_accuracy = None
    if val_loader is not None:
        scorer = Trainer(model, config.train, device, None, (), distributed, progress=False)
        val_accuracy = scorer.evaluate(val_loader)["accuracy"]
    return PhaseReport(
        "ensemble",
        0,
        0,
        val_accuracy,
        seconds=time.perf_counter() - start,
        details={"members": len(model.members)},
    )


def fit_transfer(
    model: nn.Module,
    config: RunConfig,
    splits: DataSplits,
    preprocessing: Preprocessing,
    device: torch.device,
    run_dir: Path,
    progress: bool = True,
    feature_cache_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    freeze_batch_norm: bool = True,
    resume: bool = False,
    distributed: DistributedContext | None = None,
    identity: dict[str, Any] | None = None,
) -> FitResult:
    """Run the phases of ``config.transfer.phases`` on a model with a freezable backbone.

    Args:
        model: a transfer model (``freeze_backbone``, ``unfreeze_backbone``, ``dense`` and
            ``classifier`` head modules, ``forward_features``).
        config: the run configuration; ``transfer`` picks the phases and head settings,
            ``train`` drives the fine-tune.
        splits: decoded train/val/test images.
        preprocessing: the model's input preprocessing.
        device: where to train.
        run_dir: receives ``phases.json``, ``metrics.csv`` and per-phase folders.
        progress: show progress bars.
        feature_cache_dir: where frozen features are cached (default ``RUN_DIR/features``).
        callbacks: extra hooks for the fine-tune trainer (for example a search pruner).
        freeze_batch_norm: keep the batch-norm statistics during the fine-tune (see
            :class:`FrozenBatchNorm`); on CUB this beat training them by 3-5 points.
        resume: continue an interrupted fine-tune from ``RUN_DIR/finetune/checkpoint.pt``.
            The frozen phase runs again first: its features come from the cache and its
            seeded head equals the first run's, and the checkpoint then replaces all weights.
        distributed: rank information under torchrun (only rank 0 writes files).
        identity: what the run trains on, checked on resume (see :class:`Trainer`).

    Returns:
        The phases' combined fit; the model is left with the last phase's best weights.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    distributed = distributed or DistributedContext()
    phases = config.transfer.phases
    fits: list[tuple[float, FitResult]] = []
    reports: list[PhaseReport] = []
    members = list(model.members) if isinstance(model, TransferEnsemble) else [model]
    if resume and "finetune" in phases:
        # What the fine-tune's trainer would refuse, refused before the frozen phase rewrites
        # phases.json and its logs: a refused resume leaves the earlier run as it was.
        grouped = hasattr(members[0], "parameter_groups")
        refuse_a_resume_early(run_dir / finetune_folder(0), config.train, identity, grouped)
    if "frozen" in phases:
        fit, report = fit_frozen_head(
            model,
            config,
            splits,
            preprocessing,
            device,
            run_dir,
            progress,
            feature_cache_dir,
            distributed,
        )
        fits.append((FROZEN_PHASE, fit))
        reports.append(report)
        if distributed.is_main:
            save_phase_reports(run_dir, reports)
    if len(members) > 1:
        model.share_first()  # Every member starts from the frozen phase's head.
    if "finetune" in phases:
        for index, member in enumerate(members):
            try:
                fit, report = fit_finetune(
                    member,
                    config,
                    splits,
                    preprocessing,
                    device,
                    run_dir,
                    progress,
                    callbacks,
                    freeze_batch_norm,
                    resume,
                    distributed,
                    identity,
                    member=index,
                    more_follows=index + 1 < len(members),
                )
            except TrainingInterrupted as interrupted:
                if len(members) == 1:
                    raise
                # Before its first epoch's checkpoint a member has none, but --resume goes
                # on from the earlier members' (they are trained again from theirs).
                first = run_dir / finetune_folder(0) / CHECKPOINT_NAME
                checkpoint = interrupted.checkpoint or (first if first.is_file() else None)
                raise TrainingInterrupted(
                    interrupted.epochs_completed, checkpoint, phase_label(2.0 + index)
                ) from None
            fits.append((2.0 + index, fit))
            reports.append(report)
            if distributed.is_main:
                save_phase_reports(run_dir, reports)
    ensemble = None
    if len(members) > 1:
        ensemble = _score_ensemble(model, config, splits, preprocessing, device, distributed)
        reports.append(ensemble)
        if distributed.is_main:
            save_phase_reports(run_dir, reports)
    result = _combine(fits, time.perf_counter() - start)
    if ensemble is not None:
        # What the run kept is the ensemble, not the last member: its figures are the run's.
        result = dataclasses.replace(
            result, best_epoch=result.epochs_run, best_val_accuracy=ensemble.val_accuracy
        )
    if distributed.is_main:
        write_metrics_csv(run_dir / "metrics.csv", result.history)
    return result
