"""Telling a dataset of colour photos from one of symbol-like images, from a few of its files,
so that the CLI can pick a model that suits them."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from cnnkit.data.image import BadImageError, read_image_file

PHOTO_MIN_SIDE = 48  # HASYv2 symbols are 32 px, MNIST 28, scikit-learn's digits 8.


def _sample_image_paths(dataset: str, data: str, count: int) -> list[Path]:
    """Up to ``count`` image files of a folder (one per class first) or a CSV (its first rows),
    found without listing the whole dataset."""
    if dataset == "folder":
        from cnnkit.data.folder import walk_images

        root = Path(data)
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        found = [
            [class_dir / key for key in walk_images(str(class_dir), [], limit=count)]
            for class_dir in classes[:count]
        ]
        # Round-robin over the classes: the first image of each, then the second...
        return [p for row in itertools.zip_longest(*found) for p in row if p][:count]
    from cnnkit.data.csv_source import CsvSource, iter_csv_rows
    from cnnkit.data.files import read_regular_file

    source = CsvSource(data)
    # Not read_bytes: a FIFO (``--data <(grep ...)``) would block here forever.
    rows = iter_csv_rows(read_regular_file(source.csv_path), data, ("path", "label"))
    paths = (source.file_of(fields[0], line) for line, fields in rows if fields[0])
    return list(itertools.islice(paths, count))


def looks_like_photos(dataset: str, data: str, samples: int = 8) -> tuple[bool, str]:
    """Whether a folder or CSV dataset holds colour photos rather than symbol-like images.

    Reads up to ``samples`` images (one per class first, without listing the whole dataset).
    Photos are images whose shorter side is at least :data:`PHOTO_MIN_SIDE` pixels and that have
    colour in them; at least half of the sampled images must read, and the verdict follows the
    majority.

    Returns:
        The verdict and a short description of what was seen (``"8 images, median 500x375,
        colour"``). Unreadable datasets give ``(False, "")``: training reports their problems.
    """
    try:
        paths = _sample_image_paths(dataset, data, samples)
    except (ValueError, OSError):
        return False, ""
    sizes, colourful = [], 0
    for path in paths:
        try:
            image = read_image_file(str(path))
        except BadImageError:
            continue
        sizes.append(image.size)
        small = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.int16)
        colourful += bool(np.abs(small - small.mean(axis=2, keepdims=True)).mean() > 8)
    if not sizes or len(sizes) * 2 < len(paths):
        return False, ""
    width, height = (int(np.median([size[i] for size in sizes])) for i in (0, 1))
    colour = colourful * 2 > len(sizes)
    photos = min(width, height) >= PHOTO_MIN_SIDE and colour
    return photos, f"{len(sizes)} images, median {width}x{height}, {'colour' if colour else 'grey'}"
