"""Fuzz the image decoder and the label-file readers; count what was handled, crashes and hangs.

Usage: ``python -m benchmarks.robustness [--seed 0] [--per-category 200] [--timeout 60]``.
Each category generates ``--per-category`` inputs and runs each one through the public entry
points: images through ``prepare_bytes`` (symbol and photo preprocessing) and
``read_image_file``; label files and datasets through ``build_splits`` with
``on_bad_image="skip"`` and ``"error"``. An input is *handled* when it decodes or loads
(*decoded*), or when the library raises its own error type naming the file, and the line for a
CSV, or skips it as asked (*reported*). A *crash* is any other exception or a wrong outcome: an
escaping path that is not refused, a bad image not reported, a valid CSV rejected. A *hang* is
an input still running after ``--timeout`` seconds; each input runs in a worker process that is
then killed and replaced. Needs no data from ``../shared``. Hypothesis drives the matching
tests (``tests/unit/test_fuzz.py``); atheris is not used (it is not installed here).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import multiprocessing
import os
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.record import record_result
from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.image import BadImageError, read_image_file
from cnnkit.data.prepare import prepare_bytes
from cnnkit.data.source import DataFormatError
from cnnkit.data.sources import BadDataError, LoadedData, build_splits

FORMATS = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
}
MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "GIF": ("L", "P"),
    "BMP": ("1", "L", "P", "RGB"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "F"),
    "WEBP": ("RGB", "RGBA"),
}
EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".webp", ".PNG", ".JPG")
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\0", b"RIFF\0\0\0\0WEBP")
NUM_IMAGES = 8
SYMBOL = Preprocessing()
PHOTO = Preprocessing("photo", 3, 32, 32, (0.5,) * 3, (0.5,) * 3)
WORKER_MEMORY_BYTES = 6 * 2**30


# ----------------------------------------------------------------------------- image inputs


def random_image(rng: random.Random, mode: str, max_side: int = 40) -> Image.Image:
    """Random pixels of ``mode`` and a random size."""
    width, height = rng.randint(1, max_side), rng.randint(1, max_side)
    pixels = np.random.default_rng(rng.getrandbits(32))
    if mode == "I;16":
        return Image.fromarray(pixels.integers(0, 65536, (height, width), dtype=np.uint16))
    array = pixels.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def valid_file(rng: random.Random, image_format: str | None = None) -> tuple[bytes, str]:
    """A valid image file of a random (or the given) format, and that format's extension."""
    image_format = image_format or rng.choice(list(FORMATS))
    image = random_image(rng, rng.choice(MODES[image_format]))
    options = {"JPEG": {"quality": rng.randint(5, 95), "progressive": rng.random() < 0.3}}
    options["PNG"] = {"optimize": rng.random() < 0.2}
    return encode(image, image_format, **options.get(image_format, {})), FORMATS[image_format]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Overwrite, flip, insert, delete or repeat a few bytes, or cut the end off."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(data))
        operation = rng.randrange(5)
        if operation == 0:
            data[position] = rng.randrange(256)
        elif operation == 1:
            data[position] ^= 1 << rng.randrange(8)
        elif operation == 2:
            data[position:position] = rng.randbytes(rng.randint(1, 16))
        elif operation == 3 and len(data) > 2:
            del data[position : position + rng.randint(1, 16)]
        else:
            data[position:position] = data[position : position + rng.randint(1, 64)]
    return bytes(data[: rng.randint(1, len(data))] if rng.random() < 0.2 else data)


def png_file(width: int, height: int, depth: int, color_type: int, pixels: bytes) -> bytes:
    """A PNG with a valid IHDR and CRCs around the given (possibly too short) pixel rows."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(pixels))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def huge_header(rng: random.Random) -> tuple[bytes, str]:
    """A small file whose header declares a huge (or a very thin) image."""
    side = lambda: rng.choice([1, 2, rng.randint(1, 70_000), rng.randint(1, 2**31 - 1)])  # noqa: E731
    width, height = side(), side()
    kind = rng.randrange(6)
    if kind == 0:
        return png_file(width, height, 8, 0, b"\0" * 64), ".png"
    if kind == 1:
        width, height = width % 65536 or 1, height % 65536 or 1
        screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
        descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00\x3b", ".gif"
    if kind == 2:
        height = rng.choice([height, -height]) if height < 2**31 else height
        info = struct.pack("<IiiHHIIiiII", 40, width % 2**31, height, 1, 8, 0, 0, 0, 0, 0, 0)
        return b"BM" + struct.pack("<IHHI", 1078, 0, 0, 1078) + info + bytes(1024), ".bmp"
    if kind == 3:
        tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
        tags += [(273, 4, 8 + 2 + 12 * 8 + 4), (278, 4, height), (279, 4, 16)]
        entries = b"".join(struct.pack("<HHII", tag, kind_, 1, value) for tag, kind_, value in tags)
        body = struct.pack("<H", len(tags)) + entries + b"\0\0\0\0"
        return b"II*\0" + struct.pack("<I", 8) + body + bytes(16), ".tif"
    if kind == 4:
        width, height = width % 65536 or 1, height % 65536 or 1
        data, _ = valid_file(rng, "JPEG")
        start = data.find(b"\xff\xc0") if b"\xff\xc0" in data else data.find(b"\xff\xc2")
        sof = bytearray(data)
        sof[start + 5 : start + 9] = struct.pack(">HH", height, width)
        return bytes(sof), ".jpg"
    # A real, valid thin strip: tiny on disk, within the pixel limit, extreme aspect ratio.
    length = rng.randint(1_000, 2_000_000)
    if rng.random() < 0.5:
        return png_file(1, length, 8, 0, b"\0\x80" * length), ".png"
    return png_file(length, 1, 8, 0, b"\0" + b"\x80" * length), ".png"


def sixteen_bit(rng: random.Random) -> tuple[bytes, str]:
    """16-bit PNG of every colour type, 16-bit TIFF, or a 16-bit PGM."""
    width, height = rng.randint(1, 40), rng.randint(1, 40)
    kind = rng.randrange(3)
    if kind == 0:
        color_type = rng.choice([0, 2, 4, 6])
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
        row = 1 + 2 * channels * width
        pixels = b"".join(b"\0" + rng.randbytes(row - 1) for _ in range(height))
        return png_file(width, height, 16, color_type, pixels), ".png"
    if kind == 1:
        return encode(random_image(rng, "I;16"), "TIFF"), ".tif"
    header = f"P5\n{width} {height}\n65535\n".encode()
    return header + rng.randbytes(2 * width * height), ".png"


def animated(rng: random.Random) -> tuple[bytes, str]:
    """An animated GIF, PNG or WebP of 2 to 6 frames, with odd disposal and transparency."""
    image_format = rng.choice(["GIF", "GIF", "PNG", "WEBP"])
    mode = {"GIF": "P", "PNG": "RGBA", "WEBP": "RGBA"}[image_format]
    first = random_image(rng, mode)
    frames = [random_image(rng, mode).resize(first.size) for _ in range(rng.randint(1, 5))]
    options: dict = {"save_all": True, "append_images": frames, "loop": rng.randint(0, 3)}
    options["duration"] = [rng.randint(0, 500) for _ in range(len(frames) + 1)]
    if image_format in ("GIF", "PNG"):
        options["disposal"] = rng.randint(0, 2 if image_format == "PNG" else 3)
    if image_format == "GIF" and rng.random() < 0.5:
        options["transparency"] = rng.randrange(256)
    return encode(first, image_format, **options), FORMATS[image_format]


def random_bytes(rng: random.Random) -> tuple[bytes, str]:
    tail = rng.randbytes(rng.choice([rng.randint(1, 16), rng.randint(1, 4096)]))
    return (rng.choice(MAGIC) if rng.random() < 0.5 else b"") + tail, rng.choice(EXTENSIONS)


def wrong_extension(rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.25:
        text = "".join(rng.choice("abc ,\n\r\t\u00e9\u2603") for _ in range(rng.randint(1, 200)))
        return text.encode(), rng.choice(EXTENSIONS)
    data, extension = valid_file(rng)
    others = [other for other in EXTENSIONS if other.lower() != extension]
    return data, rng.choice(others)


def truncated(image_format: str) -> Callable[[random.Random], tuple[bytes, str]]:
    def generate(rng: random.Random) -> tuple[bytes, str]:
        data, extension = valid_file(rng, image_format)
        return data[: rng.randint(1, len(data) - 1)], extension

    return generate


def mutated(*image_formats: str) -> Callable[[random.Random], tuple[bytes, str]]:
    def generate(rng: random.Random) -> tuple[bytes, str]:
        data, extension = valid_file(rng, rng.choice(image_formats))
        return mutate(rng, data), extension

    return generate


def cmyk(rng: random.Random) -> tuple[bytes, str]:
    image = random_image(rng, "CMYK")
    if rng.random() < 0.3:
        return encode(image, "TIFF"), ".tif"
    return encode(image, "JPEG", quality=rng.randint(5, 95), progressive=rng.random() < 0.3), ".jpg"


IMAGE_CATEGORIES: dict[str, Callable[[random.Random], tuple[bytes, str]]] = {
    "random bytes": random_bytes,
    "truncated PNG": truncated("PNG"),
    "truncated JPEG": truncated("JPEG"),
    "mutated PNG": mutated("PNG"),
    "mutated JPEG": mutated("JPEG"),
    "mutated GIF": mutated("GIF"),
    "mutated TIFF/BMP/WebP": mutated("TIFF", "BMP", "WEBP"),
    "wrong extension": wrong_extension,
    "zero-size": lambda rng: (b"", rng.choice(EXTENSIONS)),
    "huge dimensions": huge_header,
    "16-bit": sixteen_bit,
    "CMYK": cmyk,
    "animated GIF/PNG/WebP": animated,
}


# ----------------------------------------------------------------------------- label files


@dataclass
class LabelCase:
    """A ``labels.csv`` for the prepared dataset and what ``build_splits`` must do with it.

    ``expect`` is ``"load"`` (all ``NUM_IMAGES`` images), ``"error"`` (a DataFormatError at
    ``line`` whose message contains ``says``) or ``"any"``.
    """

    data: bytes
    expect: str
    line: int = 0
    says: str = ""


def image_path(rng: random.Random, index: int, root: Path) -> str:
    """One of many spellings of ``images/<index>.png`` relative to the CSV."""
    spellings = [f"images/{index}.png", f"./images/{index}.png", f"images//{index}.png"]
    spellings += [f"images/../images/{index}.png", str(root / "data" / "images" / f"{index}.png")]
    return rng.choice(spellings)


def csv_bytes(rng: random.Random, rows: list[list[str]], newline: str | None = None) -> bytes:
    """Rows as CSV with random quoting, line endings (possibly mixed) and an optional BOM."""
    quoting = rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
    buffer = io.StringIO()
    for row in rows:
        terminator = newline or rng.choice(["\n", "\r\n", "\r"])
        csv.writer(buffer, quoting=quoting, lineterminator=terminator).writerow(row)
    return (b"\xef\xbb\xbf" if rng.random() < 0.5 else b"") + buffer.getvalue().encode()


def labelled_rows(rng: random.Random, root: Path) -> list[list[str]]:
    class_names = rng.choice([("a", "b"), ("cat, big", 'dog "x"'), ("\u00e9t\u00e9", "\u96ea")])
    header = [["path", "label"], ["label", "path"], [" Path ", "LABEL", "note"]]
    rows = [rng.choice(header)]
    for index in range(NUM_IMAGES):
        path, label = image_path(rng, index, root), class_names[index % 2]
        row = {"path": path, "label": label, "note": rng.choice(["", "x,y", "\u2603"])}
        rows.append([row[column.strip().lower()] for column in rows[0]])
    return rows


def csv_quirks(rng: random.Random, root: Path) -> LabelCase:
    rows = labelled_rows(rng, root)
    for _ in range(rng.randint(0, 3)):
        rows.insert(rng.randint(1, len(rows)), rng.choice([[], [""], ["  ", " "]]))
    return LabelCase(csv_bytes(rng, rows), "load")


def csv_missing_columns(rng: random.Random, root: Path) -> LabelCase:
    rows = labelled_rows(rng, root)
    kind = rng.randrange(4)
    if kind == 0:
        rows[0] = [rng.choice(["file", "name", "class", "path label"]) for _ in rows[0]]
        return LabelCase(csv_bytes(rng, rows, "\n"), "error", 1)
    if kind == 1:
        position = rng.randint(1, len(rows) - 1)
        rows[position] = rows[position][: rng.randint(0, 1)] or ["x.png"]
        return LabelCase(csv_bytes(rng, rows, "\n"), "error", position + 1)
    if kind == 2:
        return LabelCase(csv_bytes(rng, rows[:1], "\n"), "any")
    return LabelCase(b"", "error", 1)


def csv_duplicates(rng: random.Random, root: Path) -> LabelCase:
    """Repeat rows under other spellings of the path; some repeats change the label."""
    rows = labelled_rows(rng, root)
    label_column = [column.strip().lower() for column in rows[0]].index("label")
    originals = list(rows[1:])
    tags = [(-1, "")] + [(index, row[label_column]) for index, row in enumerate(originals)]
    for _ in range(rng.randint(1, 4)):
        index = rng.randrange(NUM_IMAGES)
        copy = list(originals[index])
        copy[1 - label_column] = image_path(rng, index, root)
        if rng.random() < 0.3:
            copy[label_column] = "another class"
        position = rng.randint(tags.index((index, originals[index][label_column])) + 1, len(rows))
        rows.insert(position, copy)
        tags.insert(position, (index, copy[label_column]))
    first_label: dict[int, str] = {}
    for line, (index, label) in enumerate(tags[1:], start=2):
        if first_label.setdefault(index, label) != label:
            return LabelCase(csv_bytes(rng, rows, "\n"), "error", line)
    return LabelCase(csv_bytes(rng, rows, "\n"), "load")


INVALID_UTF8 = (b"caf\xe9", b"\x93quoted\x94", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xff\xfe")


def csv_non_utf8(rng: random.Random, root: Path) -> LabelCase:
    rows = labelled_rows(rng, root)
    if rng.random() < 0.15:
        text = csv_bytes(rng, rows, "\n").decode("utf-8-sig")
        data = text.encode(rng.choice(["utf-16", "utf-32"]))
        return LabelCase(data, "error", 1, "not UTF-8 text (byte 0xff)")
    position = rng.randint(1, len(rows) - 1)
    marker = "@@MARK@@"
    rows[position][rng.randrange(2)] += marker
    data = csv_bytes(rng, rows, rng.choice(["\n", "\r\n"]))
    invalid = rng.choice(INVALID_UTF8)
    data = data.replace(marker.encode(), invalid)
    first = next(value for value in invalid if value >= 0x80)
    return LabelCase(data, "error", position + 1, f"not UTF-8 text (byte {first:#04x})")


def escaping_path(rng: random.Random, root: Path) -> str:
    """A path that leaves ``root/data``; each target exists, so accepting it would load it."""
    depth = rng.randint(1, 4)
    forms = [
        "../" * (depth + 1) + "etc/passwd",
        "../outside.png",
        "images/" + "../" * (depth + 1) + "outside.png",
        "./images/./../../data-evil/x.png",
        "/etc/passwd",
        str(root / "outside.png"),
        str(root / "data") + "/../outside.png",
        "..",
        "../data",
    ]
    return rng.choice(forms)


def csv_escaping(rng: random.Random, root: Path) -> LabelCase:
    rows = labelled_rows(rng, root)
    path_column = [column.strip().lower() for column in rows[0]].index("path")
    position = rng.randint(1, len(rows) - 1)
    rows[position][path_column] = escaping_path(rng, root)
    data = csv_bytes(rng, rows, rng.choice(["\n", "\r\n"]))
    return LabelCase(data, "error", position + 1, "is outside the dataset folder")


def csv_mutated(rng: random.Random, root: Path) -> LabelCase:
    data = csv_bytes(rng, labelled_rows(rng, root))
    for _ in range(rng.randint(0, 3)):
        position = rng.randrange(len(data))
        insert = rng.choice([b'"', b",", b"\n", b"\r", b"\0", b"../", b"\xff", rng.randbytes(3)])
        data = data[:position] + insert + data[position:]
    return LabelCase(mutate(rng, data), "any")


LABEL_CATEGORIES: dict[str, Callable[[random.Random, Path], LabelCase]] = {
    "CSV BOM/CRLF/quoting": csv_quirks,
    "CSV missing columns": csv_missing_columns,
    "CSV duplicate rows": csv_duplicates,
    "CSV non-UTF-8": csv_non_utf8,
    "CSV path escaping root": csv_escaping,
    "CSV random mutations": csv_mutated,
}
DATASET_CATEGORY = "dataset with bad images"


# ----------------------------------------------------------------------------- checks


class WrongOutcome(Exception):
    """The library answered without crashing, but not as the issue requires."""


def expect_named(error: Exception, *names: str) -> str:
    """``"reported"`` if the message names every one of ``names``; else a wrong outcome."""
    missing = [name for name in names if name not in str(error)]
    if missing:
        raise WrongOutcome(f"{type(error).__name__} does not name {missing}: {error}")
    return "reported"


def check_image(data: bytes, name: str, folder: Path) -> str:
    """Run one file through ``prepare_bytes`` (symbol, photo) and ``read_image_file``."""
    path = folder / name
    path.write_bytes(data)
    outcomes = set()
    for preprocessing in (SYMBOL, PHOTO):
        try:
            array = prepare_bytes(data, name, preprocessing)
        except BadImageError as error:
            outcomes.add(expect_named(error, f"{name}:"))
            continue
        size, channels = preprocessing.stored_size, preprocessing.channels
        if array.shape != (size, size, channels) or array.dtype != np.uint8:
            raise WrongOutcome(f"prepare_bytes returned {array.shape} {array.dtype}")
        outcomes.add("decoded")
    try:
        read_image_file(str(path))
        outcomes.add("decoded")
    except BadImageError as error:
        outcomes.add(expect_named(error, f"{path}:"))
    if len(outcomes) > 1:
        raise WrongOutcome("decoded by one entry point and refused by another")
    return outcomes.pop()


def load(config: DataConfig) -> LoadedData | ValueError:
    """``build_splits``, returning the library's own ValueError types instead of raising them."""
    try:
        return build_splits(config, Preprocessing())
    except ValueError as error:
        if type(error) not in (ValueError, DataFormatError, BadDataError):
            raise  # UnicodeDecodeError and the like are ValueErrors too, but crashes here.
        return error


def image_count(loaded: LoadedData) -> int:
    splits = loaded.splits
    return len(splits.train) + len(splits.test) + (len(splits.val) if splits.val else 0)


def check_label_case(case: LabelCase, csv_path: Path) -> str:
    """Load ``csv_path`` with both bad-image policies and compare with ``case.expect``."""
    csv_path.write_bytes(case.data)
    outcomes = set()
    for policy in ("skip", "error"):
        result = load(DataConfig(dataset="csv", data=str(csv_path), on_bad_image=policy))
        if case.expect == "load":
            if not isinstance(result, LoadedData) or image_count(result) != NUM_IMAGES:
                raise WrongOutcome(f"a valid CSV did not load all images: {result!r}")
            outcomes.add("decoded")
        elif case.expect == "error":
            if type(result) is not DataFormatError:
                raise WrongOutcome(f"expected an error at line {case.line}, got {result!r}")
            outcomes.add(expect_named(result, f"{csv_path}:{case.line}:", case.says))
        else:
            outcomes.add(check_any_outcome(result, csv_path))
    return "reported" if "reported" in outcomes else "decoded"


def check_any_outcome(result: LoadedData | ValueError, csv_path: Path) -> str:
    """Any result will do if errors name the CSV and a line, and bad images their CSV line."""
    if isinstance(result, LoadedData):
        problems = result.problems
    elif type(result) is BadDataError:
        problems = [line for line in str(result).splitlines()[1:] if "... and" not in line]
    elif type(result) is DataFormatError:
        if not re.match(rf"{re.escape(str(csv_path))}:\d+: ", str(result)):
            raise WrongOutcome(f"an error without the file and line: {result}")
        return "reported"
    else:  # A plain ValueError: the listing or a split is empty.
        return expect_named(result, str(csv_path))
    for problem in problems:
        expect_named(ValueError(problem), f"({csv_path.name}:")
    return "reported" if problems else "decoded"


def check_dataset(rng: random.Random, folder: Path) -> str:
    """A folder or CSV dataset of good images plus a few fuzzed files, loaded both ways."""
    use_csv = rng.random() < 0.5
    root = folder / "dataset"
    files: dict[str, bytes] = {}
    for index in range(NUM_IMAGES):
        files[f"{'ab'[index % 2]}/{index}.png"] = encode(random_image(rng, "RGB"), "PNG")
    bad: dict[str, int] = {}
    for index in range(rng.randint(1, 4)):
        category = rng.choice(list(IMAGE_CATEGORIES))
        data, extension = IMAGE_CATEGORIES[category](rng)
        key = f"{rng.choice('ab')}/fuzz {index}{extension}"
        files[key] = data
        try:
            prepare_bytes(data, key, Preprocessing())
        except BadImageError:
            bad[key] = len(files) + 1  # Its CSV line: header, then one row per file in order.
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    data_path = root
    if use_csv:
        data_path = root / "labels.csv"
        rows = [["path", "label"]] + [[key, key[0]] for key in files]
        data_path.write_bytes(csv_bytes(rng, rows, "\n"))
    expected_images = len(files) - len(bad)
    for policy in ("skip", "error"):
        dataset = "csv" if use_csv else "folder"
        result = load(DataConfig(dataset=dataset, data=str(data_path), on_bad_image=policy))
        if policy == "error" and bad:
            if type(result) is not BadDataError:
                raise WrongOutcome(f"bad images {sorted(bad)} not reported: {result!r}")
            names = [f"{key} (labels.csv:{line})" if use_csv else key for key, line in bad.items()]
            expect_named(result, *names)
        elif not isinstance(result, LoadedData):
            raise WrongOutcome(f"{policy}: {result!r}")
        elif image_count(result) != expected_images or len(result.problems) != len(bad):
            raise WrongOutcome(f"{policy}: {image_count(result)} images, {result.problems}")
    return "reported" if bad else "decoded"


def run_case(category: str, rng: random.Random, folder: Path) -> str:
    """Generate and check one input; returns ``"decoded"`` or ``"reported"``."""
    if category in IMAGE_CATEGORIES:
        data, extension = IMAGE_CATEGORIES[category](rng)
        return check_image(data, f"input{extension}", folder)
    if category in LABEL_CATEGORIES:
        labels_root = prepare_label_dataset(folder)
        case = LABEL_CATEGORIES[category](rng, labels_root)
        return check_label_case(case, labels_root / "data" / "labels.csv")
    return check_dataset(rng, folder)


def prepare_label_dataset(folder: Path) -> Path:
    """``root/data/images/<i>.png`` plus files just outside ``root/data`` (escape targets)."""
    root = folder / "labels"
    if not root.exists():
        for index in range(NUM_IMAGES):
            (root / "data" / "images").mkdir(parents=True, exist_ok=True)
            image = Image.new("L", (6, 6), 40 * index)
            image.save(root / "data" / "images" / f"{index}.png")
        for target in ("outside.png", "etc/passwd", "data-evil/x.png"):
            (root / target).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (6, 6)).save(root / target, format="PNG")
    return root


# ----------------------------------------------------------------------------- the runner


def limit_memory() -> None:
    """Cap the worker's address space so that a memory bomb fails here, not on the machine."""
    try:
        with open("/proc/self/statm") as handle:
            current = int(handle.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (current + WORKER_MEMORY_BYTES, -1))
    except (OSError, ValueError):
        pass


def worker_main(connection, folder: Path) -> None:
    """Run cases sent as ``(category, case_seed)``; answer ``(outcome, detail)``."""
    os.setsid()  # Its own process group, so that a hang kills its decoding pool too.
    log = os.open(folder / "worker-stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)  # libtiff and the skipped-image warnings write to stderr.
    warnings.simplefilter("ignore")
    limit_memory()
    while (job := connection.recv()) is not None:
        category, case_seed = job
        try:
            with tempfile.TemporaryDirectory(dir=folder) as case_folder:
                outcome = run_case(category, random.Random(case_seed), Path(case_folder))
            connection.send((outcome, ""))
        except WrongOutcome as error:
            connection.send(("crash", f"wrong outcome: {error}"[:500]))
        except Exception as error:
            where = traceback.extract_tb(error.__traceback__)[-1]
            detail = f"{type(error).__name__}: {error} ({where.filename}:{where.lineno})"
            connection.send(("crash", detail[:500]))


class Runner:
    """One worker process at a time; killed and replaced when a case outlives ``timeout``."""

    def __init__(self, folder: Path, timeout: float) -> None:
        self.folder, self.timeout = folder, timeout
        self.context = multiprocessing.get_context("fork")
        self._start()

    def _start(self) -> None:
        self.connection, child = self.context.Pipe()
        self.process = self.context.Process(target=worker_main, args=(child, self.folder))
        self.process.start()
        child.close()

    def _stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.join()

    def run(self, category: str, case_seed: str) -> tuple[str, str]:
        """Return ``(outcome, detail)``: decoded, reported, crash or hang."""
        self.connection.send((category, case_seed))
        try:
            if self.connection.poll(self.timeout):
                return self.connection.recv()
            detail = f"still running after {self.timeout:g} s"
            outcome = "hang"
        except EOFError:
            outcome, detail = "crash", "the worker process died"
        self._stop()
        if outcome == "crash":
            detail += f" (exit code {self.process.exitcode})"
        self._start()
        return outcome, detail

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self._stop()


@dataclass
class Tally:
    """Counts for one category."""

    tried: int = 0
    decoded: int = 0
    reported: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    @property
    def handled(self) -> int:
        return self.decoded + self.reported

    def add(self, outcome: str, detail: str, case_seed: str) -> None:
        self.tried += 1
        counts = {"decoded": "decoded", "reported": "reported", "crash": "crashes"}
        name = counts.get(outcome, "hangs")
        setattr(self, name, getattr(self, name) + 1)
        if outcome in ("crash", "hang") and len(self.examples) < 5:
            self.examples.append(f"case {case_seed!r}: {detail}")


def print_row(name: str, tally: Tally) -> None:
    print(
        f"{name:<26} {tally.tried:>6} {tally.handled:>8} {tally.decoded:>8} {tally.reported:>9}"
        f" {tally.crashes:>8} {tally.hangs:>6} {tally.seconds:>8.1f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of every generated input")
    parser.add_argument("--per-category", type=int, default=200, help="inputs per category")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a hang")
    parser.add_argument("--only", nargs="*", default=None, help="run only these categories")
    parser.add_argument("--name", default="robustness", help="results file name")
    args = parser.parse_args(argv)
    categories = [*IMAGE_CATEGORIES, *LABEL_CATEGORIES, DATASET_CATEGORY]
    categories = [name for name in categories if not args.only or name in args.only]
    tallies: dict[str, Tally] = {}
    print(f"{'category':<26} {'tried':>6} {'handled':>8} {'decoded':>8} {'reported':>9}", end="")
    print(f" {'crashes':>8} {'hangs':>6} {'seconds':>8}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cnnkit-robustness-") as folder:
        runner = Runner(Path(folder), args.timeout)
        try:
            for name in categories:
                tally = tallies[name] = Tally()
                start = time.perf_counter()
                for index in range(args.per_category):
                    case_seed = f"{args.seed}/{name}/{index}"
                    tally.add(*runner.run(name, case_seed), case_seed)
                tally.seconds = time.perf_counter() - start
                print_row(name, tally)
        finally:
            runner.close()
    total = Tally()
    for tally in tallies.values():
        for name in ("tried", "decoded", "reported", "crashes", "hangs", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(tally, name))
    print_row("total", total)
    passed = total.crashes == 0 and total.hangs == 0
    print(f"crashes: {total.crashes}, hangs: {total.hangs} — {'PASS' if passed else 'FAIL'}")
    for name, tally in tallies.items():
        for example in tally.examples:
            print(f"  {name}: {example}")
    payload = {
        "seed": args.seed,
        "per_category": args.per_category,
        "timeout_s": args.timeout,
        "categories": {name: {**vars(t), "handled": t.handled} for name, t in tallies.items()},
        "total": {**vars(total), "handled": total.handled},
        "passed": passed,
    }
    print(f"wrote {record_result(args.name, payload)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
