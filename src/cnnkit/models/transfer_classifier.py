"""A pretrained backbone under a new head (:class:`TransferClassifier`): freezing, per-part
learning rates and test-time augmentation; and :class:`TransferEnsemble`, several fine-tunes
averaged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cnnkit.config import Preprocessing
from cnnkit.models.efficientnet_lite import lite_preprocessing
from cnnkit.models.registry import check_dropout

# Test-time augmentation: the image as given and enlarged by this factor, each also mirrored.
# A network trained on random resized crops sees birds larger than a centre crop shows them, so
# a slightly larger test input matches training better (Touvron et al., "Fixing the train-test
# resolution discrepancy", 2019); benchmarks/cub_transfer.py measures the gain.
TTA_SCALE = 1.1


class TransferClassifier(nn.Module):
    """A pretrained backbone with a new classification head.

    Args:
        backbone: a :class:`~cnnkit.models.efficientnet_lite.EfficientNetLite` without
            classifier, or any module whose ``forward_features`` gives pooled
            ``[B, num_features]`` features.
        num_classes: size of the classifier output.
        hidden: units of the dense ReLU layer before the classifier; 0 for none.
        dropout: dropout before the classifier.
        preprocessing: the input the backbone expects (default: an EfficientNet-Lite's own).
        tta: in eval mode, average the class probabilities of four views (the input and the
            input enlarged by :data:`TTA_SCALE`, each also mirrored) at four times the cost;
            the output is then the log of the averaged probabilities. Training is unaffected.

    Raises:
        ValueError: for a negative ``hidden`` or a ``dropout`` outside [0, 1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        hidden: int = 1024,
        dropout: float = 0.2,
        preprocessing: Preprocessing | None = None,
        tta: bool = False,
    ) -> None:
        super().__init__()
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0; got {hidden}")
        check_dropout("the transfer head", dropout)
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
        self.default_preprocessing = preprocessing or lite_preprocessing(backbone.spec)
        self.backbone_frozen = False
        self.tta = tta

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> pooled backbone features ``[B, feature_dim]``."""
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, feature_dim]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.dense(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> logits ``[B, num_classes]`` (log-probabilities with ``tta``)."""
        if self.tta and not self.training:
            return self.forward_tta(x)
        return self.forward_head(self.forward_features(x))

    def forward_tta(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the class probabilities averaged over four views of ``x`` (see ``tta``)."""
        larger = F.interpolate(x, scale_factor=TTA_SCALE, mode="bilinear", align_corners=False)
        views = (x, x.flip(-1), larger, larger.flip(-1))
        probabilities = [
            self.forward_head(self.forward_features(view)).float().softmax(1) for view in views
        ]
        # Clamped, so a class no view gives any probability has a finite log.
        return torch.stack(probabilities).mean(0).clamp_min(1e-30).log()

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


class TransferEnsemble(nn.Module):
    """Several transfer models of one architecture, fine-tuned apart, their predictions averaged.

    Fine-tunes from the same pretrained backbone with different random streams (augmentation,
    batch order, dropout) end in different places, and the average of their class
    probabilities is more accurate than any one of them. Training fine-tunes the members one
    after another (:func:`cnnkit.training.transfer.fit_transfer`); the frozen phase fits one
    head that every member starts from.

    The members' modules stand in for the ensemble where training needs one model
    (``backbone``, ``dense``, ``classifier``, ``forward_features``: the first member's).

    Args:
        members: at least two :class:`TransferClassifier` of the same architecture.
    """

    def __init__(self, members: Sequence[TransferClassifier]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members; got {len(members)}")
        self.members = nn.ModuleList(members)
        self.default_preprocessing = members[0].default_preprocessing

    @property
    def first(self) -> TransferClassifier:
        return self.members[0]

    @property
    def backbone(self) -> nn.Module:
        return self.first.backbone

    @property
    def dense(self) -> nn.Module:
        return self.first.dense

    @property
    def classifier(self) -> nn.Module:
        return self.first.classifier

    @property
    def tta(self) -> bool:
        return self.first.tta

    @tta.setter
    def tta(self, value: bool) -> None:
        for member in self.members:
            member.tta = value

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The first member's pooled backbone features (what the frozen phase trains on)."""
        return self.first.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> log of the members' averaged class probabilities ``[B, K]``."""
        probabilities = [member(x).float().softmax(1) for member in self.members]
        # Clamped, so a class no member gives any probability has a finite log.
        return torch.stack(probabilities).mean(0).clamp_min(1e-30).log()

    def reset_classifier(self, num_classes: int) -> None:
        for member in self.members:
            member.reset_classifier(num_classes)

    def freeze_backbone(self) -> None:
        for member in self.members:
            member.freeze_backbone()

    def unfreeze_backbone(self) -> None:
        for member in self.members:
            member.unfreeze_backbone()

    def share_first(self) -> None:
        """Give every member the first member's weights (after the frozen phase)."""
        state = self.first.state_dict()
        for member in self.members[1:]:
            member.load_state_dict(state)
