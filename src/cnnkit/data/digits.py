"""The embedded default: scikit-learn's handwritten digits, drawn black on white like HASYv2.

The 1,797 8x8 scans ship inside scikit-learn, so the demo never downloads anything. They are
served as in-memory PNGs, which sends them through the same decode path as every other source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cnnkit.data.source import Listing, SampleRecord


def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797 x 8 x 8 grey levels 0-16, labels), as ``load_digits``
    gives them.

    The file is read where scikit-learn keeps it, without importing scikit-learn, whose import
    takes one to three seconds of every command that trains on the digits; ``load_digits``
    itself is the fallback where the file is not there.
    """
    spec = importlib.util.find_spec("sklearn")
    origin = spec.origin if spec else None
    path = Path(origin).parent / "datasets" / "data" / "digits.csv.gz" if origin else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def ink_counts_to_pixels(counts: np.ndarray) -> np.ndarray:
    """The digits' ink counts (0-16 a pixel) as uint8 grey levels, black ink on white as in
    HASYv2 (16, full ink, is 0)."""
    return (255 - counts * (255 / 16)).round().astype(np.uint8)


class DigitsSource:
    """scikit-learn's ``load_digits``: 10 classes, 8x8 grey levels 0-16, upscaled at decode."""

    def __init__(self) -> None:
        images, labels = load_digit_scans()
        self._arrays = ink_counts_to_pixels(images)
        self._labels = labels.astype(np.int64)

    def list_samples(self) -> Listing:
        records = [
            SampleRecord(key=f"digit-{index:04d}.png", label=int(label), origin="sklearn")
            for index, label in enumerate(self._labels)
        ]
        fingerprint = hashlib.sha256(self._arrays.tobytes()).hexdigest()[:16]
        return Listing(
            records,
            [str(digit) for digit in range(10)],
            f"digits-{fingerprint}",
            "scikit-learn handwritten digits (1,797 images, 10 classes)",
        )

    def iter_bytes(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        for key in keys:
            index = int(key.removeprefix("digit-").removesuffix(".png"))
            buffer = io.BytesIO()
            Image.fromarray(self._arrays[index], mode="L").save(buffer, format="PNG")
            yield key, buffer.getvalue()

    def image(self, index: int) -> Image.Image:
        """The raw 8x8 scan ``index`` as a PIL image (for demos and tests)."""
        return Image.fromarray(self._arrays[index], mode="L")
