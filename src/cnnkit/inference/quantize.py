"""Int8 ONNX models: static post-training quantization, calibrated on real training images.

Weights are quantized per output channel (int8 in [-64, 64]: 7 bits) and activations per
tensor (uint8), with ranges measured on a few hundred training images run through the float
model; onnxruntime then runs convolutions and matrix products in integer arithmetic (VNNI on
recent x86 CPUs). Weights keep to 7 bits because x86 CPUs with AVX2 but without VNNI (many
laptops) multiply uint8 by int8 with an instruction whose 16-bit sums saturate on full 8-bit
weights: there the bundled model's export scored 53.3% top-1 on HASYv2 fold 1 against the
float model's 85.72%, and 85.74% with 7-bit weights. The file keeps the cnnkit metadata, so
:class:`cnnkit.inference.onnx_backend.OnnxPredictor` loads it like any exported model.
Calibrate on images like those the model will see: unrepresentative ranges cost
accuracy (``benchmarks/inference.py --quantize`` measures both speed and accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.atomic import write_atomically
from cnnkit.config import DataConfig
from cnnkit.inference.artifact import ModelMetadata, read_metadata
from cnnkit.inference.export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    QUANTIZATION_KEY,
    build_onnx_model,
    loadable_by_older_runtimes,
)

logger = logging.getLogger(__name__)

CALIBRATION_BATCH = 64


def calibration_inputs(
    model_path: str | Path,
    data: DataConfig,
    count: int = 512,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """``count`` random training images of ``data`` as the model's float32 input.

    The images go through the model file's own preprocessing (the same code as prediction), so
    the measured ranges are those the quantized model will see.

    Raises:
        ValueError: if ``count`` is not positive or the dataset has no training images.
    """
    import torch

    from cnnkit.data.normalize import to_model_input
    from cnnkit.data.sources import build_splits
    from cnnkit.evaluation.evaluate import trained_split_settings

    if count < 1:
        raise ValueError(f"calibration needs at least one image; got {count}")
    # Only the preprocessing is needed here: the header, not the weights.
    metadata = ModelMetadata.from_dict(read_metadata(model_path), str(model_path))
    preprocessing = metadata.preprocessing
    # On the data it trained on, the run's own training images (its seed, shares and limits,
    # as evaluate draws its test split); a dataset too small for a test split still calibrates.
    given = {"dataset": data.dataset, "data": data.data, "fold": data.fold}
    given = {key: value for key, value in given.items() if value is not None}
    settings = trained_split_settings(model_path, metadata.training, given, "test", False)
    data = dataclasses.replace(data, **{k: v for k, v in settings.items() if k not in given})
    splits = build_splits(data, preprocessing, cache_dir=cache_dir, for_training=False).splits
    images = np.asarray(splits.train.images)
    source = data.data or data.dataset
    if len(images) == 0:
        raise ValueError(f"{source}: no training images to calibrate on")
    shared = set(splits.class_names) & set(metadata.class_names)
    if not shared:
        # Legal (the ranges are all calibration needs), but images unlike the model's own
        # data give it ranges it will not see: say so rather than quantize badly in silence.
        logger.warning(
            "%s: none of its %d classes is one of %s's %d: calibrate on the data the model "
            "was trained on for int8 ranges that fit",
            source,
            len(splits.class_names),
            Path(model_path).name,
            metadata.num_classes,
        )
    chosen = np.random.default_rng(seed).choice(len(images), min(count, len(images)), False)
    batch = torch.from_numpy(np.ascontiguousarray(images[np.sort(chosen)]))
    return to_model_input(batch, preprocessing).numpy()


def _batches(inputs: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(inputs), CALIBRATION_BATCH):
        yield {INPUT_NAME: inputs[start : start + CALIBRATION_BATCH]}


def _quantized(proto: Any, calibration: np.ndarray, weight_bits: int) -> Any:
    """The int8 static (QDQ, per-channel weights of ``weight_bits`` bits) quantization of the
    float ONNX ``proto``, its activation ranges calibrated on ``calibration``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _batches(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="cnnkit-quantize-") as folder:
        float_path, prepared, quantized = (Path(folder) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        onnx.save(proto, float_path)
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=weight_bits == 7,
        )
        return onnx.load(quantized)


def quantize_onnx(
    model_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    opset: int = DEFAULT_OPSET,
    *,
    weight_bits: int = 7,
) -> Path:
    """Export ``model_path`` to ONNX and write its int8 static quantization to ``out_path``.

    Args:
        model_path: a ``.safetensors`` cnnkit model file.
        out_path: the ``.onnx`` file to write (atomically).
        calibration: float32 model inputs ``[N, C, H, W]``, e.g. from :func:`calibration_inputs`.
        opset: the ONNX operator set of the float export.
        weight_bits: 7 (weights in [-64, 64]), or 8, which loses accuracy on x86 CPUs without
            VNNI (:func:`cnnkit.runtime.int8_products_saturate`), where onnxruntime then falls
            back to slower exact kernels.

    Returns:
        The path written.

    Raises:
        ValueError: if ``calibration`` is empty or not a batch of images, or ``weight_bits``
            is neither 7 nor 8.
        ModelFileError: if the model file is bad or the export fails.
    """
    import onnx
    import onnxruntime.quantization  # noqa: F401  (Missing, it fails here, before the export.)

    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8; got {weight_bits!r}")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(
            f"calibration must be a non-empty [N, C, H, W] batch; got {calibration.shape}"
        )

    proto = build_onnx_model(model_path, opset)
    result = _quantized(proto, calibration, weight_bits)
    del result.metadata_props[:]
    for prop in proto.metadata_props:
        result.metadata_props.add(key=prop.key, value=prop.value)
    method = f"int8 static QDQ, per-channel {weight_bits}-bit weights"
    details = {"method": method, "weight_bits": weight_bits, "images": len(calibration)}
    result.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(details))
    result.doc_string = proto.doc_string + " (int8)"
    loadable_by_older_runtimes(result)
    onnx.checker.check_model(result, full_check=True)
    data = result.SerializeToString()
    out_path = Path(out_path)
    write_atomically(out_path, lambda temporary: temporary.write_bytes(data))
    logger.info("quantized %s to %s (%d bytes)", model_path, out_path, len(data))
    return out_path
