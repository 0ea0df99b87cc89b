"""How a digits model does on drawings from the web page's canvas, by the form they are turned
into: the digits' own (``canvas_to_digit``, at several stroke widths), HASYv2's
(``canvas_to_symbol``), or the drawing merely resized as ``cnnkit predict`` would.

Each test image of the digits split becomes a drawing: upscaled to 256 px and thresholded to
pure black on white, as a stroke drawn on the canvas is.

    cnnkit train --dataset digits --out runs/digits
    python -m benchmarks.canvas_digits runs/digits [--widths 2 3 4 5]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from benchmarks.record import record_result
from cnnkit.config import DataConfig
from cnnkit.data.sources import build_splits
from cnnkit.inference.predictor import Predictor
from cnnkit.web import drawing

DRAWING_SIZE = 256


def as_drawing(image: np.ndarray) -> Image.Image:
    """A ``[S, S, 1]`` test image as a canvas drawing: large, pure black ink on white."""
    grey = Image.fromarray(image[..., 0], mode="L").resize(
        (DRAWING_SIZE, DRAWING_SIZE), Image.Resampling.BILINEAR
    )
    return grey.point(lambda value: 0 if value < 128 else 255)


def accuracy(predictor: Predictor, images: list[Image.Image], labels: np.ndarray) -> float:
    predictions = predictor.predict(images, top_k=1)
    names = predictor.metadata.class_names
    right = [names.index(p[0].label) == y for p, y in zip(predictions, labels, strict=True)]
    return float(np.mean(right))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a digits model file or run folder")
    parser.add_argument("--widths", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0])
    parser.add_argument("--name", default="canvas_digits")
    args = parser.parse_args()
    predictor = Predictor.from_file(args.model)
    loaded = build_splits(DataConfig(dataset="digits"), predictor.metadata.preprocessing)
    test = loaded.splits.test
    labels = np.asarray(test.labels)
    drawings = [as_drawing(image) for image in test.images]
    scores = {
        "test images as they are": accuracy(predictor, list(test.images), labels),
        "drawings resized": accuracy(predictor, drawings, labels),
        "drawings in HASYv2 form": accuracy(
            predictor, [drawing.canvas_to_symbol(d) for d in drawings], labels
        ),
    }
    default = drawing.DIGIT_STROKE_WIDTH
    try:
        for width in args.widths:
            drawing.DIGIT_STROKE_WIDTH = width
            forms = [drawing.canvas_to_digit(d) for d in drawings]
            scores[f"drawings in digits form, strokes {width:g} px"] = accuracy(
                predictor, forms, labels
            )
    finally:
        drawing.DIGIT_STROKE_WIDTH = default
    for what, value in scores.items():
        print(f"{what}: {value:.3f}")
    path = record_result(
        args.name,
        {"model": args.model, "test_images": len(labels), "default_width": default, **scores},
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
