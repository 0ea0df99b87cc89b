"""One training run from a RunConfig: data -> model -> Trainer.fit -> test report -> model file.

This is the single training function; the CLI, the demo and hyperparameter search all call
:func:`train_run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnkit import __version__
from cnnkit.atomic import write_atomically
from cnnkit.config import (
    Preprocessing,
    RunConfig,
    TransferConfig,
    config_to_dict,
    dump_config,
)
from cnnkit.data.dataset import DataSplits
from cnnkit.data.loader import BatchLoader, build_loaders
from cnnkit.data.sources import LoadedData, build_splits
from cnnkit.errors import error_line
from cnnkit.evaluation.report import EvaluationReport, build_report, evaluated_block, resolved
from cnnkit.inference.artifact import ModelMetadata, save_model
from cnnkit.models.registry import create_model, model_options
from cnnkit.paths import RUN_INFO, is_search_folder, member_folders, refuse_unusable_folder
from cnnkit.runtime import (
    DistributedContext,
    main_process_first,
    seed_everything,
    select_device,
    tune_cuda_for_training,
)
from cnnkit.training.callbacks import CsvLogger, TensorBoardLogger
from cnnkit.training.checkpoint import CHECKPOINT_NAME, COPIES_KEY, SPLIT_KEY, SPLIT_SETTINGS_KEY
from cnnkit.training.trainer import (
    Callback,
    FitResult,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
)

logger = logging.getLogger(__name__)
MODEL_NAME = "model.safetensors"


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
    probe = create_model(config.model.name, 2, config.data.channels, **options)
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


def _takes_size(model: torch.nn.Module, channels: int, size: int) -> bool:
    """Whether the model's layers take ``size`` px inputs (a dense layer is sized for one)."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, size, size))
    except RuntimeError:
        return False
    return True


def _check_input_size(model: torch.nn.Module, name: str, preprocessing: Preprocessing) -> None:
    """Refuse an input size the model's layers cannot take (``book_cnn``'s dense layer is sized
    by its ``image_size`` option, which the CLI sets from ``data.image_size``), before any data
    is loaded or an earlier run in the folder is cleared."""
    size = preprocessing.image_size
    if not _takes_size(model, preprocessing.channels, size):
        raise ValueError(
            f"{name} cannot take {size} px inputs with these options; give it the size too "
            f"(model.options.image_size: {size}) where it takes one, or use data.image_size "
            f"{getattr(model, 'default_preprocessing', preprocessing).image_size}"
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


def git_revision() -> str:
    """The git commit of the cnnkit source tree, or ``unknown`` outside a checkout of it (an
    install inside another project's repository, whose commit is not cnnkit's)."""
    here = Path(__file__).resolve()

    def git(*arguments: str) -> str | None:
        try:
            output = subprocess.run(
                ["git", *arguments], cwd=here.parent, capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return output.stdout.strip() if output.returncode == 0 else None

    if git("ls-files", "--error-unmatch", here.name) is None:
        return "unknown"  # This file is not tracked: not cnnkit's own checkout.
    return git("rev-parse", "HEAD") or "unknown"


def feature_cache_dir(cache_dir: str | Path | None) -> Path | None:
    """Where a run with decoded-image cache ``cache_dir`` caches frozen-phase features (None:
    the run folder's own ``features``)."""
    return Path(cache_dir) / "features" if cache_dir is not None else None


def with_model_defaults(config: RunConfig) -> RunConfig:
    """``config`` with every option of its model, the defaults included: read back with
    ``--config``, it builds the same network whatever preset the reading picks (a preset
    would otherwise fill the options left out with its own)."""
    options = {**model_options(config.model.name), **config.model.options}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, options=options))


def write_run_info(run_dir: Path, config: RunConfig, extra: dict[str, Any]) -> None:
    """Write ``config.yaml`` (the resolved settings, every model option included) and
    ``run.json`` (version, git revision, timings, metrics)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = dump_config(with_model_defaults(config))
    write_atomically(
        run_dir / "config.yaml", lambda path: path.write_text(config_text, encoding="utf-8")
    )
    info = {
        "cnnkit_version": __version__,
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
        **extra,
    }
    text = json.dumps(info, indent=2, default=str) + "\n"
    write_atomically(run_dir / RUN_INFO, lambda path: path.write_text(text, encoding="utf-8"))


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


# What cnnkit writes into a run folder: train (and a transfer run's phases), evaluate's default
# report, report, export's default file names, and the demo's samples. The feature cache
# (``features/``) is kept: its entries are keyed by their inputs.
RUN_OUTPUTS = (
    CHECKPOINT_NAME,
    "config.yaml",
    "evaluation",
    # evaluate's reports on the run's exports (below), which go with them.
    "evaluation-model.onnx",
    "evaluation-model-int8.onnx",
    "finetune",
    "frozen",
    "metrics.csv",
    MODEL_NAME,
    "model.onnx",
    "model-int8.onnx",
    "phases.json",
    "report",
    "report.html",
    RUN_INFO,
    "samples",
    "tensorboard",
)


def _data_roots(config: RunConfig) -> list[Path]:
    """Where the training data lives: a CSV's folder (its paths are relative to it), or the
    archive or folder itself."""
    if not config.data.data:
        return []
    data = Path(config.data.data)
    return [data.parent if data.suffix.lower() == ".csv" else data]


def _refuse_run_dir_inside_folder_data(run_dir: Path, config: RunConfig) -> None:
    """A folder dataset is every image under its folder, so a run folder inside it would add
    the run's report images to the next run's data (as a class named ``report``)."""
    if config.data.dataset != "folder" or not config.data.data:
        return
    data, out = Path(config.data.data).resolve(), run_dir.resolve()
    if out == data or data in out.parents:
        raise ValueError(
            f"--out {run_dir} is inside the training data folder {config.data.data}: its "
            "report images would become training images; write the run elsewhere"
        )


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: the run's, or a transfer run's fine-tune's
    (an ensemble's: the latest member's)."""
    if (run_dir / CHECKPOINT_NAME).is_file():
        return run_dir / CHECKPOINT_NAME
    folders = [*reversed(member_folders(run_dir)), run_dir / "finetune"]
    candidates = [folder / CHECKPOINT_NAME for folder in folders]
    return next((path for path in candidates if path.is_file()), None)


# The files cnnkit writes in the folders of a run (temporaries of atomic writes included).
_OUTPUT_FILE = re.compile(
    r"(events\.out\.tfevents\..*"  # TensorBoard, in tensorboard/ and its phase folders
    r"|metrics\.(json|csv)|per_class\.csv|confused_pairs\.csv|confusion\.png"
    r"|misclassified\.png|checkpoint\.pt|test-.*\.png|\..*\.tmp)"
)


def _only_cnnkit_files(folder: Path) -> bool:
    """Whether every file under ``folder`` is named like one cnnkit writes there."""
    return all(
        _OUTPUT_FILE.fullmatch(path.name)
        for path in folder.rglob("*")
        if path.is_file() or path.is_symlink()
    )


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a cnnkit training run: its run.json, model or checkpoint."""
    if (run_dir / MODEL_NAME).is_file() or (run_dir / CHECKPOINT_NAME).is_file():
        return True
    try:
        info = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "cnnkit_version" in info


def clear_run_outputs(run_dir: Path, keep: Sequence[str | Path] = ()) -> list[str]:
    """Remove an earlier cnnkit run's outputs from ``run_dir`` before a fresh run writes its
    own, so that no old report, TensorBoard curve, export or sample sits beside the new model.

    Nothing is removed from a folder that holds no cnnkit run (``--out .`` in a folder of
    one's own), no folder that holds a path of ``keep`` or lies inside one (the training
    data's folder), and nothing not named like one of cnnkit's outputs. A link is removed,
    never what it points to.

    Returns:
        The names removed.
    """
    if not holds_a_run(run_dir):
        return []
    kept = [Path(path).resolve() for path in keep]
    removed, left = [], []
    for name in (*RUN_OUTPUTS, *(folder.name for folder in member_folders(run_dir))):
        path = run_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()  # A file of cnnkit's own (none is an image), or a link to anything.
        elif path.is_dir():
            resolved = path.resolve()
            holds_data = any(
                k == resolved or resolved in k.parents or k in resolved.parents for k in kept
            )
            if holds_data or not _only_cnnkit_files(path):
                left.append(name)
                continue
            shutil.rmtree(path)
        else:
            continue
        removed.append(name)
    if left:
        logger.warning(
            "%s: left the earlier run's %s as they are: they hold the training data or files "
            "cnnkit did not write",
            run_dir,
            ", ".join(left),
        )
    if removed:
        logger.info("removed the earlier run's %s from %s", ", ".join(removed), run_dir)
    return removed


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
        from cnnkit.training.transfer import record_final_test

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
    _refuse_run_dir_inside_folder_data(run_dir, config)
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
        clear_run_outputs(run_dir, keep=_data_roots(config))
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
