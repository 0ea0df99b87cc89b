"""Seeded, stratified splits of label arrays."""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so that each class keeps about ``fraction`` of its items in the second part.

    Every class with at least two items keeps at least one item in the first part, and a class
    gets an item in the second part whenever ``fraction * count`` rounds to at least one.

    Args:
        labels: ``int`` array ``[N]``.
        fraction: share of each class that goes to the second part, in ``[0, 1)``.
        seed: the random seed; the same seed gives the same split.

    Returns:
        ``(first_indices, second_indices)``, each sorted.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1); got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        count = int(round(fraction * len(members)))
        count = min(count, len(members) - 1) if len(members) > 1 else 0
        second.append(members[:count])
        first.append(members[count:])
    join = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return join(first), join(second)
