"""Evaluate a saved model file on a dataset, mapping classes by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.dataset import DataSplits, ImageSet, concatenate
from cnnkit.data.loader import BatchLoader, build_eval_transform
from cnnkit.data.sources import build_splits
from cnnkit.evaluation.report import EvaluationReport, build_report
from cnnkit.inference.artifact import load_model
from cnnkit.runtime import select_device


def align_labels(images: ImageSet, model_classes: tuple[str, ...], source: str) -> np.ndarray:
    """Map the dataset's label indices to the model's class indices by class name.

    Raises:
        ValueError: if the dataset has classes the model does not know.
    """
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in images.class_names if name not in index]
    if unknown:
        shown = ", ".join(unknown[:5])
        raise ValueError(
            f"{source}: {len(unknown)} class(es) are not known to the model (e.g. {shown})"
        )
    mapping = np.array([index[name] for name in images.class_names], dtype=np.int64)
    return mapping[images.labels]


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: ImageSet, preprocessing, device, batch_size=512):
    """Logits ``[N, K]`` of ``model`` over ``images`` with the evaluation transform."""
    loader = BatchLoader(images, batch_size, build_eval_transform(preprocessing), device=device)
    outputs = [model(inputs).float().cpu() for inputs, _ in loader]
    return torch.cat(outputs) if outputs else torch.zeros(0, 0)


def load_splits_for(
    preprocessing: Preprocessing,
    data_overrides: dict[str, Any],
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> DataSplits:
    """The dataset described by ``data_overrides`` (all of it in train and test, no validation
    split), decoded as a model with ``preprocessing`` expects."""
    config = DataConfig(
        **{
            "channels": preprocessing.channels,
            "image_size": preprocessing.image_size,
            "stored_size": preprocessing.stored_size,
            **data_overrides,
            "val_fraction": 0.0,
        }
    )
    return build_splits(config, preprocessing, cache_dir, progress).splits


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
        model_path: a cnnkit ``.safetensors`` model file.
        data_overrides: :class:`DataConfig` fields (dataset, data, fold...).
        out_dir: where the report files go.
        cache_dir: decoded-image cache root.
        split: ``"test"`` (the official or seeded test split) or ``"all"`` images.
        progress: show a decoding progress bar.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
    """
    torch_device = select_device(device)
    model = load_model(model_path, torch_device)
    preprocessing = model.metadata.preprocessing
    splits = load_splits_for(preprocessing, data_overrides, cache_dir, progress)
    images = concatenate(splits.train, splits.test) if split == "all" else splits.test
    source = str(data_overrides.get("data"))
    labels = torch.from_numpy(align_labels(images, model.metadata.class_names, source))
    logits = predict_logits(model, images, preprocessing, torch_device)
    return build_report(logits, labels, list(model.metadata.class_names), out_dir, images.images)
