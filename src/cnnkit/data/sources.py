"""From a DataConfig to train/validation/test image sets: pick the source, decode, split."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.atomic import write_atomically
from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.cache import load_images
from cnnkit.data.dataset import DataSplits, ImageSet, concatenate
from cnnkit.data.image import BadImageError, read_image_file
from cnnkit.data.source import Listing, SampleRecord, Source, encode_name
from cnnkit.data.splits import duplicate_groups, stratified_split

logger = logging.getLogger(__name__)


class BadDataError(ValueError):
    """Images that could not be used while ``on_bad_image`` is ``error``."""


@dataclass
class LoadedData:
    """The splits of a run plus what went wrong while loading them."""

    splits: DataSplits
    problems: list[str]
    from_cache: bool


def create_source(config: DataConfig) -> Source:
    """Build the source named by ``config.dataset``."""
    factories: dict[str, Callable[[], Source]] = {
        "digits": lambda: _digits(),
        "hasy": lambda: _hasy(config),
        "folder": lambda: _folder(config),
        "csv": lambda: _csv(config),
        "cub": lambda: _cub(config),
    }
    return factories[config.dataset]()


def _digits() -> Source:
    from cnnkit.data.digits import DigitsSource

    return DigitsSource()


def _hasy(config: DataConfig) -> Source:
    from cnnkit.data.hasy import HasySource

    return HasySource(config.data, fold=config.fold)


def _folder(config: DataConfig) -> Source:
    from cnnkit.data.folder import FolderSource

    return FolderSource(config.data)


def _csv(config: DataConfig) -> Source:
    from cnnkit.data.csv_source import CsvSource

    return CsvSource(config.data)


def _cub(config: DataConfig) -> Source:
    from cnnkit.data.cub import CubSource

    return CubSource(config.data, crop_to_bbox=config.crop_to_bbox)


def list_samples_cached(source: Source, cache_dir: str | Path | None) -> Listing:
    """``source.list_samples()``, remembered on disk for sources that offer ``cache_token()``.

    Archive sources must decompress the whole archive to reach their label files (HASYv2's come
    last), so a second run reads the listing from ``cache_dir/listings`` instead.
    """
    token_of = getattr(source, "cache_token", None)
    token = token_of() if token_of else None
    if cache_dir is None or token is None:
        return source.list_samples()
    name = hashlib.sha256(encode_name(token)).hexdigest()[:24]
    path = Path(cache_dir) / "listings" / f"{name}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records = [
                SampleRecord(key, label, split, origin, tuple(box) if box else None)
                for key, label, split, origin, box in data["records"]
            ]
            return Listing(records, data["class_names"], data["fingerprint"], data["description"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring unreadable listing cache %s: %s", path, error)
    listing = source.list_samples()
    payload = {
        "records": [[r.key, r.label, r.split, r.origin, r.box] for r in listing.records],
        "class_names": listing.class_names,
        "fingerprint": listing.fingerprint,
        "description": listing.description,
    }
    # ASCII escapes keep a key that came from a non-UTF-8 file name (a surrogate) writable.
    text = json.dumps(payload)
    try:
        write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    except OSError as error:
        logger.warning("could not write the listing cache %s: %s", path, error)
    return listing


def limit_listing(listing: Listing, max_classes: int | None, max_per_class: int | None) -> Listing:
    """Keep the first ``max_classes`` classes and at most ``max_per_class`` images of each."""
    if max_classes is None and max_per_class is None:
        return listing
    num_classes = len(listing.class_names)
    keep = set(range(min(max_classes or num_classes, num_classes)))
    counts: dict[tuple[int, str | None], int] = {}
    records: list[SampleRecord] = []
    for record in listing.records:
        if record.label not in keep:
            continue
        bucket = (record.label, record.split)
        counts[bucket] = counts.get(bucket, 0) + 1
        if max_per_class is not None and counts[bucket] > max_per_class:
            continue
        records.append(record)
    class_names = [listing.class_names[i] for i in sorted(keep)]
    return Listing(
        records,
        class_names,
        f"{listing.fingerprint}|classes={max_classes}|per_class={max_per_class}",
        f"{listing.description}, {len(records):,} images of {len(class_names):,} "
        f"{'class' if len(class_names) == 1 else 'classes'} kept",
    )


def _image_set(images: np.ndarray, listing: Listing, indices: np.ndarray) -> ImageSet:
    labels = np.array([listing.records[i].label for i in indices], dtype=np.int64)
    paths = [listing.records[i].key for i in indices]
    subset = images[indices] if len(indices) else images[:0]
    return ImageSet(np.ascontiguousarray(subset), labels, listing.class_names, paths)


def build_splits(
    config: DataConfig,
    preprocessing: Preprocessing,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    for_training: bool = True,
) -> LoadedData:
    """Load the dataset described by ``config`` and split it.

    Official splits (a HASYv2 fold, CUB's train/test file) are used when present; otherwise the
    test set is a seeded, stratified ``test_fraction``. The validation set is a seeded,
    stratified ``val_fraction`` of the training set. ``for_training=False`` is for uses that
    only read the training images (int8 calibration): empty test and validation splits are
    then no concern.

    Raises:
        BadDataError: if images are bad and ``config.on_bad_image`` is ``"error"``.
        ValueError: if the source is malformed or a split ends up empty.
    """
    source = create_source(config)
    listing = list_samples_cached(source, cache_dir)
    listing = limit_listing(listing, config.max_classes, config.max_per_class)
    if not listing.records:
        raise ValueError(f"{config.data or config.dataset}: the dataset lists no images")
    decoded = load_images(source, listing, preprocessing, cache_dir, progress=progress)
    if decoded.problems and config.on_bad_image == "error":
        shown = "\n  ".join(decoded.problems[:10])
        more = len(decoded.problems) - 10
        raise BadDataError(
            f"{len(decoded.problems)} bad image(s) (use --on-bad-image skip to leave them out):"
            f"\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        )
    for problem in decoded.problems:
        logger.warning("skipped %s", problem)
    valid = np.flatnonzero(decoded.valid)
    splits = np.array([listing.records[i].split for i in valid], dtype=object)
    labels = np.array([listing.records[i].label for i in valid], dtype=np.int64)
    empty = sorted(set(range(len(listing.class_names))) - set(labels.tolist()))
    if empty:
        # Every image of these classes was bad and skipped: a model would learn a class it
        # has never seen.
        names = ", ".join(listing.class_names[i] for i in empty[:5])
        raise ValueError(
            f"{config.data or config.dataset}: {len(empty)} class(es) have no readable image "
            f"left after skipping bad files ({names}); fix or remove them"
        )
    has_split_column = any(split is not None for split in splits)  # CSV column, fold, official
    # Identical images stay on one side of each random split (see duplicate_groups).
    where = config.data or config.dataset
    copies = 0  # Images a seeded split kept with an identical one.
    if has_split_column:
        train_idx = valid[splits == "train"]
        test_idx = valid[splits == "test"]
    else:
        groups, copies = _duplicate_groups(decoded.images, valid, where)
        first, second = stratified_split(labels, config.test_fraction, config.seed, groups)
        train_idx, test_idx = valid[first], valid[second]
    val_idx = np.zeros(0, dtype=np.int64)
    if config.val_fraction > 0 and not config.train_on_all:
        train_labels = np.array([listing.records[i].label for i in train_idx], dtype=np.int64)
        train_groups, train_copies = _duplicate_groups(decoded.images, train_idx, where)
        copies = max(copies, train_copies)
        keep, held = stratified_split(
            train_labels, config.val_fraction, config.seed + 1, train_groups
        )
        train_idx, val_idx = train_idx[keep], train_idx[held]
        if len(val_idx) == 0 and for_training:
            logger.warning(
                "%s: the validation split is empty (a share of %g of %d training images%s): "
                "the run has no validation figures and no early stopping",
                where,
                config.val_fraction,
                len(train_idx),
                _copies_note(copies),
            )
    train = _image_set(decoded.images, listing, train_idx)
    test = _image_set(decoded.images, listing, test_idx)
    if config.train_on_all:
        train = concatenate(train, test)
    source = config.data or config.dataset
    if len(train) == 0:
        raise ValueError(f"{source}: the training split is empty")
    if len(test) == 0 and for_training:
        reason = (
            "none of its images is marked for the test split"
            if has_split_column
            else "a test share of 0 holds no images: give --test-fraction above 0"
            if config.test_fraction == 0
            else f"too few images per class for a test share of {config.test_fraction:g}"
            f"{_copies_note(copies)}: raise --test-fraction or --max-per-class"
            + (", or add distinct images, or give a split column" if copies else "")
        )
        raise ValueError(f"{source}: the test split is empty ({reason})")
    untrained = sorted(set(test.labels.tolist()) - set(train.labels.tolist()))
    if untrained:
        names = ", ".join(listing.class_names[i] for i in untrained[:5])
        more = f" and {len(untrained) - 5} more" if len(untrained) > 5 else ""
        logger.warning(
            "%s: %d class(es) have test images but no training image, so the model cannot "
            "learn them: %s%s",
            source,
            len(untrained),
            names,
            more,
        )
    val = _image_set(decoded.images, listing, val_idx) if len(val_idx) else None
    skipped = f", {len(decoded.problems)} bad image(s) skipped" if decoded.problems else ""
    description = (
        f"{listing.description}: {len(train):,} train, {len(val) if val else 0:,} val, "
        f"{len(test):,} test{skipped}"
    )
    return LoadedData(
        DataSplits(train, val, test, listing.class_names, description, copies),
        decoded.problems,
        decoded.from_cache,
    )


def _copies_note(copies: int) -> str:
    """Why a seeded split may come out smaller than its share: copies go together."""
    if not copies:
        return ""
    return (
        f"; {copies} image(s) are copies of others, and each set of copies counts as one image "
        "in the split"
    )


def _duplicate_groups(
    images: np.ndarray, indices: np.ndarray, where: str
) -> tuple[np.ndarray, int]:
    """Group ids of ``images[indices]`` (positions in ``indices``) and how many images are
    copies of an earlier one, logging that count."""
    groups = duplicate_groups(images, indices)
    duplicates = len(groups) - len(np.unique(groups))
    if duplicates:
        logger.info(
            "%s: %d image(s) repeat another pixel for pixel; each set of copies is kept in one "
            "split",
            where,
            duplicates,
        )
    return groups, duplicates


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
    from cnnkit.data.csv_source import iter_csv_rows
    from cnnkit.data.files import read_regular_file

    csv_path = Path(data)
    # Not read_bytes: a FIFO (``--data <(grep ...)``) would block here forever.
    rows = iter_csv_rows(read_regular_file(csv_path), str(csv_path), ("path", "label"))
    paths = (csv_path.parent / fields[0] for _, fields in rows if fields[0])
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
