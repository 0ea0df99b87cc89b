"""Int8 exports with 7-bit and 8-bit weights, in onnxruntime's fast and exact kernels.

Quantizes the bundled symbol model twice (calibrated on 128 of scikit-learn's digits, so it
runs on any machine), then times each export on the digits' test images, one thread, batch 1
and batch 64, best of three passes, all in this process: 7-bit weights in the fast kernels
(what cnnkit exports), 8-bit weights in the fast kernels (what it exported before) and 8-bit
weights in the exact kernels (what cnnkit runs them in where the fast ones saturate). Reports
how often each agrees with the float model where that one is sure (top probability over 0.5).

    python -m benchmarks.int8_kernels
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.record import record_result
from cnnkit.config import DataConfig
from cnnkit.data.normalize import to_model_input
from cnnkit.data.sources import build_splits
from cnnkit.inference.bundled import bundled_model_path
from cnnkit.inference.onnx_backend import create_session
from cnnkit.inference.predictor import Predictor
from cnnkit.inference.quantize import calibration_inputs, quantize_onnx
from cnnkit.runtime import VNNI_FLAGS, cpu_flags, int8_products_saturate

DIGITS = DataConfig(dataset="digits")


def ms_per_image(session, inputs: np.ndarray, batch: int, passes: int = 3) -> float:
    name = session.get_inputs()[0].name
    session.run(None, {name: inputs[:batch]})
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for first in range(0, len(inputs), batch):
            session.run(None, {name: inputs[first : first + batch]})
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="int8_kernels", help="results file name")
    args = parser.parse_args()
    model = bundled_model_path()
    float_predictor = Predictor.from_file(model)
    preprocessing = float_predictor.metadata.preprocessing
    images = np.asarray(build_splits(DIGITS, preprocessing).splits.test.images)
    inputs = to_model_input(torch.from_numpy(images), preprocessing).numpy()
    probabilities = float_predictor.probabilities(images)
    expected, sure = probabilities.argmax(1), probabilities.max(1) > 0.5
    calibration = calibration_inputs(model, DIGITS, count=128)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for bits, exact in ((7, False), (8, False), (8, True)):
            path = Path(folder) / f"int8-{bits}.onnx"
            if not path.exists():
                quantize_onnx(model, path, calibration, weight_bits=bits)
            session = create_session(path, threads=1, exact_int8=exact)
            logits = session.run(None, {session.get_inputs()[0].name: inputs})[0]
            label = f"{bits}-bit weights, {'exact' if exact else 'fast'} kernels"
            rows[label] = {
                "ms_per_image_batch_1": ms_per_image(session, inputs, 1),
                "ms_per_image_batch_64": ms_per_image(session, inputs, 64),
                "sure_agreement": float(np.mean(logits.argmax(1)[sure] == expected[sure])),
            }
            row = rows[label]
            print(
                f"{label:34s} batch 1: {row['ms_per_image_batch_1']:.3f} ms/image, "
                f"batch 64: {row['ms_per_image_batch_64']:.3f} ms/image, agrees with float "
                f"where it is sure: {row['sure_agreement']:.1%}"
            )
    flags = cpu_flags() or frozenset()
    record_result(
        args.name,
        {
            "images": len(images),
            "sure_images": int(sure.sum()),
            "threads": 1,
            "int8_products_saturate": int8_products_saturate(),
            "vnni": bool(VNNI_FLAGS & flags),
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
