"""The embedded digits: read from scikit-learn's data file, the same scans as ``load_digits``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from sklearn.datasets import load_digits

from cnnkit.data import digits as digits_module
from cnnkit.data.digits import DigitsSource, load_digit_scans


def test_the_scans_are_load_digits_own() -> None:
    images, labels = load_digit_scans()
    reference = load_digits()
    assert images.shape == (1797, 8, 8) and labels.dtype == np.int64
    assert np.array_equal(images, reference.images)
    assert np.array_equal(labels, reference.target)


def test_without_the_data_file_load_digits_gives_the_same_scans(monkeypatch) -> None:
    monkeypatch.setattr(digits_module.importlib.util, "find_spec", lambda name: None)
    images, labels = load_digit_scans()
    assert np.array_equal(images, load_digits().images)
    assert np.array_equal(labels, load_digits().target)


def test_the_source_does_not_import_scikit_learn() -> None:
    """Reading the file directly saves every digits command scikit-learn's import."""
    code = (
        "import sys; from cnnkit.data.digits import DigitsSource; "
        "source = DigitsSource(); print(len(source.list_samples().records)); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1797", "False"]


def test_strokes_are_black_on_white() -> None:
    source = DigitsSource()
    scan = np.asarray(source.image(0))
    assert scan.shape == (8, 8) and scan.dtype == np.uint8
    assert scan.max() == 255  # Paper (no ink in the corner) is white.
    assert scan[0, 0] == 255 and scan.min() < 64  # Full ink is near black.
