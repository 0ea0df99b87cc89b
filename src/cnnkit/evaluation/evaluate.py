"""Evaluate a saved model file on a dataset, mapping classes by name."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.dataset import DataSplits, ImageSet, concatenate
from cnnkit.data.loader import BatchLoader, build_eval_transform, eval_batch_size
from cnnkit.data.sources import build_splits
from cnnkit.evaluation.report import EvaluationReport, build_report, evaluated_block, resolved
from cnnkit.inference.artifact import load_model
from cnnkit.progress import bar_disabled
from cnnkit.runtime import for_inference, select_device

logger = logging.getLogger(__name__)


def align_labels(images: ImageSet, model_classes: tuple[str, ...], source: str) -> np.ndarray:
    """Map the dataset's label indices to the model's class indices by class name.

    Raises:
        ValueError: if the dataset has classes the model does not know.
    """
    index = {name: i for i, name in enumerate(model_classes)}
    present = [images.class_names[label] for label in np.unique(images.labels)]
    unknown = [name for name in present if name not in index]
    if unknown:
        shown = ", ".join(unknown[:5])
        raise ValueError(
            f"{source}: {len(unknown)} class(es) are not known to the model (e.g. {shown})"
        )
    mapping = np.array([index.get(name, -1) for name in images.class_names], dtype=np.int64)
    return mapping[images.labels]


def restrict_to_known_classes(
    images: ImageSet, model_classes: tuple[str, ...], source: str, split: str = "test"
) -> ImageSet:
    """The images of the classes the model knows, for a model trained on part of a dataset
    (``--max-classes``); all images when it knows every class.

    Args:
        images: the images to score.
        model_classes: the model's class names.
        source: the dataset, as errors name it.
        split: ``"test"`` or ``"all"``, as errors name the images.

    Raises:
        ValueError: if the model knows none of the dataset's classes, or none of the images
            is of a class it knows.
    """
    known = set(model_classes)
    keep = [i for i, name in enumerate(images.class_names) if name in known]
    if not keep:
        shown = ", ".join(images.class_names[:5])
        raise ValueError(f"{source}: the model knows none of the data's classes (e.g. {shown})")
    kept = images
    if len(keep) < len(images.class_names):
        logger.warning(
            "%s: the model knows %d of the data's %d classes; evaluating on their images only",
            source,
            len(keep),
            len(images.class_names),
        )
        kept = images.subset(np.flatnonzero(np.isin(images.labels, keep)))
    _refuse_nothing_to_score(len(images), len(kept), model_classes, source, split)
    return kept


def _refuse_nothing_to_score(
    count: int, kept: int, model_classes: tuple[str, ...], source: str, split: str
) -> None:
    """Stop with a clear error, not a failed argmax, when no image is left to score."""
    if kept:
        return
    described = "test images" if split == "test" else "images"
    if not count:
        raise ValueError(f"{source}: there are no {described} to score")
    shown = ", ".join(model_classes[:5])
    raise ValueError(
        f"{source}: none of the {count} {described} are of the model's classes (e.g. {shown}); "
        "nothing to score"
    )


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: ImageSet,
    preprocessing,
    device,
    batch_size: int = 512,
    progress: bool = False,
):
    """Logits ``[N, K]`` of ``model`` over ``images`` with the evaluation transform."""
    # Large photos go in smaller batches: memory stays bounded and the bar moves.
    batch_size = eval_batch_size(batch_size, preprocessing)
    loader = BatchLoader(images, batch_size, build_eval_transform(preprocessing), device=device)
    outputs = []
    # Counted in images: a batch of 512 photos takes a minute on a CPU, so a bar of batches
    # would sit at 0 of 1 for all of it. The bar moves once a batch's forward pass is done.
    with tqdm(
        total=len(images),
        desc="predicting",
        unit="img",
        disable=bar_disabled(progress),
        leave=False,
    ) as bar:
        for inputs, _ in loader:
            outputs.append(model(inputs).float().cpu())
            bar.update(len(inputs))
    return torch.cat(outputs) if outputs else torch.zeros(0, 0)


def load_splits_for(
    preprocessing: Preprocessing,
    data_overrides: dict[str, Any],
    cache_dir: str | Path | None = None,
    progress: bool = False,
    split: str = "test",
) -> DataSplits:
    """The dataset described by ``data_overrides`` (all of it in train and test, no validation
    split), decoded as a model with ``preprocessing`` expects. For ``split="all"`` (every
    image scored) an empty test split, as a few images a class give, is no error."""
    config = DataConfig(
        **{
            "channels": preprocessing.channels,
            "image_size": preprocessing.image_size,
            "stored_size": preprocessing.stored_size,
            **data_overrides,
            "val_fraction": 0.0,
        }
    )
    return build_splits(config, preprocessing, cache_dir, progress, split == "test").splits


# Data settings that choose the test images (and the validation share, which int8 calibration
# leaves out of the training images it reads): the name in DataConfig, and in the model file.
SPLIT_SETTINGS = (
    ("seed", "data_seed"),
    ("test_fraction", "test_fraction"),
    ("val_fraction", "val_fraction"),
    ("max_classes", "max_classes"),
    ("max_per_class", "max_per_class"),
    ("crop_to_bbox", "crop_to_bbox"),
)


def trained_split_settings(
    model_path: str | Path,
    training: dict[str, Any],
    data_overrides: dict[str, Any],
    split: str,
    scoring: bool = True,
) -> dict[str, Any]:
    """``data_overrides`` with the settings the model was trained with (seed, test fraction,
    class and image limits, bounding-box crops) when its test split is scored on the very data
    it was trained on: the seeded test split is then the training run's own, not another draw
    that overlaps its training images. A setting given otherwise is kept, with a warning. Its
    ``--on-bad-image`` is kept on any split of that data, unless given.
    ``scoring=False`` (int8 calibration, which reads the training images) leaves out the
    warnings about scoring images the model trained on."""
    if "data" not in training:
        return data_overrides  # A model file that does not say its data.
    same_data = (
        data_overrides.get("dataset") == training.get("dataset")
        and resolved(data_overrides.get("data")) == training["data"]
    )
    if not same_data:
        return data_overrides
    if "on_bad_image" not in data_overrides and training.get("on_bad_image"):
        # Files the training run skipped as bad are skipped again, not an error here.
        data_overrides = {**data_overrides, "on_bad_image": training["on_bad_image"]}
    if split != "test":
        if scoring:
            logger.warning(
                "%s was trained on %s: --split all scores its training images too, so the "
                "figures overstate how it does on new images",
                model_path,
                training["data"] or training.get("dataset"),
            )
        return data_overrides
    if training.get("train_on_all") and scoring:
        logger.warning(
            "%s was trained with --train-on-all: its test images were training images too",
            model_path,
        )
    # With a fold or an official split, the seed and the test share choose nothing, and the
    # limits keep images of each split apart: the test images stay test images.
    drawn = data_overrides.get("fold") is None and data_overrides.get("dataset") != "cub"
    settings = dict(data_overrides)
    for key, recorded_as in SPLIT_SETTINGS:
        recorded = training.get(recorded_as)
        if key not in settings:
            if recorded is not None:
                settings[key] = recorded
        elif settings[key] != recorded and drawn:
            logger.warning(
                "%s was trained with %s %s; with %s its test split holds other images, some "
                "of which it may have trained on",
                model_path,
                key.replace("_", " "),
                "unset" if recorded is None else recorded,
                settings[key],
            )
    return settings


def _load_for_evaluation(
    model_path: str | Path, device: str
) -> tuple[torch.nn.Module, torch.device]:
    """The model and the device its inputs go to: a model file on ``device``; an ``.onnx``
    export on ONNX Runtime's CPU provider, whatever ``device`` says (a warning names one that
    is not used, and no missing CUDA stops it)."""
    if Path(model_path).suffix.lower() != ".onnx":
        torch_device = select_device(device)
        return for_inference(load_model(model_path, torch_device)), torch_device
    from cnnkit.inference.onnx_backend import OnnxModule, OnnxPredictor

    if device not in ("auto", "cpu"):
        logger.warning(
            "%s runs on ONNX Runtime's CPU provider; --device %s is ignored", model_path, device
        )
    return OnnxModule(OnnxPredictor.from_file(model_path)), torch.device("cpu")


def _warn_about_hasy_folds(
    model_path: str | Path, trained_fold: int | None, data_overrides: dict[str, Any], split: str
) -> None:
    """Warn where a model trained on one HASYv2 fold is scored on images it trained on."""
    if data_overrides.get("dataset") != "hasy" or trained_fold is None:
        return
    fold = data_overrides.get("fold")
    if fold is None and split == "test":
        logger.warning(
            "%s was trained on HASYv2 fold %s; without --fold %s the test split is a seeded "
            "split that overlaps its training images",
            model_path,
            trained_fold,
            trained_fold,
        )
    elif fold not in (None, trained_fold):
        logger.warning(
            "%s was trained on HASYv2 fold %s: fold %s's test images are among its training "
            "images, so the figures overstate how it does on new images (use --fold %s)",
            model_path,
            trained_fold,
            fold,
            trained_fold,
        )


def evaluate_model_file(
    model_path: str | Path,
    data_overrides: dict[str, Any],
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    split: str = "test",
    progress: bool = False,
    device: str = "auto",
) -> EvaluationReport:
    """Evaluate ``model_path`` on the dataset described by ``data_overrides``.

    Args:
        model_path: a cnnkit ``.safetensors`` model file, or its ``.onnx`` export.
        data_overrides: :class:`DataConfig` fields (dataset, data, fold...).
        out_dir: where the report files go.
        cache_dir: decoded-image cache root.
        split: ``"test"`` (the official or seeded test split) or ``"all"`` images.
        progress: show a decoding progress bar.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (an ``.onnx`` export runs on the CPU).
    """
    model, torch_device = _load_for_evaluation(model_path, device)
    preprocessing = model.metadata.preprocessing
    data_overrides = trained_split_settings(
        model_path, model.metadata.training, data_overrides, split
    )
    splits = load_splits_for(preprocessing, data_overrides, cache_dir, progress, split)
    # After loading: a fold the archive lacks is an error, not a fold to warn about.
    _warn_about_hasy_folds(model_path, model.metadata.training.get("fold"), data_overrides, split)
    images = concatenate(splits.train, splits.test) if split == "all" else splits.test
    source = str(data_overrides.get("data") or data_overrides.get("dataset"))
    images = restrict_to_known_classes(images, model.metadata.class_names, source, split)
    labels = torch.from_numpy(align_labels(images, model.metadata.class_names, source))
    logits = predict_logits(model, images, preprocessing, torch_device, progress=progress)
    evaluated = evaluated_block(
        model_path,
        model.metadata.architecture,
        data_overrides.get("dataset"),
        data_overrides.get("data"),
        data_overrides.get("fold"),
        split,
        # What else chose the images: --max-classes, --max-per-class, --test-fraction... (not
        # the run's validation share, which scoring does not hold back).
        **{
            k: v
            for k, v in data_overrides.items()
            if k not in ("dataset", "data", "fold", "val_fraction")
        },
    )
    class_names = list(model.metadata.class_names)
    return build_report(logits, labels, class_names, out_dir, images.images, evaluated=evaluated)
