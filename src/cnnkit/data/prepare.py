"""Turning a PIL image (or a numpy array) into the stored uint8 array a model takes.

Training (at cache time) and prediction both call :func:`prepare_image`, so the two can never
preprocess differently.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import ExifTags, Image

from cnnkit.config import Preprocessing
from cnnkit.data.image import BadImageError, decode_image

logger = logging.getLogger(__name__)

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


# Where Pillow's getexif() finds an orientation: EXIF, PNG's raw EXIF profile, and XMP.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; as it is where the EXIF is unreadable.
    A turned image keeps no EXIF, so turning it again leaves it as it is.

    Only the orientation is read: ``ImageOps.exif_transpose`` also rewrites the EXIF block, and
    Pillow raises for a corrupt one (SyntaxError: "not a TIFF file") although the pixels decode.
    """
    try:
        method = _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as error:  # Pillow raises many types for corrupt EXIF data.
        logger.debug("ignoring unreadable EXIF data (%s: %s)", type(error).__name__, error)
        return image
    if method is None:
        return image
    turned = image.transpose(method)
    for key in _ORIENTATION_SOURCES:  # transpose copies them, orientation and all.
        turned.info.pop(key, None)
    return turned


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
    image = upright(image)
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
