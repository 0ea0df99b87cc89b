"""Decoding image bytes safely: the formats read, the size limit, and one error type
(:class:`BadImageError`) naming the file for whatever is wrong with it."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import warnings
from collections.abc import Iterator

from PIL import Image

from cnnkit.data.files import read_regular_file

logger = logging.getLogger(__name__)

# Refuse decompression bombs well before they exhaust memory: 64 megapixels is far above any
# photo this tool is meant for, and PIL raises DecompressionBombError at twice its limit.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# The formats read, in Pillow's names: those Pillow decodes itself. Pillow identifies every
# format it has a plugin for, and some plugins run other programs (EPS runs Ghostscript): an
# upload, or a file in a dataset, must never start one. MPO is how Pillow before 13 names many
# cameras' JPEGs.
IMAGE_FORMATS = (
    "PNG",
    "JPEG",
    "MPO",
    "GIF",
    "BMP",
    "WEBP",
    "TIFF",
    "PPM",
    "AVIF",
    "JPEG2000",
    "ICO",
    "TGA",
)
_FORMAT_NAMES = "PNG, JPEG, GIF, BMP, WebP, TIFF, PPM/PGM, AVIF, JPEG 2000, ICO or TGA"
# The file names a folder of images is scanned for (a folder dataset, predict's folders).
IMAGE_SUFFIXES = frozenset(
    (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    + (".avif", ".jp2")
    + (".pgm", ".ppm", ".ico", ".tga")
)

_OBJECT_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_PIXEL_COUNT = re.compile(r"\((\d+) pixels\)")


@functools.cache
def accepted_formats() -> tuple[str, ...]:
    """:data:`IMAGE_FORMATS` that this Pillow opens as formats of their own (Pillow 13 reads
    MPO files through its JPEG plugin and has no MPO opener)."""
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


class BadImageError(ValueError):
    """An image file that is missing, empty, truncated, corrupt or not an image."""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks read before giving a PNG to Pillow; an image's headers usually take a handful.
_PNG_CHUNKS_READ = 16


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """``(width, height)`` from an image file's header, without decoding its pixels.

    A PNG whose one header chunk (IHDR) comes first is read directly; anything else goes
    through Pillow, which takes the last IHDR before the pixel data, so a PNG with two is
    Pillow's to read.

    Raises:
        BadImageError: as :func:`open_image`.
    """
    size = _png_header_size(data)
    return size if size is not None else open_image(data, name).size


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    if not data.startswith(_PNG_SIGNATURE) or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    position = 8 + 12 + 13  # Past the signature and the first IHDR (length, type, data, CRC).
    for _ in range(_PNG_CHUNKS_READ):
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if kind == b"IHDR" or len(kind) < 4:
            return None
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return None


def open_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Open image bytes without decoding the pixels: format, mode and size come from the header.

    Args:
        data: the encoded file contents.
        name: a path or label used in the error message.

    Returns:
        A PIL image whose pixels are not loaded yet.

    Raises:
        BadImageError: naming ``name``, for empty data, data that is not an image in one of
            :data:`IMAGE_FORMATS`, or an image of more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    if not data:
        raise BadImageError(f"{name}: empty file")
    with _bad_image_errors(name), warnings.catch_warnings():
        # Pillow warns above its limit and refuses twice that, each naming its own number; the
        # check below refuses first (with this project's limit), and the warning is no news.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=accepted_formats())
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise _too_large(name, image.width * image.height, f"{image.width}x{image.height}")
    return image


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes fully, raising :class:`BadImageError` with ``name`` on any problem.

    Args:
        data: the encoded file contents.
        name: a path or label used in the error message.

    Returns:
        A loaded PIL image (first frame for animated formats).
    """
    image = open_image(data, name)
    with _bad_image_errors(name), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image.load()
    return image


@contextlib.contextmanager
def _bad_image_errors(name: str) -> Iterator[None]:
    """Turn whatever PIL raises for bad data into :class:`BadImageError` naming ``name``."""
    try:
        yield
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Only Pillow's message holds the pixel count: its check runs before ours can.
        counted = _PIXEL_COUNT.search(str(error))
        raise _too_large(name, int(counted.group(1)) if counted else None) from error
    except Image.UnidentifiedImageError as error:
        raise BadImageError(f"{name}: not a readable image (not {_FORMAT_NAMES})") from error
    except Exception as error:  # PIL raises many types for corrupt data; all mean "bad image".
        kind = "truncated" if "truncated" in str(error).lower() else "not a readable image"
        # PIL names the in-memory stream ("<_io.BytesIO object at 0x...>"): say "data" instead.
        detail = _OBJECT_ADDRESS.sub("data", str(error))
        raise BadImageError(f"{name}: {kind} ({type(error).__name__}: {detail})") from error


def _too_large(name: str, pixels: int | None, size: str = "") -> BadImageError:
    """The one error for an image over :data:`MAX_IMAGE_PIXELS`, however it was found."""
    counted = "" if pixels is None else f"{pixels:,} pixels"
    described = ", ".join(part for part in (counted, size) if part)
    return BadImageError(
        f"{name}: image too large ({described or 'too many pixels'}); images of up to "
        f"{MAX_IMAGE_PIXELS:,} pixels are accepted"
    )


def read_image_file(path: str) -> Image.Image:
    """Read and decode an image file, raising :class:`BadImageError` naming the path."""
    try:
        data = read_regular_file(path)
    except OSError as error:
        raise BadImageError(
            f"{path or repr(path)}: cannot read ({error.strerror or error})"
        ) from error
    except ValueError as error:  # A name no file can have: a NUL character in it.
        raise BadImageError(f"{path!r}: cannot read ({error})") from error
    return decode_image(data, path)
