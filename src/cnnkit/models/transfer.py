"""The registered transfer models: pretrained backbones under a new head (see
:mod:`cnnkit.models.transfer_classifier`), one model or an ensemble of fine-tunes.

``efficientnet_lite0``, ``efficientnet_lite1`` and ``efficientnet_lite2`` are EfficientNet-Lite
backbones (pooled ``[B, 1280]`` features) topped with the book's head: Dense ``hidden`` ReLU,
dropout, and a linear classifier (``hidden=0`` gives dropout and a single linear layer).

To add a backbone, add one entry to
:data:`cnnkit.models.efficientnet_lite.EFFICIENTNET_LITE_SPECS` (width and depth coefficients,
native resolution, and the module and class of the package holding its weights), then one
line below: ``efficientnet_liteN = _register_lite("efficientnet_liteN", "<one-line summary>")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cnnkit.config import MAX_IMAGE_SIDE, Preprocessing
from cnnkit.models.efficientnet_lite import (
    CROP_PADDING,
    EFFICIENTNET_LITE_SPECS,
    create_efficientnet_lite,
    lite_preprocessing_at,
)
from cnnkit.models.registry import register_transfer_model
from cnnkit.models.transfer_classifier import TransferClassifier, TransferEnsemble


class ConcatBackbones(nn.Module):
    """Several backbones looking at the same image, their pooled features side by side.

    Each was pretrained on its own, so they make different mistakes, and a head on all their
    features does better than on one of them (``benchmarks/cub_transfer.py`` has the figures).

    Args:
        members: backbones whose ``forward_features`` give pooled ``[B, num_features]``.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("ConcatBackbones needs at least one backbone")
        self.members = nn.ModuleList(members)
        self.num_features = sum(member.num_features for member in members)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, sum of the members' features]``."""
        return torch.cat([member.forward_features(x) for member in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _check_rgb(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(
            f"{name} is an ImageNet (RGB) backbone and needs in_channels=3; got {in_channels}"
        )


def _photo_preprocessing(name: str, image_size: int) -> Preprocessing:
    """The pretrained weights' preprocessing (TensorFlow's crop and normalisation) at
    ``image_size`` px: the backbones pool their features, so they take any size."""
    largest = MAX_IMAGE_SIDE - CROP_PADDING  # The stored photos are this much larger.
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"{name} image_size must be a whole number; got {image_size!r}")
    if not 32 <= image_size <= largest:
        raise ValueError(f"{name} image_size must be 32-{largest}; got {image_size}")
    return lite_preprocessing_at(image_size)


def _ensemble_of(build: Callable[[], TransferClassifier], members: int) -> nn.Module:
    """``build()`` itself for one member, else a :class:`TransferEnsemble` of ``members``."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a whole number >= 1; got {members!r}")
    if members == 1:
        return build()
    return TransferEnsemble([build() for _ in range(members)])


def _register_lite(name: str, summary: str) -> Callable[..., nn.Module]:
    """Register the transfer model ``name`` (an entry of ``EFFICIENTNET_LITE_SPECS``): that
    backbone with the book's head, described by ``summary``. Its ``image_size`` defaults to the
    resolution the weights were trained at."""
    native = EFFICIENTNET_LITE_SPECS[name].image_size

    def factory(
        num_classes: int,
        in_channels: int = 3,
        pretrained: bool = False,
        hidden: int = 1024,
        dropout: float = 0.2,
        image_size: int = native,
        tta: bool = False,
        drop_path: float = 0.0,
        members: int = 1,
    ) -> nn.Module:
        _check_rgb(name, in_channels)
        preprocessing = _photo_preprocessing(name, image_size)

        def build() -> TransferClassifier:
            backbone = create_efficientnet_lite(name, pretrained=pretrained, drop_path=drop_path)
            return TransferClassifier(backbone, num_classes, hidden, dropout, preprocessing, tta)

        return _ensemble_of(build, members)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = summary
    return register_transfer_model(factory)


efficientnet_lite0 = _register_lite(
    "efficientnet_lite0", "EfficientNet-Lite0 (3.4M backbone parameters, 224 px), book's head."
)
efficientnet_lite1 = _register_lite(
    "efficientnet_lite1", "EfficientNet-Lite1 (4.1M backbone parameters, 240 px), book's head."
)
efficientnet_lite2 = _register_lite(
    "efficientnet_lite2", "EfficientNet-Lite2 (4.8M backbone parameters, 260 px), book's head."
)


@register_transfer_model
def efficientnet_lite_trio(
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    hidden: int = 1024,
    dropout: float = 0.2,
    image_size: int = 240,
    tta: bool = False,
    drop_path: float = 0.0,
    members: int = 1,
) -> nn.Module:
    """EfficientNet-Lite0, Lite1 and Lite2 on one ``image_size`` px image (3 x 1280 features)
    with the book's head: the most accurate photo model, at about three times Lite1's cost.

    Every transfer model takes ``members``: more than 1 builds a :class:`TransferEnsemble`
    of that many copies, fine-tuned one after another and averaged."""
    _check_rgb("efficientnet_lite_trio", in_channels)
    preprocessing = _photo_preprocessing("efficientnet_lite_trio", image_size)

    def build() -> TransferClassifier:
        backbones = [
            create_efficientnet_lite(name, pretrained=pretrained, drop_path=drop_path)
            for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
        ]
        return TransferClassifier(
            ConcatBackbones(backbones), num_classes, hidden, dropout, preprocessing, tta
        )

    return _ensemble_of(build, members)
