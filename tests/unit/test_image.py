"""Tests for decoding image bytes and turning PIL images into stored uint8 arrays."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from cnnkit.config import Preprocessing
from cnnkit.data.image import (
    IMAGE_FORMATS,
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    BadImageError,
    decode_image,
    image_size,
    open_image,
    read_image_file,
)
from cnnkit.data.prepare import prepare_bytes, prepare_image

SYMBOL_GRAY = Preprocessing("symbol", 1, 8, 8, (0.5,), (0.5,))
SYMBOL_RGB = Preprocessing("symbol", 3, 8, 8, (0.5,) * 3, (0.5,) * 3)
PHOTO = Preprocessing("photo", 3, 16, 16, (0.5,) * 3, (0.5,) * 3)


def _encode(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _noise(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that claims ``width`` x ``height`` grey pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- decoding


def test_decodes_a_png() -> None:
    image = decode_image(_encode(_noise((5, 3))), "tiny.png")
    assert image.size == (5, 3) and image.mode == "RGB"


def test_empty_file_is_named() -> None:
    with pytest.raises(BadImageError, match=r"empty\.png: empty file"):
        decode_image(b"", "empty.png")


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_file_is_named(image_format: str) -> None:
    data = _encode(_noise(), image_format)
    name = f"cut.{image_format.lower()}"
    with pytest.raises(BadImageError, match=rf"cut\.{image_format.lower()}: (truncated|not a)"):
        decode_image(data[: len(data) // 2], name)


def test_random_bytes_are_not_an_image() -> None:
    data = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(BadImageError, match=r"noise\.bin: not a readable image") as raised:
        decode_image(data, "noise.bin")
    assert " at 0x" not in str(raised.value)  # No Python object address in the message.


@pytest.mark.parametrize("image_format", ["EPS", "PCX", "SGI"])
def test_formats_outside_the_accepted_ones_are_refused_and_run_no_program(
    image_format: str, tmp_path, monkeypatch
) -> None:
    """Pillow identifies any format it has a plugin for, and its EPS plugin runs Ghostscript
    on the file: an uploaded .eps must not start a program (here a fake gs that leaves a
    mark)."""
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (255, 255, 255)).save(buffer, image_format)
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    with pytest.raises(BadImageError, match=r"^x\.img: not a readable image \(not PNG, JPEG"):
        decode_image(buffer.getvalue(), "x.img")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("side", [9_000, 20_000, 30_000])
def test_decompression_bombs_are_refused_before_decoding(side: int) -> None:
    data = _png_header_only(side, side)
    assert len(data) < 200
    with pytest.raises(BadImageError, match=r"bomb\.png: .*(too large|decompression bomb)"):
        decode_image(data, "bomb.png")


@pytest.mark.parametrize(
    "side, described",
    [(9_000, "81,000,000 pixels, 9000x9000"), (30_000, "900,000,000 pixels")],
    ids=["81MP", "900MP"],
)
def test_decompression_bombs_are_told_the_one_pixel_limit(side: int, described: str) -> None:
    """Pillow warns above its limit but refuses only at twice it, each naming its own number."""
    with pytest.raises(BadImageError) as raised:
        decode_image(_png_header_only(side, side), "bomb.png")
    assert str(raised.value) == (
        f"bomb.png: image too large ({described}); "
        f"images of up to {MAX_IMAGE_PIXELS:,} pixels are accepted"
    )


def test_open_image_reads_the_size_without_decoding() -> None:
    image = open_image(_png_header_only(7_000, 9_000), "header.png")
    assert image.size == (7_000, 9_000)
    with pytest.raises(BadImageError, match="header.png: empty file"):
        open_image(b"", "header.png")


def test_image_size_reads_png_and_other_headers() -> None:
    assert image_size(_png_header_only(7_000, 9_000), "header.png") == (7_000, 9_000)
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3)).save(buffer, "JPEG")
    assert image_size(buffer.getvalue(), "photo.jpg") == (5, 3)
    with pytest.raises(BadImageError, match="junk.png: "):
        image_size(b"\x89PNG\r\n\x1a\n but no header chunk", "junk.png")


def test_image_size_of_a_png_with_two_headers_is_pillows() -> None:
    """Pillow sizes a PNG by its last header chunk: a first one claiming 1x1 must not let a
    large image pass for a small one (the server decodes small uploads on its batch thread)."""
    small = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    large = struct.pack(">IIBBBBB", 7_000, 9_000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", small)
        + _png_chunk(b"tEXt", b"Comment\0x")
        + _png_chunk(b"IHDR", large)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    assert open_image(data, "two.png").size == (7_000, 9_000)
    assert image_size(data, "two.png") == (7_000, 9_000)


_CHUNKS = {
    "small": _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 3, 8, 0, 0, 0, 0)),
    "large": _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 5_000, 4_000, 8, 0, 0, 0, 0)),
    "short": _png_chunk(b"IHDR", b"\0" * 5),
    "text": _png_chunk(b"tEXt", b"a\0b"),
    "srgb": _png_chunk(b"sRGB", b"\0"),
    "data": _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)),
    "end": _png_chunk(b"IEND", b""),
}


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(sorted(_CHUNKS)), min_size=1, max_size=20))
def test_a_png_sized_from_its_header_has_the_size_pillow_gives(chunks: list[str]) -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"".join(_CHUNKS[name] for name in chunks)
    try:
        expected = open_image(data, "x.png").size
    except BadImageError:
        return  # Refused when decoded, wherever that happens.
    assert image_size(data, "x.png") == expected


def test_read_image_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="missing.png"):
        read_image_file(str(tmp_path / "missing.png"))
    with pytest.raises(BadImageError, match=str(tmp_path)):
        read_image_file(str(tmp_path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(BadImageError, match="broken.jpg"):
        read_image_file(str(broken))
    good = tmp_path / "good.png"
    good.write_bytes(_encode(_noise((4, 4))))
    assert read_image_file(str(good)).size == (4, 4)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_read_image_file_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    with pytest.raises(BadImageError, match=r"pipe\.png: cannot read \(not a regular file\)"):
        read_image_file(str(pipe))


def test_prepare_bytes_names_the_source() -> None:
    with pytest.raises(BadImageError, match="upload.png"):
        prepare_bytes(b"GIF89a", "upload.png", SYMBOL_GRAY)
    assert prepare_bytes(_encode(_noise((8, 8))), "ok.png", SYMBOL_GRAY).shape == (8, 8, 1)


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    "mode",
    [
        "1",
        "L",
        "LA",
        "La",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "RGBa",
        "CMYK",
        "LAB",
        "YCbCr",
        "HSV",
        "I",
        "F",
    ],
)
@pytest.mark.parametrize("preprocessing", [SYMBOL_GRAY, SYMBOL_RGB, PHOTO])
def test_any_mode_becomes_the_stored_shape(mode: str, preprocessing: Preprocessing) -> None:
    image = _noise((13, 7)).convert(mode)
    array = prepare_image(image, preprocessing)
    size, channels = preprocessing.stored_size, preprocessing.channels
    assert array.shape == (size, size, channels)
    assert array.dtype == np.uint8 and array.flags["C_CONTIGUOUS"]


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path: Path) -> None:
    values = np.array([[0, 32896], [65535, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = read_image_file(str(path))
    assert image.mode.startswith("I")
    preprocessing = Preprocessing("symbol", 1, 2, 2, (0.5,), (0.5,))
    assert prepare_image(image, preprocessing)[:, :, 0].tolist() == [[0, 128], [255, 255]]


@pytest.mark.parametrize(
    ("alpha", "expected"), [(0, 255), (255, 0), (128, 127)], ids=["clear", "opaque", "half"]
)
def test_alpha_is_composited_on_white(alpha: int, expected: int) -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, alpha))
    gray = prepare_image(rgba, SYMBOL_GRAY)
    assert abs(int(gray[0, 0, 0]) - expected) <= 1
    la = Image.new("LA", (8, 8), (0, alpha))
    assert abs(int(prepare_image(la, SYMBOL_RGB)[0, 0, 1]) - expected) <= 1


def test_premultiplied_alpha_is_composited_on_white() -> None:
    # Pillow converts "La" only to "LA"; other conversions raised a bare ValueError.
    clear, opaque = Image.new("La", (8, 8), (0, 0)), Image.new("La", (8, 8), (0, 255))
    assert (prepare_image(clear, SYMBOL_GRAY) == 255).all()
    assert (prepare_image(opaque, PHOTO) == 0).all()
    assert (prepare_image(Image.new("RGBa", (8, 8), (0, 0, 0, 0)), SYMBOL_GRAY) == 255).all()


def test_a_mode_pillow_cannot_convert_is_a_bad_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def convert(image: Image.Image, mode: str | None = None, *args, **kwargs) -> Image.Image:
        raise ValueError(f"conversion from {image.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", convert)
    with pytest.raises(BadImageError, match="unsupported image mode 'CMYK' .*not supported"):
        prepare_image(Image.new("CMYK", (8, 8)), SYMBOL_GRAY)


def test_palette_transparency_is_white() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    data = decode_image(_encode(image), "palette.png")
    assert (prepare_image(data, SYMBOL_GRAY) == 255).all()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_colour_key_transparency_is_white(mode: str) -> None:
    """A PNG tRNS colour key on an L or RGB image, as on palette images."""
    image = Image.new(mode, (8, 8), 0)
    image.paste(128 if mode == "L" else (128,) * 3, (0, 0, 8, 2))
    key = 0 if mode == "L" else (0, 0, 0)
    decoded = decode_image(_encode(image, transparency=key), "keyed.png")
    assert "transparency" in decoded.info
    prepared = prepare_image(decoded, SYMBOL_GRAY)[:, :, 0]
    assert (prepared[2:] == 255).all() and (prepared[:2] == 128).all()


def test_sixteen_bit_pixels_read_as_32_bit_span_0_to_65535() -> None:
    """Pillow opens 16-bit PGM files as mode "I": a brighter file must not come out darker."""
    dim, bright = (Image.fromarray(np.full((2, 2), v, np.int32), "I") for v in (200, 300))
    preprocessing = Preprocessing("symbol", 1, 2, 2, (0.5,), (0.5,))
    assert prepare_image(dim, preprocessing).max() <= prepare_image(bright, preprocessing).min()
    full = Image.fromarray(np.full((2, 2), 65535, np.int32), "I")
    assert (prepare_image(full, preprocessing) == 255).all()


def test_symbols_are_squashed_to_a_square() -> None:
    image = Image.new("L", (40, 10), 0)
    assert prepare_image(image, SYMBOL_GRAY).shape == (8, 8, 1)


def test_photos_keep_their_aspect_and_crop_the_centre() -> None:
    # Red | green | blue thirds: the centre crop of the wide photo is green only.
    array = np.zeros((30, 90, 3), dtype=np.uint8)
    array[:, :30, 0] = array[:, 30:60, 1] = array[:, 60:, 2] = 255
    prepared = prepare_image(Image.fromarray(array), PHOTO)
    assert prepared.shape == (16, 16, 3)
    assert (prepared[:, 2:-2, 1] == 255).all()
    assert (prepared[:, 2:-2, [0, 2]] == 0).all()


def _exif_rotated_jpeg() -> bytes:
    # The stored pixels are wide (red left, blue right); EXIF orientation 6 says "rotate 90 CW".
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32, 0] = 255
    array[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95)


def test_symbol_mode_applies_the_exif_rotation_too() -> None:
    """A phone photo of a handwritten symbol is stored sideways, shown upright."""
    image = decode_image(_exif_rotated_jpeg(), "rotated.jpg")
    prepared = prepare_image(image, SYMBOL_RGB).astype(int)
    upright = prepare_image(ImageOps.exif_transpose(image), SYMBOL_RGB).astype(int)
    assert np.abs(prepared - upright).max() <= 1
    assert prepared[:2, :, 0].mean() > 200 and prepared[-2:, :, 2].mean() > 200


def test_photo_mode_applies_the_exif_rotation() -> None:
    image = decode_image(_exif_rotated_jpeg(), "rotated.jpg")
    assert image.size == (64, 32)
    prepared = prepare_image(image, PHOTO).astype(int)
    upright = prepare_image(ImageOps.exif_transpose(image), PHOTO).astype(int)
    assert np.abs(prepared - upright).max() <= 1
    # After a 90-degree clockwise turn the red half is on top and the blue half below.
    assert prepared[:4, :, 0].mean() > 200 and prepared[:4, :, 2].mean() < 60
    assert prepared[-4:, :, 2].mean() > 200 and prepared[-4:, :, 0].mean() < 60


def _with_exif_chunk(png: bytes, exif: bytes) -> bytes:
    """``png`` with an eXIf chunk holding ``exif`` right after its header chunk."""
    return png[:33] + _png_chunk(b"eXIf", exif) + png[33:]


@pytest.mark.parametrize("preprocessing", [SYMBOL_GRAY, PHOTO])
def test_a_corrupt_exif_block_keeps_the_pixels_unturned(preprocessing) -> None:
    png = _encode(_noise((20, 12)))
    corrupt = _with_exif_chunk(png, b"garbage!garbage!")  # Pillow: "not a TIFF file".
    prepared = prepare_bytes(corrupt, "corrupt-exif.png", preprocessing)
    assert np.array_equal(prepared, prepare_bytes(png, "plain.png", preprocessing))


def test_an_exif_orientation_in_a_png_turns_it_as_in_a_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    image = _noise((20, 12))
    turned = prepare_bytes(_with_exif_chunk(_encode(image), exif.tobytes()), "six.png", PHOTO)
    upright = image.transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(turned, prepare_image(upright, PHOTO))


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 90),
    height=st.integers(1, 90),
    mode=st.sampled_from(
        ["1", "L", "LA", "La", "P", "RGB", "RGBA", "CMYK", "LAB", "I;16", "I", "F"]
    ),
    preprocessing=st.sampled_from([SYMBOL_GRAY, SYMBOL_RGB, PHOTO]),
)
def test_prepare_image_property(width, height, mode, preprocessing) -> None:
    if mode == "I;16":
        image = Image.fromarray(np.full((height, width), 40_000, dtype=np.uint16))
    else:
        image = _noise((width, height)).convert(mode)
    array = prepare_image(image, preprocessing)
    size = preprocessing.stored_size
    assert array.shape == (size, size, preprocessing.channels) and array.dtype == np.uint8


def test_a_folder_is_scanned_for_every_accepted_format() -> None:
    """Each format read (ICO and TGA too) has a suffix in IMAGE_SUFFIXES, so a folder of such
    files is not reported as holding no images."""
    Image.init()
    for name in set(IMAGE_FORMATS) - {"MPO"}:  # Cameras' MPO files are named .jpg.
        suffixes = {ext for ext, fmt in Image.registered_extensions().items() if fmt == name}
        assert suffixes & IMAGE_SUFFIXES, (name, sorted(suffixes))
