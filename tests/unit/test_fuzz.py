"""Fuzzed images and label files: only the library's own errors, naming the file (and line).

Complements test_image.py and test_folder_csv.py, whose helpers it reuses, with hypothesis-driven
inputs: mutated and truncated files, wrong extensions, animated, CMYK and 16-bit images, huge
declared sizes, and CSVs that are not UTF-8, lack columns, repeat rows or escape the dataset.
``benchmarks/robustness.py`` runs the same categories at scale.
"""

from __future__ import annotations

import csv
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_folder_csv import make_image, write_csv, write_image
from test_image import PHOTO, SYMBOL_GRAY, SYMBOL_RGB, _encode, _png_chunk

from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.csv_source import CsvSource
from cnnkit.data.image import MAX_IMAGE_PIXELS, BadImageError, decode_image, read_image_file
from cnnkit.data.prepare import prepare_bytes, prepare_image
from cnnkit.data.source import DataFormatError
from cnnkit.data.sources import BadDataError, build_splits

FUZZ_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW_SETTINGS = settings(FUZZ_SETTINGS, max_examples=10)


def _seed_files() -> dict[str, bytes]:
    """Small valid files of each format the fuzzers start from."""
    image = make_image("RGB", (12, 10))
    sixteen = Image.fromarray(np.full((6, 5), 40_000, dtype=np.uint16))
    frames = [make_image("P", (12, 10), shade) for shade in (20, 200)]
    return {
        "png": _encode(image),
        "png16": _encode(sixteen),
        "jpeg": _encode(image, "JPEG"),
        "cmyk.jpeg": _encode(image.convert("CMYK"), "JPEG"),
        "gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp": _encode(image, "BMP"),
        "webp": _encode(image, "WEBP"),
    }


SEEDS = _seed_files()


def _png(width: int, height: int, depth: int, color_type: int, pixels: bytes) -> bytes:
    """A PNG whose header and CRCs are valid, around ``pixels`` (which may be too short)."""
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(pixels))
        + _png_chunk(b"IEND", b"")
    )


def _assert_prepared_or_named(data: bytes, name: str) -> None:
    """Prepare ``data`` both ways: the stored shape, or a BadImageError naming ``name``."""
    decoded = []
    for preprocessing in (SYMBOL_GRAY, PHOTO):
        try:
            array = prepare_bytes(data, name, preprocessing)
        except BadImageError as error:
            assert str(error).startswith(f"{name}: ")
            decoded.append(False)
            continue
        size, channels = preprocessing.stored_size, preprocessing.channels
        assert array.shape == (size, size, channels) and array.dtype == np.uint8
        decoded.append(True)
    assert decoded[0] == decoded[1]


# ----------------------------------------------------------------------------- images


@FUZZ_SETTINGS
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
    inserted=st.binary(max_size=16),
    insert_at=st.floats(0, 1),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_or_truncated_images_decode_or_name_the_file(seed, edits, inserted, insert_at, cut):
    data = bytearray(SEEDS[seed])
    for position, value in edits:
        data[min(int(position * len(data)), len(data) - 1)] = value
    start = int(insert_at * len(data))
    data[start:start] = inserted
    if cut is not None:
        data = data[: int(cut * len(data))]
    _assert_prepared_or_named(bytes(data), f"fuzzed.{seed}")


@FUZZ_SETTINGS
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a"]))
def test_random_bytes_decode_or_name_the_file(data, prefix):
    _assert_prepared_or_named(prefix + data, "random.bin")


@FEW_SETTINGS
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    extension=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp", ".tif", ".JPEG", ""]),
    text=st.text(max_size=80),
)
def test_wrong_extensions_are_ignored_and_text_is_named(tmp_path_factory, seed, extension, text):
    folder = tmp_path_factory.mktemp("extension")
    image_path = folder / f"image{extension}"
    image_path.write_bytes(SEEDS[seed])
    assert read_image_file(str(image_path)).size in {(12, 10), (5, 6)}
    text_path = folder / f"text{extension or '.png'}"
    text_path.write_bytes(text.encode())
    problem = "empty file" if not text else "not a readable image"
    with pytest.raises(BadImageError, match=rf"^{re.escape(str(text_path))}: {problem}"):
        read_image_file(str(text_path))


@FEW_SETTINGS
@given(
    image_format=st.sampled_from(["GIF", "PNG", "WEBP"]),
    shades=st.lists(st.integers(0, 255), min_size=2, max_size=5, unique=True),
    size=st.tuples(st.integers(1, 20), st.integers(1, 20)),
)
def test_animated_images_use_the_first_frame(image_format, shades, size):
    frames = [Image.new("L", size, shade) for shade in shades]
    options = {"lossless": True} if image_format == "WEBP" else {}
    data = _encode(frames[0], image_format, save_all=True, append_images=frames[1:], **options)
    image = decode_image(data, f"animated.{image_format.lower()}")
    assert image.tell() == 0 and getattr(image, "n_frames", 1) == len(shades)
    assert (prepare_bytes(data, "animated", SYMBOL_GRAY) == shades[0]).all()


@FEW_SETTINGS
@given(
    color=st.tuples(*[st.integers(0, 255)] * 4),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    progressive=st.booleans(),
)
def test_cmyk_jpegs_become_the_same_rgb_as_pil(color, size, progressive):
    data = _encode(Image.new("CMYK", size, color), "JPEG", quality=95, progressive=progressive)
    expected = np.array(Image.new("CMYK", (1, 1), color).convert("RGB").getpixel((0, 0)))
    prepared = prepare_bytes(data, "cmyk.jpg", PHOTO).astype(int)
    assert np.abs(prepared - expected).max() <= 8


@FEW_SETTINGS
@given(
    color_type=st.sampled_from([0, 2, 4, 6]),
    value=st.integers(256, 65535),
    size=st.tuples(st.integers(1, 30), st.integers(1, 30)),
)
def test_sixteen_bit_pngs_of_every_colour_type(color_type, value, size):
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    sample = [value] * channels
    if color_type in (4, 6):
        sample[-1] = 65535  # Opaque, so that the grey level is the value itself.
    row = b"\0" + struct.pack(f">{channels * size[0]}H", *(sample * size[0]))
    data = _png(size[0], size[1], 16, color_type, row * size[1])
    for preprocessing in (SYMBOL_GRAY, SYMBOL_RGB):
        prepared = prepare_bytes(data, "deep.png", preprocessing).astype(int)
        assert np.abs(prepared - value / 257).max() <= 1


def _huge_header(image_format: str, width: int, height: int) -> bytes:
    """A file of a few bytes whose header declares ``width`` x ``height`` pixels."""
    if image_format == "PNG":
        return _png(width, height, 8, 0, b"\0" * 64)
    if image_format == "GIF":
        screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
        descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00\x3b"
    if image_format == "BMP":
        info = struct.pack("<IiiHHIIiiII", 40, width, -height, 1, 24, 0, 0, 0, 0, 0, 0)
        return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info + bytes(64)
    data = bytearray(SEEDS["jpeg"])
    start = data.find(b"\xff\xc0")
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@FUZZ_SETTINGS
@given(
    image_format=st.sampled_from(["PNG", "GIF", "BMP", "JPEG"]),
    width=st.integers(1, 2**31 - 1),
    height=st.integers(1, 2**31 - 1),
)
def test_huge_declared_dimensions_are_refused_by_name(image_format, width, height):
    if image_format in ("GIF", "JPEG"):
        width, height = width % 65535 + 1, height % 65535 + 1
    if width * height <= MAX_IMAGE_PIXELS:
        width = height = 65535
    with pytest.raises(BadImageError, match=r"^bomb: .*(too large|decompression bomb)"):
        decode_image(_huge_header(image_format, width, height), "bomb")


@pytest.mark.parametrize("shape", [(1, 2_000_000), (2_000_000, 1)], ids=["tall", "wide"])
def test_thin_strips_are_cropped_before_they_are_scaled(shape, monkeypatch):
    # A 1x2,000,000 strip is a 4 kB PNG within the pixel limit; scaling it whole to a 16-pixel
    # short side would allocate 16 x 32,000,000 RGB pixels (1.5 GB) just to crop 16 x 16.
    resize = Image.Image.resize

    def bounded_resize(image, size, *args, **kwargs):
        assert size[0] * size[1] <= PHOTO.stored_size**2, f"resized to {size}"
        return resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    width, height = shape
    row = b"\0" + b"\x80" * width
    data = _png(width, height, 8, 0, row * height)
    assert len(data) < 10_000
    assert (prepare_bytes(data, "strip.png", PHOTO) == 0x80).all()


def _resize_then_crop(image: Image.Image, size: int) -> np.ndarray:
    """The photo preprocessing as first written: scale the whole image, then crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if image.size != new_size:
        image = image.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


@FUZZ_SETTINGS
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    size=st.sampled_from([8, 16, 33]),
    seed=st.integers(0, 2**32 - 1),
)
def test_photo_crop_matches_scaling_the_whole_image(width, height, size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    preprocessing = Preprocessing("photo", 3, size, size, (0.5,) * 3, (0.5,) * 3)
    prepared = prepare_image(image, preprocessing).astype(int)
    assert np.abs(prepared - _resize_then_crop(image, size)).max() <= 1


# ----------------------------------------------------------------------------- label files

NUM_IMAGES = 6
newlines = st.sampled_from(["\n", "\r\n"])


def _csv_dataset(root: Path) -> tuple[Path, list[list[str]]]:
    """``root/data/images/<i>.png`` (two classes) and the rows of a CSV that lists them."""
    for index in range(NUM_IMAGES):
        write_image(root / "data" / "images" / f"{index}.png")
    write_image(root / "outside.png")
    write_image(root / "data-evil" / "x.png")
    rows = [["path", "label"]] + [[f"images/{i}.png", "ab"[i % 2]] for i in range(NUM_IMAGES)]
    return root / "data" / "labels.csv", rows


def _csv_config(csv_path: Path, policy: str) -> DataConfig:
    return DataConfig(dataset="csv", data=str(csv_path), on_bad_image=policy)


def _loaded_count(csv_path: Path, policy: str) -> int:
    splits = build_splits(_csv_config(csv_path, policy), Preprocessing()).splits
    return len(splits.train) + len(splits.test) + (len(splits.val) if splits.val else 0)


INVALID_UTF8 = [b"caf\xe9", b"\x93q\x94", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xff\xfe"]


@FEW_SETTINGS
@given(
    row=st.integers(1, NUM_IMAGES),
    column=st.integers(0, 1),
    at_start=st.booleans(),
    invalid=st.sampled_from(INVALID_UTF8),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
    policy=st.sampled_from(["skip", "error"]),
)
def test_non_utf8_csv_names_file_line_and_byte(
    tmp_path_factory, row, column, at_start, invalid, newline, bom, policy
):
    # At the start of a line, a BOM once shifted the reported line and byte by three bytes.
    csv_path, rows = _csv_dataset(tmp_path_factory.mktemp("utf8"))
    field = rows[row][column]
    rows[row][column] = "@MARK@" + field if at_start else field + "@MARK@"
    write_csv(csv_path, rows, newline=newline, bom=bom)
    csv_path.write_bytes(csv_path.read_bytes().replace(b"@MARK@", invalid))
    first_invalid = next(value for value in invalid if value >= 0x80)
    expected = rf"labels\.csv:{row + 1}: not UTF-8 text \(byte {first_invalid:#04x}\)"
    with pytest.raises(DataFormatError, match=expected):
        build_splits(_csv_config(csv_path, policy), Preprocessing())


@FEW_SETTINGS
@given(
    header=st.sampled_from([["file", "label"], ["path", "class"], ["path label"], ["name", ""]]),
    short_row=st.one_of(st.none(), st.integers(1, NUM_IMAGES)),
    newline=newlines,
    bom=st.booleans(),
)
def test_missing_columns_name_file_and_line(tmp_path_factory, header, short_row, newline, bom):
    csv_path, rows = _csv_dataset(tmp_path_factory.mktemp("columns"))
    line = 1
    if short_row is None:
        rows[0] = header
    else:
        rows[short_row] = rows[short_row][:1]
        line = short_row + 1
    write_csv(csv_path, rows, newline=newline, bom=bom)
    with pytest.raises(DataFormatError, match=rf"labels\.csv:{line}: (header lacks|expected)"):
        CsvSource(csv_path).list_samples()


path_spellings = st.sampled_from(
    ["images/{}.png", "./images/{}.png", "images//{}.png", "images/../images/{}.png"]
)


@FEW_SETTINGS
@given(
    repeats=st.lists(
        st.tuples(st.integers(0, NUM_IMAGES - 1), path_spellings, st.booleans()), max_size=4
    ),
    newline=newlines,
    bom=st.booleans(),
)
def test_duplicate_rows_are_dropped_or_named_with_both_lines(
    tmp_path_factory, repeats, newline, bom
):
    csv_path, rows = _csv_dataset(tmp_path_factory.mktemp("duplicates"))
    rows += [
        [spelling.format(index), "ab"[index % 2] if same else "c"]
        for index, spelling, same in repeats
    ]
    write_csv(csv_path, rows, newline=newline, bom=bom)
    conflicts = [i for i, (index, _, same) in enumerate(repeats) if not same]
    if conflicts:
        line, first_line = NUM_IMAGES + 2 + conflicts[0], repeats[conflicts[0]][0] + 2
        with pytest.raises(DataFormatError, match=rf"labels\.csv:{line}: .* line {first_line} "):
            CsvSource(csv_path).list_samples()
        return
    listing = CsvSource(csv_path).list_samples()
    assert [record.key for record in listing.records] == [r[0] for r in rows[1 : NUM_IMAGES + 1]]


escaping_paths = st.sampled_from(
    [
        "../../etc/passwd",
        "../outside.png",
        "images/../../outside.png",
        "./images/./../../data-evil/x.png",
        "/etc/passwd",
        "{root}/outside.png",
        "{root}/data/../outside.png",
        "..",
        "../data",
    ]
)


@FEW_SETTINGS
@given(
    path=escaping_paths,
    row=st.integers(1, NUM_IMAGES),
    policy=st.sampled_from(["skip", "error"]),
    newline=newlines,
    bom=st.booleans(),
)
def test_paths_escaping_the_dataset_are_refused_even_when_skipping(
    tmp_path_factory, path, row, policy, newline, bom
):
    root = tmp_path_factory.mktemp("escape")
    csv_path, rows = _csv_dataset(root)
    rows[row][0] = path.format(root=root)
    write_csv(csv_path, rows, newline=newline, bom=bom)
    with pytest.raises(DataFormatError, match=rf"labels\.csv:{row + 1}: .*outside the dataset"):
        build_splits(_csv_config(csv_path, policy), Preprocessing())


@FUZZ_SETTINGS
@given(
    edits=st.lists(
        st.tuples(
            st.floats(0, 1),
            st.sampled_from(
                [b'"', b",", b"\n", b"\r", b"\0", b"\xff", b"../", b"\xef\xbb\xbf", b""]
            ),
        ),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_csv_loads_or_names_file_and_line(tmp_path_factory, edits, cut):
    csv_path, rows = _csv_dataset(tmp_path_factory.mktemp("mutated"))
    data = write_csv(csv_path, rows).read_bytes()
    for position, insert in edits:
        data = data[: int(position * len(data))] + insert + data[int(position * len(data)) + 1 :]
    data = data[: int(cut * len(data))] if cut is not None else data
    csv_path.write_bytes(data)
    try:
        records = CsvSource(csv_path).list_samples().records
    except DataFormatError as error:
        assert re.match(rf"{re.escape(str(csv_path))}:\d+: ", str(error)), error
        return
    # Something happened: images loaded, or there was no row to load (a file cut after its
    # header). A file with rows never silently lists nothing.
    text = io.StringIO(data.decode("utf-8-sig"), newline="")
    rows = [row for row in csv.reader(text) if any(field.strip() for field in row)]
    assert records or len(rows) <= 1, rows
    assert all(re.fullmatch(r"labels\.csv:\d+", record.origin) for record in records)


# ----------------------------------------------------------------------------- datasets


def _does_not_decode(data: bytes) -> bool:
    try:
        decode_image(data)
    except BadImageError:
        return True
    return False


bad_files = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=64),
    st.sampled_from(sorted(SEEDS)).map(lambda name: SEEDS[name][: len(SEEDS[name]) // 2]),
    st.text(min_size=1, max_size=40).map(str.encode),
).filter(_does_not_decode)


@settings(FEW_SETTINGS, max_examples=6)
@given(
    bad=st.lists(bad_files, min_size=1, max_size=3),
    extensions=st.lists(st.sampled_from([".png", ".JPG", ".gif", ".webp"]), min_size=3),
    use_csv=st.booleans(),
)
def test_bad_images_in_a_dataset_are_named_or_skipped(tmp_path_factory, bad, extensions, use_csv):
    root = tmp_path_factory.mktemp("dataset")
    good = [f"{'ab'[i % 2]}/{i}.png" for i in range(NUM_IMAGES)]
    for shade, key in enumerate(good):  # Distinct: copies of one image stay in one split.
        write_image(root / key, shade=shade)
    keys = [f"a/bad {i}{extensions[i]}" for i in range(len(bad))]
    for key, data in zip(keys, bad, strict=True):
        (root / key).write_bytes(data)
    data_path = root
    if use_csv:
        rows = [["path", "label"]] + [[key, key[0]] for key in good + keys]
        data_path = write_csv(root / "labels.csv", rows, newline="\r\n", bom=True)
    names = [
        f"{key} (labels.csv:{NUM_IMAGES + 2 + i})" if use_csv else key for i, key in enumerate(keys)
    ]
    dataset = "csv" if use_csv else "folder"
    config = DataConfig(dataset=dataset, data=str(data_path), on_bad_image="error")
    with pytest.raises(BadDataError, match=f"{len(bad)} bad image") as error:
        build_splits(config, Preprocessing())
    assert all(name in str(error.value) for name in names)
    config = DataConfig(dataset=dataset, data=str(data_path), on_bad_image="skip")
    loaded = build_splits(config, Preprocessing())
    origins = names if use_csv else [f"{key} ({root})" for key in keys]
    assert len(loaded.problems) == len(bad)
    for problem, origin in zip(loaded.problems, origins, strict=True):
        assert problem.startswith(f"{origin}: ")
    splits = loaded.splits
    assert len(splits.train) + len(splits.test) + (len(splits.val) if splits.val else 0) == 6
