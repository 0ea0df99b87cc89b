"""From a DataConfig to train/validation/test image sets: pick the source, decode, split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.cache import load_images
from cnnkit.data.dataset import DataSplits, ImageSet, concatenate
from cnnkit.data.listings import limit_listing, list_samples_cached
from cnnkit.data.registry import create_source
from cnnkit.data.source import Listing
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
    # Whether the data marks its own test split (a fold, split folders or column, CUB's file)
    # rather than a seeded test_fraction drawing it.
    split_given: bool = False


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
    where = config.data or config.dataset
    source = create_source(config)
    listing = list_samples_cached(source, cache_dir)
    listing = limit_listing(listing, config.max_classes, config.max_per_class)
    if not listing.records:
        raise ValueError(f"{where}: the dataset lists no images")
    decoded = load_images(source, listing, preprocessing, cache_dir, progress=progress)
    _check_bad_images(decoded.problems, config.on_bad_image)
    valid = np.flatnonzero(decoded.valid)
    labels = _labels_of(listing, valid)
    _check_every_class_is_left(listing, labels, where)
    indices = _split_indices(config, listing, decoded.images, valid, labels, for_training)
    train = _image_set(decoded.images, listing, indices.train)
    test = _image_set(decoded.images, listing, indices.test)
    if config.train_on_all:
        train = concatenate(train, test)
    _check_split_sizes(train, test, config, indices, for_training)
    _warn_of_untrained_classes(train, test, listing, where)
    val = _image_set(decoded.images, listing, indices.val) if len(indices.val) else None
    skipped = f", {len(decoded.problems)} bad image(s) skipped" if decoded.problems else ""
    description = (
        f"{listing.description}: {len(train):,} train, {len(val) if val else 0:,} val, "
        f"{len(test):,} test{skipped}"
    )
    return LoadedData(
        DataSplits(train, val, test, listing.class_names, description, indices.copies),
        decoded.problems,
        decoded.from_cache,
        indices.has_split_column,
    )


@dataclass(frozen=True)
class _SplitIndices:
    """Where each split's images lie in the listing, and what shaped the split.

    Attributes:
        train, val, test: listing positions ``[N]`` of each split's images.
        copies: images a seeded split kept with an identical one.
        has_split_column: whether the listing marks each image's split (a CSV column, a fold,
            an official split) instead of a seeded split drawing the test set.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    copies: int
    has_split_column: bool


def _labels_of(listing: Listing, indices: np.ndarray) -> np.ndarray:
    """The labels ``[N]`` of the listing's images at ``indices``."""
    return np.array([listing.records[i].label for i in indices], dtype=np.int64)


def _image_set(images: np.ndarray, listing: Listing, indices: np.ndarray) -> ImageSet:
    paths = [listing.records[i].key for i in indices]
    subset = images[indices] if len(indices) else images[:0]
    return ImageSet(
        np.ascontiguousarray(subset), _labels_of(listing, indices), listing.class_names, paths
    )


def _check_bad_images(problems: list[str], on_bad_image: str) -> None:
    """Raise for bad images under ``on_bad_image="error"``; otherwise log each one skipped.

    Raises:
        BadDataError: naming the first ten problems.
    """
    if problems and on_bad_image == "error":
        shown = "\n  ".join(problems[:10])
        more = len(problems) - 10
        raise BadDataError(
            f"{len(problems)} bad image(s) (use --on-bad-image skip to leave them out):"
            f"\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        )
    for problem in problems:
        logger.warning("skipped %s", problem)


def _check_every_class_is_left(listing: Listing, labels: np.ndarray, where: str) -> None:
    """Raise unless every class keeps a readable image once bad ones are skipped.

    Raises:
        ValueError: naming up to five classes whose images were all bad.
    """
    empty = sorted(set(range(len(listing.class_names))) - set(labels.tolist()))
    if empty:
        # Every image of these classes was bad and skipped: a model would learn a class it
        # has never seen.
        names = ", ".join(listing.class_names[i] for i in empty[:5])
        raise ValueError(
            f"{where}: {len(empty)} class(es) have no readable image "
            f"left after skipping bad files ({names}); fix or remove them"
        )


def _split_indices(
    config: DataConfig,
    listing: Listing,
    images: np.ndarray,
    valid: np.ndarray,
    labels: np.ndarray,
    for_training: bool,
) -> _SplitIndices:
    """Split the readable images at ``valid`` (labelled ``labels``) into train, validation
    and test positions.

    The listing's own split marks choose the test set where there are any; otherwise it is a
    seeded, stratified ``test_fraction``. The validation set is drawn from the training set.
    """
    splits = np.array([listing.records[i].split for i in valid], dtype=object)
    has_split_column = any(split is not None for split in splits)  # CSV column, fold, official
    # Identical images stay on one side of each random split (see duplicate_groups).
    where = config.data or config.dataset
    copies = 0  # Images a seeded split kept with an identical one.
    if has_split_column:
        train_idx = valid[splits == "train"]
        test_idx = valid[splits == "test"]
    else:
        groups, copies = _duplicate_groups(images, valid, where)
        _warn_of_copies_with_other_labels(listing, valid, groups, config)
        first, second = stratified_split(labels, config.test_fraction, config.seed, groups)
        train_idx, test_idx = valid[first], valid[second]
    val_idx = np.zeros(0, dtype=np.int64)
    if config.val_fraction > 0 and not config.train_on_all:
        train_idx, val_idx, copies = _validation_split(
            config, listing, images, train_idx, copies, for_training, has_split_column
        )
    return _SplitIndices(train_idx, val_idx, test_idx, copies, has_split_column)


def _validation_split(
    config: DataConfig,
    listing: Listing,
    images: np.ndarray,
    train_idx: np.ndarray,
    copies: int,
    for_training: bool,
    first_look: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw a seeded, stratified ``val_fraction`` of the training positions ``train_idx``
    (``first_look``: the first time the training images are compared, so copies with other
    labels are reported here).

    Returns:
        The training and validation positions, and the larger of ``copies`` and the copies
        among the training images.
    """
    where = config.data or config.dataset
    train_labels = _labels_of(listing, train_idx)
    train_groups, train_copies = _duplicate_groups(images, train_idx, where)
    if first_look:
        _warn_of_copies_with_other_labels(listing, train_idx, train_groups, config)
    copies = max(copies, train_copies)
    keep, held = stratified_split(train_labels, config.val_fraction, config.seed + 1, train_groups)
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
    return train_idx, val_idx, copies


def _check_split_sizes(
    train: ImageSet,
    test: ImageSet,
    config: DataConfig,
    indices: _SplitIndices,
    for_training: bool,
) -> None:
    """Raise for an empty training split, or an empty test split when training.

    Raises:
        ValueError: saying why the split came out empty and what to change.
    """
    where = config.data or config.dataset
    if len(train) == 0:
        raise ValueError(f"{where}: the training split is empty")
    if len(test) == 0 and for_training:
        copies = indices.copies
        reason = (
            "none of its images is marked for the test split"
            if indices.has_split_column
            else "a test share of 0 holds no images: give --test-fraction above 0"
            if config.test_fraction == 0
            else f"too few images per class for a test share of {config.test_fraction:g}"
            f"{_copies_note(copies)}: raise --test-fraction or --max-per-class"
            + (", or add distinct images, or give a split column" if copies else "")
        )
        raise ValueError(f"{where}: the test split is empty ({reason})")


def _warn_of_untrained_classes(
    train: ImageSet, test: ImageSet, listing: Listing, where: str
) -> None:
    """Log the classes that have test images but no training image to learn them from."""
    untrained = sorted(set(test.labels.tolist()) - set(train.labels.tolist()))
    if untrained:
        names = ", ".join(listing.class_names[i] for i in untrained[:5])
        more = f" and {len(untrained) - 5} more" if len(untrained) > 5 else ""
        logger.warning(
            "%s: %d class(es) have test images but no training image, so the model cannot "
            "learn them: %s%s",
            where,
            len(untrained),
            names,
            more,
        )


def _copies_note(copies: int) -> str:
    """Why a seeded split may come out smaller than its share: copies go together."""
    if not copies:
        return ""
    return (
        f"; {copies} image(s) are copies of others, and each set of copies counts as one image "
        "in the split"
    )


# Published datasets whose labels their users cannot change: HASYv2 holds about a hundred
# identical images under two LaTeX commands (\sum and \Sigma drawn alike).
_PUBLISHED = ("hasy", "cub", "digits")


def _warn_of_copies_with_other_labels(
    listing: Listing, indices: np.ndarray, groups: np.ndarray, config: DataConfig
) -> None:
    """Warn where identical images (one ``groups`` id) carry different labels: the same file
    in two class folders, or a mislabelled copy. No network can give both answers. For a
    published dataset it is only logged (``-v``)."""
    where = config.data or config.dataset
    labels = _labels_of(listing, indices)
    if len(labels) == 0:
        return
    # Sorted by group, then label: a group's first and last labels differ where it mixes.
    order = np.lexsort((labels, groups))
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1]
    ends = np.r_[starts[1:], len(order)] - 1
    mixed = np.flatnonzero(labels[order[starts]] != labels[order[ends]])
    if len(mixed) == 0:
        return
    pair = (order[starts[mixed[0]]], order[ends[mixed[0]]])
    shown = " and ".join(
        f"{listing.records[indices[i]].key} ({listing.class_names[labels[i]]})" for i in pair
    )
    log = logger.info if config.dataset in _PUBLISHED else logger.warning
    log(
        "%s: %d set(s) of identical images carry different labels, such as %s; a model "
        "cannot give both answers, so check those labels",
        where,
        len(mixed),
        shown,
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
