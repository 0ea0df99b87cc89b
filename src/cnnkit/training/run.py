"""One training run from a RunConfig: data -> model -> Trainer.fit -> test report -> model file.

This is the single training function; the CLI, the demo and hyperparameter search all call
:func:`train_run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnkit.config import Preprocessing, RunConfig
from cnnkit.data.dataset import DataSplits
from cnnkit.data.loader import BatchLoader, build_loaders
from cnnkit.data.sources import LoadedData, build_splits
from cnnkit.evaluation.report import EvaluationReport, NonFiniteOutputError
from cnnkit.models.registry import create_model
from cnnkit.paths import CHECKPOINT_NAME, is_search_folder, refuse_unusable_folder
from cnnkit.runtime import (
    DistributedContext,
    main_process_first,
    seed_everything,
    select_device,
    tune_cuda_for_training,
)
from cnnkit.training.callbacks import CsvLogger, TensorBoardLogger
from cnnkit.training.final_model import test_and_save
from cnnkit.training.identity import run_identity
from cnnkit.training.preprocessing import resolve_preprocessing
from cnnkit.training.run_folder import MODEL_NAME, find_checkpoint, refuse_run_dir_beside_data
from cnnkit.training.run_status import start_run, write_ended, write_finished
from cnnkit.training.trainer import (
    Callback,
    FitResult,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
)


@dataclass
class RunResult:
    """What a training run produced."""

    run_dir: Path
    model_path: Path | None
    fit: FitResult
    test_metrics: dict[str, float]
    report: EvaluationReport | None
    data_description: str
    seconds: dict[str, float] = field(default_factory=dict)


def feature_cache_dir(cache_dir: str | Path | None) -> Path | None:
    """Where a run with decoded-image cache ``cache_dir`` caches frozen-phase features (None:
    the run folder's own ``features``)."""
    return Path(cache_dir) / "features" if cache_dir is not None else None


def _load_data(
    config: RunConfig,
    preprocessing: Preprocessing,
    cache_dir: str | Path | None,
    progress: bool,
    distributed: DistributedContext,
) -> LoadedData:
    """Rank 0 decodes (and caches) first; the other ranks then read its cache."""
    with main_process_first(distributed):
        return build_splits(config.data, preprocessing, cache_dir, progress and distributed.is_main)


@dataclass(frozen=True)
class _RunInputs:
    """What a run's training and its final test share: its settings, data, preprocessing,
    device and ranks, and whether to show progress bars."""

    config: RunConfig
    splits: DataSplits
    preprocessing: Preprocessing
    device: torch.device
    distributed: DistributedContext
    progress: bool


def _fit(
    model: torch.nn.Module,
    inputs: _RunInputs,
    loaders: tuple[BatchLoader, BatchLoader | None],
    callbacks: Sequence[Callback],
    resume: bool,
    cache_dir: str | Path | None = None,
) -> tuple[FitResult, Trainer, bool]:
    """Train ``model`` (both transfer phases for a pretrained one); returns the fit, a trainer
    holding the kept weights, and whether the model was a transfer model. A transfer model's
    frozen-phase features are cached under ``cache_dir/features`` (their keys name the images,
    backbone, preprocessing and view, so later runs and search trials reuse them), else in the
    run folder."""
    config, device, distributed = inputs.config, inputs.device, inputs.distributed
    run_dir = config.run_dir()
    train_loader, val_loader = loaders
    # A checkpoint of a run on other classes or splits must not be resumed into this one.
    identity = run_identity(config, inputs.splits)
    if hasattr(model, "freeze_backbone"):
        from cnnkit.training.transfer import fit_transfer

        fit = fit_transfer(
            model,
            config,
            inputs.splits,
            inputs.preprocessing,
            device,
            run_dir,
            inputs.progress,
            feature_cache_dir=feature_cache_dir(cache_dir),
            callbacks=callbacks,
            resume=resume,
            distributed=distributed,
            identity=identity,
        )
        kept = Trainer(model, config.train, device, None, (), distributed, inputs.progress)
        return fit, kept, True
    loggers: list[Callback] = []
    if distributed.is_main:
        loggers = [CsvLogger(run_dir / "metrics.csv"), TensorBoardLogger(run_dir / "tensorboard")]
    hooks = [*loggers, *callbacks]
    trainer = Trainer(
        model, config.train, device, run_dir, hooks, distributed, inputs.progress, identity
    )
    return trainer.fit(train_loader, val_loader, resume=resume), trainer, False


def train_run(
    config: RunConfig,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
    distributed: DistributedContext | None = None,
    data: LoadedData | None = None,
    on_data: Callable[[LoadedData], None] | None = None,
) -> RunResult:
    """Train, evaluate on the test split, and save the model file into the run folder.

    Args:
        config: the resolved run configuration.
        resume: continue from ``RUN_DIR/checkpoint.pt`` if it exists.
        cache_dir: decoded-image cache root (``None``: no cache).
        progress: show progress bars.
        callbacks: extra trainer hooks (for example a search pruner).
        distributed: rank information under torchrun.
        data: already-loaded splits (search reuses them across trials).
        on_data: called with the loaded data before training (the CLI reports on it).
    """
    distributed = distributed or DistributedContext()
    run_dir = config.run_dir()
    _refuse_run_dir(run_dir, config)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    seed_everything(config.train.seed)
    preprocessing = resolve_preprocessing(config)
    if data is None:
        data = _load_data(config, preprocessing, cache_dir, progress, distributed)
    if on_data is not None:
        on_data(data)
    timings["data"] = time.perf_counter() - start
    splits = data.splits
    _refuse_one_class(splits)
    device = _training_device(config, distributed)
    model = _create_model(config, splits, preprocessing)
    loaders = build_loaders(splits, config, preprocessing, device, distributed)
    inputs = _RunInputs(config, splits, preprocessing, device, distributed, progress)
    started, callbacks = start_run(config, data, resume, distributed, callbacks)
    try:
        fit, report, model_path = _train_test_and_save(
            model, inputs, loaders, callbacks, (resume, started.resuming), cache_dir, timings
        )
        if distributed.is_main:
            timings["total"] = time.perf_counter() - start
            write_finished(config, splits, timings, fit, report.metrics)
    except (TrainingInterrupted, TrainingDiverged, KeyboardInterrupt, Exception) as error:
        # A stop (Ctrl-C, divergence) or any other error ends the run: run.json says how.
        if distributed.is_main and started.written:
            write_ended(config, splits, error)
        raise
    if distributed.enabled:
        # Every rank waits for rank 0's model file, so the process group ends together.
        torch.distributed.barrier()
    test_metrics = report.metrics if report is not None else {}
    return RunResult(run_dir, model_path, fit, test_metrics, report, splits.description, timings)


def _create_model(
    config: RunConfig, splits: DataSplits, preprocessing: Preprocessing
) -> torch.nn.Module:
    """The run's model, with pretrained weights where it has them; building it draws its
    initial weights from the seeded random streams."""
    return create_model(
        config.model.name,
        splits.num_classes,
        preprocessing.channels,
        pretrained=True,
        **config.model.options,
    )


def _train_test_and_save(
    model: torch.nn.Module,
    inputs: _RunInputs,
    loaders: tuple[BatchLoader, BatchLoader | None, BatchLoader],
    callbacks: Sequence[Callback],
    resume: tuple[bool, bool],
    cache_dir: str | Path | None,
    timings: dict[str, float],
) -> tuple[FitResult, EvaluationReport | None, Path | None]:
    """Train ``model``, then (on rank 0 alone) score it on the test split and save its model
    file; the training time goes into ``timings``. ``resume``: whether ``--resume`` was given,
    and whether there is a checkpoint to resume (whose run's model file this one replaces).

    Returns:
        The fit, and the test report and model file (None on the other ranks).
    """
    train_loader, val_loader, test_loader = loaders
    config, splits, preprocessing = inputs.config, inputs.splits, inputs.preprocessing
    try:
        fit, trainer, transfer = _fit(
            model, inputs, (train_loader, val_loader), callbacks, resume[0], cache_dir
        )
    except KeyboardInterrupt:
        # Ctrl-C outside an epoch (the epochs' own stops name their epoch): while the trainer
        # or a transfer run's features were set up, or the kept weights chosen after the last.
        raise _interrupted(config, "before training finished") from None
    timings["train"] = fit.seconds
    if not inputs.distributed.is_main:
        return fit, None, None
    try:
        report, model_path = test_and_save(
            config, splits, preprocessing, trainer, test_loader, fit, transfer, resume[1]
        )
    except KeyboardInterrupt:
        # The last checkpoint holds every epoch: --resume tests and saves the model.
        raise _interrupted(
            config, "after training, before the model was saved", fit.epochs_run
        ) from None
    except NonFiniteOutputError as error:
        # Recorded as the run's divergence (run.json), not as a failure of the tool.
        raise TrainingDiverged(str(error)) from None
    return fit, report, model_path


def _interrupted(config: RunConfig, when: str, epochs: int = 0) -> TrainingInterrupted:
    """The stop of a run interrupted ``when`` (outside an epoch), naming its checkpoint (one
    of an earlier epoch or run, where there is one) for ``--resume``."""
    return TrainingInterrupted(epochs, find_checkpoint(config.run_dir()), when=when)


def _refuse_run_dir(run_dir: Path, config: RunConfig) -> None:
    """Refuse a run folder that holds a search, lies inside the folder data it would train on,
    looks like an image dataset of its own, or cannot be written, before anything is loaded."""
    if is_search_folder(run_dir):
        raise ValueError(f"{run_dir} holds a search, not a training run: pass another --out")
    refuse_run_dir_beside_data(run_dir, config)
    refuse_unusable_folder(run_dir, f"--out {run_dir}", needs="a run")
    for name in (MODEL_NAME, CHECKPOINT_NAME):
        if (run_dir / name).is_dir():  # Else found only when the trained model is saved.
            raise ValueError(
                f"{run_dir / name} is a folder where the run writes its {name} file: move it "
                "away, or pass another --out"
            )


def _refuse_one_class(splits: DataSplits) -> None:
    """Refuse data of fewer than 2 classes: every prediction would be right, nothing learned."""
    if splits.num_classes < 2:
        raise ValueError(
            f"{splits.description}: a classifier needs at least 2 classes; this data has "
            f"{splits.num_classes}"
        )


def _training_device(config: RunConfig, distributed: DistributedContext) -> torch.device:
    """The device ``train.device`` names, this process's own GPU under torchrun, with CUDA
    tuned for training."""
    device = select_device(config.train.device)
    if device.type == "cuda" and distributed.enabled:
        device = torch.device("cuda", distributed.local_rank)
    if device.type == "cuda":
        tune_cuda_for_training()
    return device
