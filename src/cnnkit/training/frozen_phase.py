"""Phase ``frozen`` of transfer learning: the backbone frozen, its features computed once per
image view and cached (see :mod:`cnnkit.training.features`), and only the head trained on them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.config import Preprocessing, RunConfig
from cnnkit.data.dataset import DataSplits, ImageSet
from cnnkit.data.loader import BatchLoader
from cnnkit.evaluation.metrics import topk_accuracy
from cnnkit.runtime import DistributedContext, cpu_supports_bf16, main_process_first
from cnnkit.training.features import FeatureCache, FeatureExtractor, FeatureSource, digest_module
from cnnkit.training.phases import PhaseReport, phase_loggers
from cnnkit.training.trainer import Callback, FitResult, Trainer

logger = logging.getLogger(__name__)
FEATURES_FOLDER = "features"


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
    cache_dir = feature_cache_dir or run_dir / FEATURES_FOLDER
    show_progress = progress and distributed.is_main
    frozen = _frozen_extractor(model, config, preprocessing, device, cache_dir, show_progress)
    with main_process_first(distributed):
        train_views, val_features, test_features = _extract_views(frozen, config, splits)
    extraction_seconds = time.perf_counter() - start
    train_set, val_set = _feature_sets(splits, train_views, val_features)
    loggers = phase_loggers(run_dir, "frozen") if distributed.is_main else []
    fit, trainer = fit_head(model, config, train_set, val_set, device, loggers)
    test_top1, test_top5 = _test_accuracy(trainer, test_features, splits, device)
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


def _frozen_extractor(
    model: nn.Module,
    config: RunConfig,
    preprocessing: Preprocessing,
    device: torch.device,
    cache_dir: str | Path,
    progress: bool,
) -> FeatureExtractor:
    """Freeze ``model``'s backbone and set up its feature extractor over the cache in
    ``cache_dir``; the cache keys name the backbone's weights and the preprocessing."""
    model.freeze_backbone()
    model.to(device).eval()
    source = FeatureSource(
        config.model.name,
        digest_module(getattr(model, "backbone", model)),
        preprocessing,
        config.train.bf16_cpu and device.type == "cpu" and cpu_supports_bf16(),
    )
    cache = FeatureCache(cache_dir)
    return FeatureExtractor(model, source, cache, device, progress)


def _extract_views(
    frozen: FeatureExtractor, config: RunConfig, splits: DataSplits
) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray]:
    """The training images' views (the centre crop, then the augmented ones), and the centre
    crops of the val (None without a val split) and test images, as features ``[N, F]``."""
    train_views = frozen.views(
        splits.train.images,
        config.transfer.augmented_views if config.augment.enabled else 0,
        config.augment,
        config.train.seed,
    )
    val_features = frozen.views(splits.val.images)[0] if splits.val is not None else None
    (test_features,) = frozen.views(splits.test.images)
    return train_views, val_features, test_features


def _feature_sets(
    splits: DataSplits, train_views: list[np.ndarray], val_features: np.ndarray | None
) -> tuple[ImageSet, ImageSet | None]:
    """The head's training set (every view of every training image, with its label) and its
    validation set (None without a val split)."""
    train_labels = np.tile(splits.train.labels, len(train_views))
    train_set = feature_set(np.concatenate(train_views), train_labels, splits.class_names)
    val_set = None
    if splits.val is not None:
        val_set = feature_set(val_features, splits.val.labels, splits.class_names)
    return train_set, val_set


def _test_accuracy(
    trainer: Trainer, test_features: np.ndarray, splits: DataSplits, device: torch.device
) -> tuple[float, float]:
    """The trained head's test top-1 and top-5 accuracy on the test images' features."""
    test_set = feature_set(test_features, splits.test.labels, splits.class_names)
    logits, labels = trainer.predict(BatchLoader(test_set, 4096, _as_float, device=device))
    return topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)
