"""Seeded, stratified splits of label arrays, keeping identical images on one side."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def duplicate_groups(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """For each image, the index of the first image with the same pixels: ``[N]`` ints.

    Files downloaded twice or re-exported would otherwise land on both sides of a split and
    score the model on images it trained on.
    """
    first_seen: dict[bytes, int] = {}
    groups = np.empty(len(images), dtype=np.int64)
    for index, image in enumerate(images):
        key = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        groups[index] = first_seen.setdefault(key, index)
    return groups


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so that each class keeps about ``fraction`` of its items in the second part.

    Every class with at least two items keeps at least one item in the first part, and a class
    gets an item in the second part whenever ``fraction * count`` rounds to at least one.

    Args:
        labels: ``int`` array ``[N]``.
        fraction: share of each class that goes to the second part, in ``[0, 1)``.
        seed: the random seed; the same seed gives the same split.
        groups: optional ``[N]`` group ids (see :func:`duplicate_groups`); a group goes to one
            part whole, counted as one item of its first member's class. Without duplicates
            the split is the same as without ``groups``.

    Returns:
        ``(first_indices, second_indices)``, each sorted.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1); got {fraction}")
    labels = np.asarray(labels)
    if groups is None:
        groups = np.arange(len(labels))
    _, leaders, group_of = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    leader_labels = labels[leaders]
    rng = np.random.default_rng(seed)
    second: list[np.ndarray] = []
    for label in np.unique(leader_labels):
        members = np.flatnonzero(leader_labels == label)
        rng.shuffle(members)
        count = int(round(fraction * len(members)))
        count = min(count, len(members) - 1) if len(members) > 1 else 0
        second.append(members[:count])
    held = np.zeros(len(leaders), dtype=bool)
    if second:
        held[np.concatenate(second)] = True
    in_second = held[group_of]
    return np.flatnonzero(~in_second), np.flatnonzero(in_second)
