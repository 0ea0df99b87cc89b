"""The end of a training run: its kept weights scored on the test split in float32, the test
report, and the model file with the metadata that ``cnnkit evaluate`` and predict read back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cnnkit.config import Preprocessing, RunConfig
from cnnkit.data.dataset import DataSplits
from cnnkit.data.loader import BatchLoader
from cnnkit.evaluation.report import EvaluationReport, build_report, evaluated_block
from cnnkit.inference.artifact import ModelMetadata, holds_model, save_model
from cnnkit.models.registry import model_options
from cnnkit.training.phases import record_final_test
from cnnkit.training.run_folder import MODEL_NAME, clear_model_exports, data_roots
from cnnkit.training.trainer import FitResult, Trainer


def test_and_save(
    config: RunConfig,
    splits: DataSplits,
    preprocessing: Preprocessing,
    trainer: Trainer,
    test_loader: BatchLoader,
    fit: FitResult,
    transfer: bool,
    resumed: bool = False,
) -> tuple[EvaluationReport, Path]:
    """Score the trained model on the test split, write its report, and save the model file.

    Args:
        transfer: whether the model trained in phases: the last phase's test figures in
            ``phases.json`` are then filled in from the report.
        resumed: whether the run continued a checkpoint: the exports and reports of the model
            file it replaces are then removed first, unless that file holds the same weights
            and metadata (a fresh run's start cleared them, and only where the folder held a
            run: never a user's own ``model.onnx``).

    Returns:
        The test report and the saved model file's path.
    """
    run_dir = config.run_dir()
    with _float32_scoring(trainer):
        logits, labels = trainer.predict(test_loader, desc="testing")
    evaluated = _evaluated(config)
    report = build_report(
        logits,
        labels,
        splits.class_names,
        run_dir / "report",
        splits.test.images,
        evaluated=evaluated,
    )
    test_metrics = report.metrics
    if transfer:
        record_final_test(run_dir, test_metrics)
    metadata = ModelMetadata(
        architecture=config.model.name,
        class_names=tuple(splits.class_names),
        preprocessing=preprocessing,
        # All resolved options, so a later change of a default cannot break the file.
        options={**model_options(config.model.name), **config.model.options},
        training=_training_record(config, splits, fit, evaluated["data"], test_metrics),
    )
    if resumed and not holds_model(run_dir / MODEL_NAME, trainer.module, metadata):
        # A finished run resumed with nothing left to train keeps its exports.
        clear_model_exports(run_dir, keep=data_roots(config))
    model_path = save_model(run_dir / MODEL_NAME, trainer.module.cpu(), metadata)
    return report, model_path


def best_val_accuracy(fit: FitResult, splits: DataSplits) -> float | None:
    """The kept weights' validation accuracy; None without a validation split (the trainer
    then ranks epochs by training accuracy, which is no validation figure)."""
    return fit.best_val_accuracy if splits.val is not None else None


@contextlib.contextmanager
def _float32_scoring(trainer: Trainer) -> Iterator[None]:
    """Score in float32 while the block runs: no autocast (the bf16 or fp16 the run trained
    in) and no TensorFloat-32 matrix products (which CUDA training turns on). The saved model
    is then scored as ``cnnkit evaluate``, predict and the ONNX export run it, so the run's
    test figures are the ones its users get."""
    autocast_dtype, tf32 = trainer.autocast_dtype, torch.backends.cuda.matmul.allow_tf32
    trainer.autocast_dtype = None
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        trainer.autocast_dtype = autocast_dtype
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _evaluated(config: RunConfig) -> dict[str, Any]:
    """The report's ``evaluated`` block: the model file, and the data and split it was scored
    on, named as ``cnnkit evaluate`` names them."""
    data = config.data
    # With train_on_all the "test" images were trained on too: say so.
    split = "test (also trained on)" if data.train_on_all else "test"
    # The limits that chose the test images, named only when set, as evaluate names them.
    limits = {"max_classes": data.max_classes, "max_per_class": data.max_per_class}
    return evaluated_block(
        config.run_dir() / MODEL_NAME,
        config.model.name,
        data.dataset,
        data.data,
        data.fold,
        split,
        **{key: value for key, value in limits.items() if value is not None},
    )


def _training_record(
    config: RunConfig,
    splits: DataSplits,
    fit: FitResult,
    resolved_data: Any,
    test_metrics: dict[str, float],
) -> dict[str, Any]:
    """The model file's ``training`` metadata: what it trained on and how well it did."""
    data = config.data
    return {
        "dataset": data.dataset,
        # The data it came from and what drew the seeded test split, so that evaluate
        # draws the same split from the same data.
        "data": resolved_data,
        "fold": data.fold,
        "data_seed": data.seed,
        "test_fraction": data.test_fraction,
        # Which of its training images int8 calibration reads (not its validation share).
        "val_fraction": data.val_fraction,
        "max_classes": data.max_classes,
        "max_per_class": data.max_per_class,
        "crop_to_bbox": data.crop_to_bbox,
        "on_bad_image": data.on_bad_image,
        "train_on_all": data.train_on_all,
        "epochs_run": fit.epochs_run,
        "best_val_accuracy": best_val_accuracy(fit, splits),
        "test_top1": test_metrics.get("top1"),
        "test_top5": test_metrics.get("top5"),
    }
