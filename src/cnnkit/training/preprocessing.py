"""A run's input preprocessing, resolved from its model, and the refusal of model options and
input sizes the model cannot take, before any data is loaded or an earlier run is cleared.
"""

from __future__ import annotations

import torch

from cnnkit.config import Preprocessing, RunConfig, TransferConfig
from cnnkit.models.registry import create_model, create_model_outline, model_options
from cnnkit.training.memory import GIB, available_memory


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
    dense layer sized for one input), or that no random resized crops go with, before any data
    is loaded."""
    size = config.augment.train_size
    if not config.augment.enabled or size is None or size == preprocessing.image_size:
        return
    if not _takes_size(model, preprocessing.channels, size):
        raise ValueError(
            f"augment.train_size: {config.model.name} cannot train on {size} px crops (its "
            f"layers are sized for {preprocessing.image_size} px inputs); leave it unset"
        )
    if not config.augment.random_resized_crop:
        # Random resized crops enlarge objects, which the smaller size shrinks back to about
        # their test-time size; without them each whole image is shrunk, and the model learns
        # its classes at another scale than the one it is tested at.
        raise ValueError(
            f"augment.train_size: {size} px training images need random resized crops "
            "(augment.random_resized_crop: true), which this run does not use; without them "
            f"every image is shrunk to {size} px and the model learns another scale than the "
            f"{preprocessing.image_size} px it is tested at; leave it unset"
        )
