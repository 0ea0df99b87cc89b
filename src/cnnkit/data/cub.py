"""CUB-200-2011 bird photos, read from the official archive (streamed) or an extracted folder."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from cnnkit.data.archive import DatasetFiles, parse_integer, relative_key
from cnnkit.data.csv_source import decode_text
from cnnkit.data.folder import fingerprint_files
from cnnkit.data.source import DataFormatError, Listing, ReadError, SampleRecord, encode_name

IMAGES_FILE = "images.txt"
LABELS_FILE = "image_class_labels.txt"
SPLIT_FILE = "train_test_split.txt"
CLASSES_FILE = "classes.txt"
BOXES_FILE = "bounding_boxes.txt"
_SPLITS = {"1": "train", "0": "test"}

Table = dict[int, tuple[int, list[str]]]


def species_name(folder_name: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black footed Albatross"``."""
    return re.sub(r"^\d+\.", "", folder_name).replace("_", " ").strip()


def read_table(data: bytes, name: str, num_values: int) -> Table:
    """Parse ``<id> <value> ...`` lines into ``{id: (line, values)}``.

    The last value takes the rest of the line, so image paths may hold spaces.

    Raises:
        DataFormatError: for a short line, a non-integer or repeated id, naming file and line.
    """
    table: Table = {}
    for line, text in enumerate(decode_text(data, name).splitlines(), start=1):
        if not text.strip():
            continue
        parts = text.strip().split(maxsplit=num_values)  # A trailing tab or space is no value.
        if len(parts) != num_values + 1:
            raise DataFormatError(
                f"{name}:{line}: expected an id and {num_values} value(s), found {text!r}"
            )
        identifier = parse_integer(parts[0], name, line, "id")
        if identifier in table:
            first = table[identifier][0]
            raise DataFormatError(f"{name}:{line}: id {identifier} repeats line {first}")
        table[identifier] = (line, parts[1:])
    return table


def _check_same_images(images: Table, other: Table, other_name: str) -> None:
    for identifier, (line, _) in other.items():
        if identifier not in images:
            raise DataFormatError(
                f"{other_name}:{line}: image id {identifier} is not in {IMAGES_FILE}"
            )
    for identifier, (line, _) in images.items():
        if identifier not in other:
            raise DataFormatError(
                f"{IMAGES_FILE}:{line}: image id {identifier} has no line in {other_name}"
            )


def _box(values: list[str], line: int) -> tuple[float, float, float, float]:
    try:
        x, y, width, height = (float(value) for value in values)
    except ValueError:
        raise DataFormatError(f"{BOXES_FILE}:{line}: expected 4 numbers, got {values}") from None
    if width <= 0 or height <= 0 or x < 0 or y < 0:
        raise DataFormatError(f"{BOXES_FILE}:{line}: invalid box {values}")
    return x, y, width, height


class CubSource:
    """CUB-200-2011: ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt`` and
    ``classes.txt`` (plus ``bounding_boxes.txt`` when cropping).

    ``path`` is ``CUB_200_2011.tgz``, streamed without extracting, or the extracted folder (with
    or without the top ``CUB_200_2011/`` folder). Class names are the species without the
    ``NNN.`` prefix and with spaces for underscores, in ``classes.txt`` id order; only classes
    with images are kept, relabelled ``0..K-1``. Splits follow ``train_test_split.txt``.

    Args:
        path: the archive or folder.
        crop_to_bbox: crop each photo to its bounding box before preprocessing.
    """

    def __init__(self, path: str | Path, crop_to_bbox: bool = False) -> None:
        self.path = Path(path)
        self.crop_to_bbox = crop_to_bbox
        self._files = DatasetFiles(path, IMAGES_FILE)
        self._listing: Listing | None = None

    def _classes(self, files: dict[str, bytes], labels: Table) -> tuple[list[str], dict[int, int]]:
        """Return the names of the classes that have images and the dense label of each id."""
        classes = read_table(files[CLASSES_FILE], CLASSES_FILE, 1)
        used: set[int] = set()
        for line, (class_id,) in labels.values():
            number = parse_integer(class_id, LABELS_FILE, line, "class id")
            if number not in classes:
                raise DataFormatError(
                    f"{LABELS_FILE}:{line}: class id {number} is not in {CLASSES_FILE}"
                )
            used.add(number)
        ordered = sorted(used)
        names = [species_name(classes[number][1][0]) for number in ordered]
        if len(set(names)) != len(names):
            raise DataFormatError(f"{CLASSES_FILE}: two classes share a species name")
        return names, {number: label for label, number in enumerate(ordered)}

    def _build_listing(self) -> Listing:
        required = [IMAGES_FILE, LABELS_FILE, SPLIT_FILE, CLASSES_FILE]
        required += [BOXES_FILE] if self.crop_to_bbox else []
        files = self._files.read_metadata(required)
        images = read_table(files[IMAGES_FILE], IMAGES_FILE, 1)
        labels = read_table(files[LABELS_FILE], LABELS_FILE, 1)
        splits = read_table(files[SPLIT_FILE], SPLIT_FILE, 1)
        boxes = read_table(files[BOXES_FILE], BOXES_FILE, 4) if self.crop_to_bbox else None
        for name, table in ((LABELS_FILE, labels), (SPLIT_FILE, splits), (BOXES_FILE, boxes)):
            if table is not None:
                _check_same_images(images, table, name)
        class_names, dense = self._classes(files, labels)
        records = []
        for identifier in sorted(images):
            line, (path,) = images[identifier]
            split_line, (flag,) = splits[identifier]
            if flag not in _SPLITS:
                raise DataFormatError(f"{SPLIT_FILE}:{split_line}: expected 1 or 0, got {flag!r}")
            box = _box(boxes[identifier][1], boxes[identifier][0]) if boxes is not None else None
            key = relative_key(f"images/{path}", IMAGES_FILE, line)
            label = dense[int(labels[identifier][1][0])]
            records.append(SampleRecord(key, label, _SPLITS[flag], f"{IMAGES_FILE}:{line}", box))
        digest = hashlib.sha256(encode_name(self._files.identity()))
        for file in required:
            digest.update(files[file] + b"\0")
        if self._files.folder is not None:
            keys = (record.key for record in records)
            missing: set[str] = set()
            digest.update(fingerprint_files(self._files.folder, keys, missing).encode())
            self._files.absent = frozenset(missing)
        return Listing(
            records,
            class_names,
            f"cub-{digest.hexdigest()[:16]}",
            f"CUB-200-2011 ({len(records):,} images, {len(class_names):,} classes)",
        )

    def cache_token(self) -> str | None:
        """A string that changes whenever :meth:`list_samples` would, found without reading.

        For an archive: its path, size and time plus the crop setting; None for a folder.
        """
        token = self._files.archive_token()
        return None if token is None else f"cub|{token}|crop={self.crop_to_bbox}"

    def list_samples(self) -> Listing:
        """Read the metadata files; the result is kept on the instance.

        Raises:
            DataFormatError: for a missing or malformed file, or images that the files do not
                all list, naming file and line.
        """
        if self._listing is None:
            self._listing = self._build_listing()
        listing = self._listing
        return Listing(
            list(listing.records),
            list(listing.class_names),
            listing.fingerprint,
            listing.description,
        )

    def iter_bytes(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes | ReadError]]:
        """Yield the JPEG bytes of ``keys``; keys absent from an archive are not yielded."""
        if self._listing is None:
            self.list_samples()
        yield from self._files.iter_bytes(keys)
