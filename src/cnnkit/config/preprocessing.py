"""How a decoded image becomes model input: the Preprocessing settings stored in every model
file."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnkit.config.checks import check_choice, check_side


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes model input; stored in every model file.

    ``mode="symbol"`` composites onto white, converts to ``channels`` and resizes to
    ``stored_size`` squared. ``mode="photo"`` applies EXIF rotation, resizes the shorter side to
    ``stored_size`` and centre-crops a square. The model then sees a centre ``image_size`` crop,
    scaled to [0, 1] and normalised with ``mean`` and ``std``.
    """

    mode: str = "symbol"
    channels: int = 1
    image_size: int = 32
    stored_size: int = 32
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        check_choice("preprocessing.mode", self.mode, ("symbol", "photo"))
        if isinstance(self.channels, bool) or not isinstance(self.channels, int):
            raise ValueError(f"preprocessing.channels must be 1 or 3; got {self.channels!r}")
        check_choice("preprocessing.channels", self.channels, (1, 3))
        check_side("preprocessing.image_size", self.image_size)
        check_side("preprocessing.stored_size", self.stored_size)
        if self.stored_size < self.image_size:
            raise ValueError(
                f"preprocessing.stored_size ({self.stored_size}) must be >= image_size "
                f"({self.image_size})"
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("preprocessing.mean and std need one value per channel")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("preprocessing.mean and std values must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise ValueError("preprocessing.std values must be > 0")
