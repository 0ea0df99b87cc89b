"""Turn a drawing from the web page's canvas into a 32x32 symbol that looks like HASYv2 data
(or into the form of scikit-learn's digits: :func:`canvas_to_digit`).

The figures below were measured on 1,000 random HASYv2 training images (32x32 PNGs):

- Pixels are pure black ink (0) on white (255); there is no anti-aliasing.
- The ink bounding box touches two opposite edges: its longer side is 32 px in 99% of the images
  (margin 0 px), the aspect ratio is kept (shorter side: median 24.5 px, 5th percentile 10 px),
  and the symbol is centred on the shorter axis (median offset 0 px).
- Strokes are about 2 px wide: twice the ink area over its perimeter gives a median of 1.8 px
  (interquartile range 1.65-1.93), and the shortest horizontal or vertical ink run through an ink
  pixel has a median of 2 px. Ink covers 17% of the frame (median).
- A lone dot (``\\cdot``) is not blown up to fill the frame: it is a disc about 5 px across,
  centred.

:func:`canvas_to_symbol` reproduces this: it finds the ink, reduces the strokes to their
one-pixel centre line (so the width the user drew with does not matter), scales that line so the
re-drawn ink fills the frame, and re-draws it 2 px wide.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cnnkit.data.digits import ink_counts_to_pixels
from cnnkit.data.prepare import convert_image

SYMBOL_SIZE = 32
STROKE_WIDTH = 2.0
# scikit-learn's digits: 8x8 counts of 4x4 blocks of a 32x32 bitmap (canvas_to_digit).
DIGIT_SIZE = 8
# Drawings of the digits' test split (benchmarks/canvas_digits.py), scored by a digits model:
# 81.9%, 88.9%, 90.3% and 90.3% with strokes 2, 3, 4 and 5 px wide (HASYv2's form: 78.8%).
DIGIT_STROKE_WIDTH = 4.0
DOT_DIAMETER = 5
INK_THRESHOLD = 128

# The centre line is traced and re-drawn at SUPERSAMPLE times the output resolution, then
# averaged down, so the 2 px stroke width is met on average rather than rounded to whole pixels.
_SUPERSAMPLE = 4
# A drawing narrower than this many (estimated) stroke widths is a tap or a dot, not a shape.
_DOT_EXTENT_IN_WIDTHS = 3.0


def ink_mask(image: Image.Image) -> np.ndarray:
    """Boolean ``[H, W]`` mask of dark pixels, read as uploads are (:func:`convert_image`): any
    transparency composited onto white, and 16-bit or other deep pixels scaled, not clipped.

    Raises:
        BadImageError: for a mode Pillow cannot convert.
    """
    return np.asarray(convert_image(image, "L")) < INK_THRESHOLD


def estimate_stroke_width(mask: np.ndarray) -> float:
    """Stroke width in pixels as twice the ink area over the ink perimeter (4-connected edges)."""
    padded = np.pad(mask, 1)
    perimeter = np.count_nonzero(padded[1:, :] != padded[:-1, :]) + np.count_nonzero(
        padded[:, 1:] != padded[:, :-1]
    )
    return 2.0 * np.count_nonzero(mask) / max(perimeter, 1)


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning: reduce a boolean mask to a connected one-pixel-wide centre line."""
    skeleton = mask.copy()
    while True:
        changed = False
        for step in (0, 1):
            padded = np.pad(skeleton, 1)
            # Neighbours P2..P9, clockwise from north.
            north, north_east = padded[:-2, 1:-1], padded[:-2, 2:]
            east, south_east = padded[1:-1, 2:], padded[2:, 2:]
            south, south_west = padded[2:, 1:-1], padded[2:, :-2]
            west, north_west = padded[1:-1, :-2], padded[:-2, :-2]
            ring = [north, north_east, east, south_east, south, south_west, west, north_west]
            count = sum(neighbour.astype(np.uint8) for neighbour in ring)
            transitions = sum((~ring[i] & ring[(i + 1) % 8]).astype(np.uint8) for i in range(8))
            if step == 0:
                keep_shape = ~(north & east & south) & ~(east & south & west)
            else:
                keep_shape = ~(north & east & west) & ~(north & south & west)
            removable = skeleton & (count >= 2) & (count <= 6) & (transitions == 1) & keep_shape
            if removable.any():
                skeleton &= ~removable
                changed = True
        if not changed:
            return skeleton


def _disc_offsets(radius: float) -> list[tuple[int, int]]:
    reach = int(np.ceil(radius))
    return [
        (dy, dx)
        for dy in range(-reach, reach + 1)
        for dx in range(-reach, reach + 1)
        if dy * dy + dx * dx <= radius * radius
    ]


def _stamp(points: np.ndarray, size: int, radius: float) -> np.ndarray:
    """Boolean ``[size, size]`` image with a disc of ``radius`` at every ``(y, x)`` point."""
    canvas = np.zeros((size, size), dtype=bool)
    for dy, dx in _disc_offsets(radius):
        shifted = points + (dy, dx)
        inside = (shifted >= 0).all(axis=1) & (shifted < size).all(axis=1)
        canvas[shifted[inside, 0], shifted[inside, 1]] = True
    return canvas


def _centre_line(crop: np.ndarray, stroke_width: float) -> np.ndarray:
    """``(y, x)`` points of the crop's centre line, traced at about the supersampled scale."""
    height, width = crop.shape
    extent = max(height, width)
    # Scale so the centre line spans about the frame; the exact fit is done on the traced points.
    scale = SYMBOL_SIZE * _SUPERSAMPLE / max(extent - stroke_width, 1.0)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize(
        new_size, Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    # A low threshold keeps strokes that shrink to under a pixel connected.
    points = np.argwhere(thin(np.asarray(resized) >= 64))
    if len(points) == 0:
        # Ink much wider than tall, such as dots side by side, can shrink to nothing: place
        # every ink pixel at the same scale instead.
        points = np.rint(np.argwhere(crop) * scale).astype(np.int64)
    return points


def canvas_to_symbol(image: Image.Image) -> Image.Image:
    """Turn a canvas drawing (dark ink on a light or transparent background) into HASYv2 form.

    Crops to the ink, keeps the aspect ratio, scales the drawing so its longer side fills the
    32 px frame (HASYv2 has no margin), centres it, and re-draws the strokes 2 px wide in pure
    black on white. A drawing with no ink gives a blank frame; a dot gives a centred 5 px disc.

    Args:
        image: the drawing, any PIL mode and size.

    Returns:
        A 32x32 ``"L"`` image.

    Raises:
        BadImageError: for a mode Pillow cannot convert.
    """
    blocks = _block_ink(_redrawn(image, STROKE_WIDTH), _SUPERSAMPLE)
    return Image.fromarray(np.where(blocks >= 0.5, 0, 255).astype(np.uint8), mode="L")


def canvas_to_digit(image: Image.Image) -> Image.Image:
    """Turn a canvas drawing into the form of scikit-learn's digits (the ``digits`` dataset).

    Those are 32x32 bitmaps of a digit filling the frame, each 4x4 block's ink counted (0-16)
    into an 8x8 grey image. The drawing is re-drawn as for :func:`canvas_to_symbol`, with
    strokes ``DIGIT_STROKE_WIDTH`` wide, and counted the same way; the model's preprocessing
    then upscales the 8x8 image as it did the training scans.

    Returns:
        An 8x8 ``"L"`` image, dark ink on white.
    """
    block = _SUPERSAMPLE * SYMBOL_SIZE // DIGIT_SIZE
    ink = np.rint(_block_ink(_redrawn(image, DIGIT_STROKE_WIDTH), block) * 16)
    return Image.fromarray(ink_counts_to_pixels(ink), mode="L")


def _redrawn(image: Image.Image, stroke_width: float) -> np.ndarray:
    """The drawing's centre line, fitted to the frame and re-drawn ``stroke_width`` px wide, as
    a boolean mask at ``_SUPERSAMPLE`` times the 32 px frame."""
    frame = SYMBOL_SIZE * _SUPERSAMPLE
    mask = ink_mask(image)
    if not mask.any():
        return np.zeros((frame, frame), dtype=bool)
    rows, columns = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    crop = mask[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    drawn_width = estimate_stroke_width(crop)
    centre = (frame - 1) / 2.0
    if max(crop.shape) < _DOT_EXTENT_IN_WIDTHS * drawn_width:
        # By this estimate a filled disc is about 2.5 stroke widths across; a stroke is longer.
        dot = np.array([[round(centre), round(centre)]])
        return _stamp(dot, frame, DOT_DIAMETER * _SUPERSAMPLE / 2.0)
    points = _centre_line(crop, drawn_width).astype(np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    span = max(float((high - low).max()), 1.0)
    radius = stroke_width * _SUPERSAMPLE / 2.0
    # Map the centre line so that, once re-drawn with discs of `radius`, the ink spans the frame.
    fit = (frame - 1 - 2.0 * radius) / span
    # The trace was made at about this scale, so `fit` is close to 1 and the discs cover any
    # gap it opens between neighbouring points.
    placed = np.rint((points - (low + high) / 2.0) * fit + centre).astype(np.int64)
    return _stamp(placed, frame, radius)


def _block_ink(mask: np.ndarray, block: int) -> np.ndarray:
    """The share of ink in each ``block`` x ``block`` square of a square mask."""
    size = mask.shape[0] // block
    return mask.reshape(size, block, size, block).mean(axis=(1, 3))
