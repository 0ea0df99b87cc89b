"""The value checks that the config dataclasses share, each raising a ValueError naming the field,
and the limits they enforce."""

from __future__ import annotations

import math
from typing import Any

# The largest image side a model takes or a stored image keeps: ample for any CNN here, and it
# keeps a tampered model file from asking for gigabytes per image.
MAX_IMAGE_SIDE = 4096

MAX_SEED = 2**32 - 1  # NumPy's range; the per-epoch seeds derived from it stay within torch's.


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite number above 0 (or 0,
    with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def check_side(name: str, value: Any) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a whole number of pixels from 1 to
    :data:`MAX_IMAGE_SIDE`."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or not 1 <= value <= MAX_IMAGE_SIDE:
        raise ValueError(
            f"{name} must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE}; got {value!r}"
        )


def check_seed(seed: int) -> None:
    """Raise a ValueError unless ``seed`` is between 0 and :data:`MAX_SEED`."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}; got {seed}")
