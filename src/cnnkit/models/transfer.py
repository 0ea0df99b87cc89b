"""Transfer learning: a pretrained backbone, a new head, freezing, and per-part learning rates.

``efficientnet_lite0``, ``efficientnet_lite1`` and ``efficientnet_lite2`` are EfficientNet-Lite
backbones (pooled ``[B, 1280]`` features) topped with the book's head: Dense ``hidden`` ReLU,
dropout, and a linear classifier (``hidden=0`` gives dropout and a single linear layer).

To add a backbone, add one entry to
:data:`cnnkit.models.efficientnet_lite.EFFICIENTNET_LITE_SPECS` (width and depth coefficients,
native resolution, and the module and class of the package holding its weights), then a
three-line factory below, decorated with ``@register_model`` and named like the entry, that
returns ``_create_transfer_model(<name>, ...)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.models.efficientnet_lite import (
    EfficientNetLite,
    create_efficientnet_lite,
    lite_preprocessing,
)
from cnnkit.models.registry import register_model


class TransferClassifier(nn.Module):
    """A pretrained backbone with a new classification head.

    Args:
        backbone: an :class:`EfficientNetLite` without classifier (``forward_features`` gives
            pooled ``[B, feature_dim]`` features).
        num_classes: size of the classifier output.
        hidden: units of the dense ReLU layer before the classifier; 0 for none.
        dropout: dropout before the classifier.

    Raises:
        ValueError: for a negative ``hidden`` or a ``dropout`` outside [0, 1).
    """

    def __init__(
        self, backbone: EfficientNetLite, num_classes: int, hidden: int = 1024, dropout: float = 0.2
    ) -> None:
        super().__init__()
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0; got {hidden}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.backbone = backbone
        self.feature_dim = backbone.num_features
        if hidden > 0:
            self.dense = nn.Sequential(
                nn.Linear(self.feature_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)
            )
        else:
            self.dense = nn.Dropout(dropout)
        self.head_dim = hidden or self.feature_dim
        self.classifier = nn.Linear(self.head_dim, num_classes)
        self.default_preprocessing = lite_preprocessing(backbone.spec)
        self.backbone_frozen = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> pooled backbone features ``[B, feature_dim]``."""
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, feature_dim]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.dense(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final linear layer with a fresh one of ``num_classes`` outputs."""
        self.classifier = nn.Linear(self.head_dim, num_classes)

    def freeze_backbone(self) -> None:
        """Stop training the backbone: no gradients; batch norm keeps its ImageNet statistics."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def unfreeze_backbone(self) -> None:
        """Train the backbone again, in the same mode as the rest of the model."""
        self.backbone.requires_grad_(True)
        self.backbone_frozen = False
        self.backbone.train(self.training)

    def train(self, mode: bool = True) -> TransferClassifier:
        """Set the training mode; a frozen backbone always stays in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def parameter_groups(
        self, learning_rate: float, backbone_lr_scale: float = 0.1
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the backbone at ``learning_rate * backbone_lr_scale``.

        Frozen parameters are included, so unfreezing later needs no new optimizer; they get no
        gradients while frozen, and optimizers skip them.

        Args:
            learning_rate: the head's learning rate.
            backbone_lr_scale: the backbone's learning rate as a fraction of the head's.

        Returns:
            Two dicts with ``params``, ``lr`` and ``name`` (``"backbone"`` then ``"head"``).

        Raises:
            ValueError: for a negative ``learning_rate`` or ``backbone_lr_scale``.
        """
        if learning_rate < 0 or backbone_lr_scale < 0:
            raise ValueError(
                f"learning_rate and backbone_lr_scale must be >= 0; "
                f"got {learning_rate} and {backbone_lr_scale}"
            )
        head = [*self.dense.parameters(), *self.classifier.parameters()]
        return [
            {
                "params": list(self.backbone.parameters()),
                "lr": learning_rate * backbone_lr_scale,
                "name": "backbone",
            },
            {"params": head, "lr": learning_rate, "name": "head"},
        ]


def _create_transfer_model(
    name: str, num_classes: int, in_channels: int, pretrained: bool, hidden: int, dropout: float
) -> TransferClassifier:
    if in_channels != 3:
        raise ValueError(
            f"{name} is an ImageNet (RGB) backbone and needs in_channels=3; got {in_channels}"
        )
    backbone = create_efficientnet_lite(name, pretrained=pretrained)
    return TransferClassifier(backbone, num_classes, hidden, dropout)


@register_model
def efficientnet_lite0(
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    hidden: int = 1024,
    dropout: float = 0.2,
) -> nn.Module:
    """EfficientNet-Lite0 (3.4M backbone parameters, 224 px) with the book's head."""
    return _create_transfer_model(
        "efficientnet_lite0", num_classes, in_channels, pretrained, hidden, dropout
    )


@register_model
def efficientnet_lite1(
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    hidden: int = 1024,
    dropout: float = 0.2,
) -> nn.Module:
    """EfficientNet-Lite1 (4.1M backbone parameters, 240 px) with the book's head."""
    return _create_transfer_model(
        "efficientnet_lite1", num_classes, in_channels, pretrained, hidden, dropout
    )


@register_model
def efficientnet_lite2(
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    hidden: int = 1024,
    dropout: float = 0.2,
) -> nn.Module:
    """EfficientNet-Lite2 (4.8M backbone parameters, 260 px) with the book's head."""
    return _create_transfer_model(
        "efficientnet_lite2", num_classes, in_channels, pretrained, hidden, dropout
    )
