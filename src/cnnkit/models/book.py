"""The book's exact networks, kept to reproduce its numbers.

``book_cnn`` is the MathSymbols notebook's final model (Keras): Conv32-3x3 relu, MaxPool 2,
Conv32-3x3 relu, MaxPool 2, Flatten, Dense 128 tanh, Dropout 0.5, Dense softmax. Keras' ``Conv2D``
defaults to ``padding="valid"``, so 32x32 inputs give 6x6x32 = 1,152 flattened features. With
3 channels, 369 classes and ``dense=1024`` (the book's 1,024-unit model) that is 1,569,041
parameters; the default ``dense=128`` is its final, grid-searched choice.

Both networks end in a dense layer sized for one input size: ``image_size`` (an option that
every model file records) sets it, 32 px for ``book_cnn`` and 256 px for ``book_bird_cnn``
unless given.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.config import Preprocessing
from cnnkit.models.registry import check_dropout, register_model

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_dense_and_dropout(model: str, dense: object, dropout: object) -> None:
    """Refuse a dense layer of no units and a dropout that would drop every unit."""
    if not _is_whole(dense) or dense < 1:
        raise ValueError(f"{model} dense must be a whole number >= 1; got {dense!r}")
    check_dropout(model, dropout)


class BookCNN(nn.Module):
    """The book's HASY CNN with its variants (``convs`` 1 or 2, any dense size and dropout)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        convs: int = 2,
        dense: int = 128,
        dropout: float = 0.5,
        activation: str = "tanh",
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if convs not in (1, 2):
            raise ValueError(f"book_cnn convs must be 1 or 2; got {convs!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"book_cnn activation must be one of {list(_ACTIVATIONS)}")
        _check_dense_and_dropout("book_cnn", dense, dropout)
        smallest = {1: 4, 2: 10}[convs]  # Each conv takes 2 px and each pool halves the rest.
        if not _is_whole(image_size) or image_size < smallest:
            raise ValueError(
                f"book_cnn with {convs} conv(s) needs image_size >= {smallest} px; "
                f"got {image_size!r}"
            )
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(convs):
            layers += [nn.Conv2d(channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = 32, (size - 2) // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.dense = nn.Sequential(
            nn.Linear(channels * size * size, dense),
            _ACTIVATIONS[activation](),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(dense, num_classes)
        self.default_preprocessing = Preprocessing(
            "symbol",
            in_channels,
            image_size,
            image_size,
            (0.0,) * in_channels,
            (1.0,) * in_channels,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, dense]``."""
        return self.dense(self.features(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.classifier.in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))


class BookBirdCNN(nn.Module):
    """The book's custom bird CNN for 256x256 photos.

    2x Conv64-3x3 relu, MaxPool 4, 2x Conv64-3x3 relu, MaxPool 4, Dropout 0.5, Flatten,
    Dense 400 relu, Dropout 0.5, Dense softmax (Keras ``valid`` padding throughout);
    ``dropout`` sets both dropouts.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        dense: int = 400,
        image_size: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check_dense_and_dropout("book_bird_cnn", dense, dropout)
        if not _is_whole(image_size) or image_size < 36:  # Two 2-conv blocks, each pooled by 4.
            raise ValueError(f"book_bird_cnn needs image_size >= 36 px; got {image_size!r}")
        size = ((image_size - 4) // 4 - 4) // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(64 * size * size, dense),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(dense, num_classes)
        self.default_preprocessing = Preprocessing(
            "photo", in_channels, image_size, image_size, (0.0,) * in_channels, (1.0,) * in_channels
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.classifier.in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def book_cnn(
    num_classes: int,
    in_channels: int = 3,
    convs: int = 2,
    dense: int = 128,
    dropout: float = 0.5,
    activation: str = "tanh",
    image_size: int = 32,
) -> nn.Module:
    """The book's final HASY network (``--dense 1024`` gives its 1,024-unit model).

    ``image_size`` is the input size its dense layer is sized for; a training run sets it
    from ``--image-size``."""
    return BookCNN(num_classes, in_channels, convs, dense, dropout, activation, image_size)


@register_model
def book_bird_cnn(
    num_classes: int,
    in_channels: int = 3,
    dense: int = 400,
    image_size: int = 256,
    dropout: float = 0.5,
) -> nn.Module:
    """The book's custom bird CNN trained from scratch (256x256 input; both dropouts 0.5)."""
    return BookBirdCNN(num_classes, in_channels, dense, image_size, dropout)
