"""In-memory image sets (uint8 arrays + integer labels) and the splits a run uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSet:
    """Decoded images with their integer labels.

    Attributes:
        images: ``uint8`` array ``[N, S, S, C]`` (possibly memory-mapped).
        labels: ``int64`` array ``[N]`` of indices into ``class_names``.
        class_names: class names in index order.
        paths: where each image came from, for reports and error messages.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, S, S, C]; got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{len(self.images)} images but {len(self.labels)} labels in the image set"
            )
        if self.paths and len(self.paths) != len(self.labels):
            raise ValueError("paths must have one entry per image")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> ImageSet:
        """Return the images at ``indices`` (copied into memory)."""
        indices = np.asarray(indices, dtype=np.int64)
        paths = [self.paths[i] for i in indices] if self.paths else []
        return ImageSet(
            np.ascontiguousarray(self.images[indices]),
            self.labels[indices],
            self.class_names,
            paths,
        )


@dataclass
class DataSplits:
    """The train, validation and test sets of one run, sharing one class index."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    class_names: list[str]
    description: str = ""
    # Images a seeded split kept on the side of an identical one (see data/splits.py).
    copies_kept_together: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def concatenate(first: ImageSet, second: ImageSet) -> ImageSet:
    """Join two image sets that share a class index."""
    if first.class_names != second.class_names:
        raise ValueError("cannot join image sets with different class names")
    return ImageSet(
        np.concatenate([first.images, second.images]),
        np.concatenate([first.labels, second.labels]),
        first.class_names,
        list(first.paths) + list(second.paths),
    )
