"""Decoding image bytes and turning a PIL image into the stored uint8 array.

Training (at cache time) and prediction both call :func:`prepare_image`, so the two can never
preprocess differently.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image

from cnnkit.config import Preprocessing
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
    (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif", ".jp2")
    + (".pgm", ".ppm")
)

_OBJECT_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_PIXEL_COUNT = re.compile(r"\((\d+) pixels\)")
# The turn that shows an image upright for each EXIF orientation, as ImageOps.exif_transpose.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
        raise BadImageError(f"{path}: cannot read ({error.strerror or error})") from error
    return decode_image(data, path)


def _to_uint8(array: np.ndarray, peak: float) -> np.ndarray:
    """``array`` scaled from 0-``peak`` to 0-255 and rounded, as ``uint8``."""
    return (np.asarray(array, dtype=np.float64) / peak * 255.0).round().astype(np.uint8)


def array_to_image(array: np.ndarray, name: str = "array") -> Image.Image:
    """A numpy image as a PIL image: ``H x W`` or ``H x W x C`` with C = 1, 3 (RGB) or 4 (RGBA).

    ``uint8`` (and other integer arrays within 0-255) is taken as is, ``uint16`` spans
    0-65535, ``bool`` is black and white, and floats span 0-1.

    Raises:
        BadImageError: naming ``name``, for any other shape, type or range, or an empty array.
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]  # Pillow has no mode for H x W x 1.
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise BadImageError(
            f"{name}: an image array must be H x W or H x W x 1, 3 or 4; got shape {array.shape}"
        )
    if array.size == 0:
        raise BadImageError(f"{name}: empty image (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise BadImageError(f"{name}: the array holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise BadImageError(
                f"{name}: a float image must lie in 0-1; got {low:g} to {high:g} "
                "(pass uint8 for 0-255)"
            )
        array = _to_uint8(array, 1.0)
    elif array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16, either byte order
        array = _to_uint8(array, 65535.0)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise BadImageError(
                f"{name}: integer pixels must lie in 0-255 (or pass uint16 for 0-65535); "
                f"got {low} to {high}"
            )
        array = array.astype(np.uint8)
    else:
        raise BadImageError(f"{name}: unsupported array type {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in 8-bit ``mode`` (``"L"`` or ``"RGB"``), with any transparency composited onto
    white and 16-bit or other deep pixels scaled to 0-255 rather than clipped.

    Raises:
        BadImageError: for a mode Pillow cannot convert, or a closed image.
    """
    try:
        return _flatten_onto_white(image).convert(mode)
    except ValueError as error:  # Pillow: "conversion from X to Y not supported".
        if "closed image" in str(error):  # Any mode: Pillow's "Operation on closed image".
            raise BadImageError(
                "the PIL image is closed (pass it before its with block ends, or call "
                "image.load() before closing it)"
            ) from error
        raise BadImageError(f"unsupported image mode {image.mode!r} ({error})") from error


def _flatten_onto_white(image: Image.Image) -> Image.Image:
    """Return an RGB or L image, compositing any transparency onto a white background."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray(_to_uint8(np.asarray(image), 65535.0), mode="L")
    if image.mode == "I":
        # Pillow opens 16-bit files (PGM, some PNG and TIFF) as 32-bit "I": they span 0-65535,
        # whatever the brightest pixel of this one image is.
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        return Image.fromarray(_to_uint8(array, 65535.0), "L")
    if image.mode == "F":
        # Floats in 0-1 (as numpy arrays are read, see array_to_image), else 0-255.
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        scale = 255.0 if array.min() >= 0 and array.max() <= 1 else 1.0
        array = np.clip(array * scale, 0, 255)
        return Image.fromarray(array.round().astype(np.uint8), mode="L")
    if image.mode == "La":
        # Premultiplied alpha: Pillow converts "La" to "LA" only.
        image = image.convert("LA")
    # "transparency" is a palette index, or a colour key of an L or RGB image (PNG tRNS).
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; as it is where the EXIF is unreadable.

    Only the orientation is read: ``ImageOps.exif_transpose`` also rewrites the EXIF block, and
    Pillow raises for a corrupt one (SyntaxError: "not a TIFF file") although the pixels decode.
    """
    try:
        method = _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as error:  # Pillow raises many types for corrupt EXIF data.
        logger.debug("ignoring unreadable EXIF data (%s: %s)", type(error).__name__, error)
        return image
    return image if method is None else image.transpose(method)


def _resize_centre_square(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` and keep the centre ``size`` x ``size`` square.

    Only the kept square is resampled. Resizing the whole image first, then cropping, gives the
    same pixels but allocates the whole upscaled image: gigabytes for a thin strip such as a
    1x200000 PNG of a few hundred bytes.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_width - size) // 2, (new_height - size) // 2
    if (width, height) == (new_width, new_height):
        return image.crop((left, top, left + size, top + size))
    # Shrink by whole factors first, as ``resize(..., reducing_gap=3.0)`` of the whole image
    # would, so that the result matches it.
    factor_x = int(width / new_width / 3.0) or 1
    factor_y = int(height / new_height / 3.0) or 1
    if factor_x > 1 or factor_y > 1:
        image = image.reduce((factor_x, factor_y))
    x_ratio = width / factor_x / new_width
    y_ratio = height / factor_y / new_height
    box = (left * x_ratio, top * y_ratio, (left + size) * x_ratio, (top + size) * y_ratio)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def prepare_image(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Convert a decoded image to the stored uint8 array ``[S, S, C]``.

    Args:
        image: any PIL image (any mode, any size).
        preprocessing: the model's preprocessing; ``stored_size`` is ``S``.

    Returns:
        A contiguous ``uint8`` array of shape ``[S, S, channels]``.
    """
    size = preprocessing.stored_size
    if image.width == 0 or image.height == 0:
        raise BadImageError(f"empty image ({image.width}x{image.height} pixels)")
    # Upright as viewers show it: a phone photo of a handwritten symbol is stored sideways.
    image = _upright(image)
    image = convert_image(image, "L" if preprocessing.channels == 1 else "RGB")
    if preprocessing.mode == "symbol":
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
    else:
        image = _resize_centre_square(image, size)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array)


def prepare_bytes(data: bytes, name: str, preprocessing: Preprocessing) -> np.ndarray:
    """Decode bytes and prepare them; raises :class:`BadImageError` naming ``name``."""
    return prepare_image(decode_image(data, name), preprocessing)
