"""One training run from a RunConfig: data -> model -> Trainer.fit -> test report -> model file.

This is the single training function; the CLI, the demo and hyperparameter search all call
:func:`train_run`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnkit.config import (
    Preprocessing,
    RunConfig,
    TransferConfig,
    config_to_dict,
)
from cnnkit.data.dataset import DataSplits
from cnnkit.data.loader import BatchLoader, build_loaders
from cnnkit.data.sources import LoadedData, build_splits
from cnnkit.errors import error_line
from cnnkit.evaluation.report import EvaluationReport, build_report, evaluated_block, resolved
from cnnkit.inference.artifact import ModelMetadata, save_model
from cnnkit.models.registry import create_model, create_model_outline, model_options
from cnnkit.paths import is_search_folder, refuse_unusable_folder
from cnnkit.runtime import (
    DistributedContext,
    main_process_first,
    seed_everything,
    select_device,
    tune_cuda_for_training,
)
from cnnkit.training.callbacks import CsvLogger, TensorBoardLogger
from cnnkit.training.checkpoint import COPIES_KEY, SPLIT_KEY, SPLIT_SETTINGS_KEY
from cnnkit.training.memory import GIB, available_memory
from cnnkit.training.run_folder import (
    MODEL_NAME,
    clear_run_outputs,
    data_roots,
    find_checkpoint,
    refuse_run_dir_inside_folder_data,
    with_model_defaults,
    write_run_info,
)
from cnnkit.training.trainer import (
    Callback,
    FitResult,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
)

logger = logging.getLogger(__name__)


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


def resolve_preprocessing(config: RunConfig) -> Preprocessing:
    """The model's own preprocessing, adapted to the requested channels and size for symbols.

    Raises:
        ValueError: if ``augment.train_size`` asks for training crops the model cannot take.
    """
    # One member stands for an ensemble (they all take the same input); a bad count still fails.
    options = dict(config.model.options)
    if isinstance(options.get("members"), int) and options["members"] > 1:
        options["members"] = 1
    # First on the meta device, where options however large (hidden=1e9) claim no memory.
    name, channels = config.model.name, config.data.channels
    _check_weights_fit(create_model_outline(name, 2, channels, **options), name)
    # Then for real, as runs have always built it: its initialisation draws from the seeded
    # random streams, so leaving it out would change every run's weights and batch order.
    probe = create_model(name, 2, channels, **options)
    preprocessing: Preprocessing = probe.default_preprocessing
    if preprocessing.mode != "photo":
        channels, size = config.data.channels, config.data.image_size
        preprocessing = Preprocessing(
            "symbol",
            channels,
            size,
            config.data.stored_size or size,
            (preprocessing.mean[0],) * channels,
            (preprocessing.std[0],) * channels,
        )
        _check_input_size(probe, config.model.name, preprocessing)
    _check_train_size(probe, config, preprocessing)
    _check_phases(probe, config)
    return preprocessing


def _check_weights_fit(model: torch.nn.Module, name: str) -> None:
    """Refuse options whose weights alone would not fit in the free memory, before the model
    is built for real (where the allocation would fail with a traceback, or the system would
    stop the process)."""
    weight_bytes = 4 * sum(parameter.numel() for parameter in model.parameters())
    available = available_memory(torch.device("cpu"), needed=weight_bytes)
    if available is not None and weight_bytes > available:
        raise ValueError(
            f"{name} with these options has {weight_bytes // 4:,} weights "
            f"({weight_bytes / GIB:.1f} GiB as float32), more than the {available / GIB:.1f} GiB "
            "of free memory: use smaller options"
        )


def _takes_size(model: torch.nn.Module, channels: int, size: int) -> bool:
    """Whether the model's layers take ``size`` px inputs (a dense layer is sized for one)."""
    device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, size, size, device=device))
    except RuntimeError:
        return False
    return True


def _check_input_size(model: torch.nn.Module, name: str, preprocessing: Preprocessing) -> None:
    """Refuse an input size the model's layers cannot take (``book_cnn``'s dense layer is sized
    by its ``image_size`` option, which the CLI sets from ``data.image_size``), before any data
    is loaded or an earlier run in the folder is cleared."""
    size = preprocessing.image_size
    if not _takes_size(model, preprocessing.channels, size):
        hint = (
            f"give it the size too (model.options.image_size: {size}), or use"
            if "image_size" in model_options(name)
            else "use fewer stages or pooling steps, or"
        )
        default = getattr(model, "default_preprocessing", preprocessing).image_size
        raise ValueError(
            f"{name} cannot take {size} px inputs with these options: {hint} data.image_size "
            f"{default}"
        )


def _check_phases(model: torch.nn.Module, config: RunConfig) -> None:
    """Refuse ``transfer.phases`` other than the default for a model without a pretrained
    backbone (it trains in one phase), before any data is loaded."""
    members = config.model.options.get("members", 1)
    if members != 1 and "finetune" not in config.transfer.phases:
        raise ValueError(
            f"--phases {','.join(config.transfer.phases)} with members={members}: the members of "
            "an ensemble differ only by their fine-tunes, so it needs the finetune phase"
        )
    if hasattr(model, "freeze_backbone") or config.transfer.phases == TransferConfig().phases:
        return
    raise ValueError(
        f"--phases {','.join(config.transfer.phases)}: {config.model.name} has no pretrained "
        "backbone and trains in one phase; phases apply to the efficientnet_lite models"
    )


def _check_train_size(model: torch.nn.Module, config: RunConfig, preprocessing) -> None:
    """Refuse training crops of ``augment.train_size`` that the model's layers cannot take (a
    dense layer sized for one input), before any data is loaded."""
    size = config.augment.train_size
    if not config.augment.enabled or size is None or size == preprocessing.image_size:
        return
    if not _takes_size(model, preprocessing.channels, size):
        raise ValueError(
            f"augment.train_size: {config.model.name} cannot train on {size} px crops (its "
            f"layers are sized for {preprocessing.image_size} px inputs); leave it unset"
        )


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


def run_identity(config: RunConfig, splits: DataSplits) -> dict[str, Any]:
    """What a run trains on, saved in its checkpoints: its class names, the data and the
    limits that choose its images, and a digest of which images its splits hold. ``--resume``
    refuses a checkpoint whose run differs in any of them (its training images could otherwise
    land in the new test split); settings that leave the split as it was (a test share where a
    split column decides) do not count."""
    data = config.data
    return {
        "class_names": list(splits.class_names),
        "dataset": data.dataset,
        "data": resolved(data.data),
        "fold": data.fold,
        "max_classes": data.max_classes,
        "max_per_class": data.max_per_class,
        "train_on_all": data.train_on_all,
        SPLIT_KEY: split_digest(splits),
        COPIES_KEY: splits.copies_kept_together,
        SPLIT_SETTINGS_KEY: {
            "seed": data.seed,
            "test_fraction": data.test_fraction,
            "val_fraction": data.val_fraction,
        },
    }


def split_digest(splits: DataSplits) -> str:
    """A SHA-256 of the image names in each split: the same only for the same split."""
    digest = hashlib.sha256()
    for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        digest.update(f"{name}:{len(part) if part is not None else 0}\n".encode())
        for path in sorted(part.paths) if part is not None else ():
            digest.update(path.encode(errors="replace") + b"\n")
    return digest.hexdigest()[:16]


class _RunInfoOnStart(Callback):
    """Writes the run's ``config.yaml`` and ``run.json`` (status running) when training
    starts: for ``--resume`` only once the trainer has checked and restored the checkpoint,
    so that a refused resume leaves the earlier run's files as they were."""

    def __init__(self, write: Callable[[], None]) -> None:
        self.write = write
        self.written = False

    def on_fit_start(self, trainer: Trainer) -> None:
        self.write_once()

    def write_once(self) -> None:
        if not self.written:
            self.written = True
            self.write()


def _fit(
    model: torch.nn.Module,
    config: RunConfig,
    splits: DataSplits,
    preprocessing: Preprocessing,
    device: torch.device,
    loaders: tuple[BatchLoader, BatchLoader | None],
    distributed: DistributedContext,
    progress: bool,
    callbacks: Sequence[Callback],
    resume: bool,
    cache_dir: str | Path | None = None,
) -> tuple[FitResult, Trainer, bool]:
    """Train ``model`` (both transfer phases for a pretrained one); returns the fit, a trainer
    holding the kept weights, and whether the model was a transfer model. A transfer model's
    frozen-phase features are cached under ``cache_dir/features`` (their keys name the images,
    backbone, preprocessing and view, so later runs and search trials reuse them), else in the
    run folder."""
    run_dir = config.run_dir()
    train_loader, val_loader = loaders
    # A checkpoint of a run on other classes or splits must not be resumed into this one.
    identity = run_identity(config, splits)
    transfer = hasattr(model, "freeze_backbone")
    if transfer:
        from cnnkit.training.transfer import fit_transfer

        fit = fit_transfer(
            model,
            config,
            splits,
            preprocessing,
            device,
            run_dir,
            progress,
            feature_cache_dir=feature_cache_dir(cache_dir),
            callbacks=callbacks,
            resume=resume,
            distributed=distributed,
            identity=identity,
        )
        trainer = Trainer(model, config.train, device, None, (), distributed, progress)
    else:
        loggers: list[Callback] = []
        if distributed.is_main:
            loggers = [
                CsvLogger(run_dir / "metrics.csv"),
                TensorBoardLogger(run_dir / "tensorboard"),
            ]
        trainer = Trainer(
            model,
            config.train,
            device,
            run_dir,
            [*loggers, *callbacks],
            distributed,
            progress,
            identity,
        )
        fit = trainer.fit(train_loader, val_loader, resume=resume)
    return fit, trainer, transfer


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


def _test_and_save(
    config: RunConfig,
    splits: DataSplits,
    preprocessing: Preprocessing,
    trainer: Trainer,
    test_loader: BatchLoader,
    fit: FitResult,
    transfer: bool,
) -> tuple[EvaluationReport, Path]:
    """Score the trained model on the test split, write its report, and save the model file."""
    run_dir = config.run_dir()
    with _float32_scoring(trainer):
        logits, labels = trainer.predict(test_loader, desc="testing")
    data = config.data
    # With train_on_all the "test" images were trained on too: say so.
    split = "test (also trained on)" if data.train_on_all else "test"
    # The limits that chose the test images, named only when set, as evaluate names them.
    limits = {"max_classes": data.max_classes, "max_per_class": data.max_per_class}
    evaluated = evaluated_block(
        run_dir / MODEL_NAME,
        config.model.name,
        data.dataset,
        data.data,
        data.fold,
        split,
        **{key: value for key, value in limits.items() if value is not None},
    )
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
        from cnnkit.training.phases import record_final_test

        record_final_test(run_dir, test_metrics)
    metadata = ModelMetadata(
        architecture=config.model.name,
        class_names=tuple(splits.class_names),
        preprocessing=preprocessing,
        # All resolved options, so a later change of a default cannot break the file.
        options={**model_options(config.model.name), **config.model.options},
        training={
            "dataset": data.dataset,
            # The data it came from and what drew the seeded test split, so that evaluate
            # draws the same split from the same data.
            "data": evaluated["data"],
            "fold": data.fold,
            "data_seed": data.seed,
            "test_fraction": data.test_fraction,
            "max_classes": data.max_classes,
            "max_per_class": data.max_per_class,
            "crop_to_bbox": data.crop_to_bbox,
            "train_on_all": data.train_on_all,
            "epochs_run": fit.epochs_run,
            "best_val_accuracy": _best_val_accuracy(fit, splits),
            "test_top1": test_metrics.get("top1"),
            "test_top5": test_metrics.get("top5"),
        },
    )
    model_path = save_model(run_dir / MODEL_NAME, trainer.module.cpu(), metadata)
    return report, model_path


def _best_val_accuracy(fit: FitResult, splits: DataSplits) -> float | None:
    """The kept weights' validation accuracy; None without a validation split (the trainer
    then ranks epochs by training accuracy, which is no validation figure)."""
    return fit.best_val_accuracy if splits.val is not None else None


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
    if is_search_folder(run_dir):
        raise ValueError(f"{run_dir} holds a search, not a training run: pass another --out")
    refuse_run_dir_inside_folder_data(run_dir, config)
    refuse_unusable_folder(run_dir, f"--out {run_dir}", needs="a run")
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
    if splits.num_classes < 2:  # One class: every prediction right, and nothing learned.
        raise ValueError(
            f"{splits.description}: a classifier needs at least 2 classes; this data has "
            f"{splits.num_classes}"
        )
    device = select_device(config.train.device)
    if device.type == "cuda" and distributed.enabled:
        device = torch.device("cuda", distributed.local_rank)
    if device.type == "cuda":
        tune_cuda_for_training()
    model = create_model(
        config.model.name,
        splits.num_classes,
        preprocessing.channels,
        pretrained=True,
        **config.model.options,
    )
    train_loader, val_loader, test_loader = build_loaders(
        splits, config, preprocessing, device, distributed
    )
    resuming = resume and find_checkpoint(run_dir) is not None
    started = _RunInfoOnStart(
        lambda: write_run_info(run_dir, config, {"status": "running", "data": splits.description})
    )
    if distributed.is_main and not resuming:
        # A fresh start (also --resume without a checkpoint) replaces the earlier run, once
        # the data has loaded and its batches are set up: a run that fails before keeps it.
        clear_run_outputs(run_dir, keep=data_roots(config))
        started.write_once()
    if distributed.is_main and resuming:
        # The checkpoint is checked against this run's settings first (see _RunInfoOnStart).
        callbacks = [started, *callbacks]

    try:
        fit, trainer, transfer = _fit(
            model,
            config,
            splits,
            preprocessing,
            device,
            (train_loader, val_loader),
            distributed,
            progress,
            callbacks,
            resume,
            cache_dir,
        )
        timings["train"] = fit.seconds
        report, model_path, test_metrics = None, None, {}
        if distributed.is_main:
            report, model_path = _test_and_save(
                config, splits, preprocessing, trainer, test_loader, fit, transfer
            )
            test_metrics = report.metrics
            timings["total"] = time.perf_counter() - start
            write_run_info(
                run_dir,
                config,
                {
                    "status": "finished",
                    "data": splits.description,
                    "seconds": timings,
                    "fit": {
                        "epochs_run": fit.epochs_run,
                        "best_epoch": fit.best_epoch,
                        "best_val_accuracy": _best_val_accuracy(fit, splits),
                        "stopped_early": fit.stopped_early,
                    },
                    "test": test_metrics,
                    "config": config_to_dict(with_model_defaults(config)),
                },
            )
    except (TrainingInterrupted, TrainingDiverged, KeyboardInterrupt) as error:
        # run.json says how the run ended, not "running"; also when Ctrl-C or kill lands
        # after the last epoch, while the test split is scored or the model saved. A resume
        # stopped before its checkpoint was restored leaves the earlier run's files.
        if distributed.is_main and started.written:
            status = "diverged" if isinstance(error, TrainingDiverged) else "interrupted"
            reason = str(error) or "interrupted after training, before the model was saved"
            details = {"status": status, "data": splits.description, "error": reason}
            write_run_info(run_dir, config, details)
        raise
    except Exception as error:
        # Any other error (a full disk) ends the run too; a checkpoint that does not fit this
        # run's settings leaves the earlier run's files as they were.
        if distributed.is_main and started.written:
            details = {"status": "failed", "data": splits.description, "error": error_line(error)}
            with contextlib.suppress(OSError):  # The full disk must not hide the first error.
                write_run_info(run_dir, config, details)
        raise
    if distributed.enabled:
        # Every rank waits for rank 0's model file, so the process group ends together.
        torch.distributed.barrier()
    return RunResult(run_dir, model_path, fit, test_metrics, report, splits.description, timings)
