"""Predict with onnxruntime instead of torch: the same interface as :class:`Predictor`.

Only the forward pass differs; decoding, preprocessing and ranking are :class:`Predictor`'s own
code, so both backends prepare images identically.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.atomic import write_atomically
from cnnkit.inference.artifact import (
    ModelFileError,
    ModelMetadata,
    read_metadata,
)
from cnnkit.inference.export import build_onnx_model, metadata_from_properties
from cnnkit.inference.predictor import Predictor

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def create_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with all graph optimisations and one thread per core.

    Args:
        model: an ``.onnx`` file or its serialized bytes.
        threads: intra-op threads (default: :func:`available_cores`).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(
        source, sess_options=options, providers=["CPUExecutionProvider"]
    )


def _session_metadata(session: Any, source: str) -> dict[str, Any]:
    return metadata_from_properties(session.get_modelmeta().custom_metadata_map, source)


def _session_for_safetensors(path: Path, cache: bool, threads: int | None) -> Any:
    """Reuse ``path.with_suffix(".onnx")`` when it was exported from this exact file.

    Otherwise export in memory and, when ``cache`` is set and no such file exists yet, save the
    export there for the next load. An existing file that does not match is never replaced.
    """
    raw = read_metadata(path)
    sidecar = path.with_suffix(".onnx")
    if sidecar.is_file():
        try:
            session = create_session(sidecar, threads)
            if _session_metadata(session, str(sidecar)) == raw:
                return session
            logger.warning("%s was not exported from %s; exporting again in memory", sidecar, path)
        except Exception as error:  # onnxruntime raises its own unrelated types.
            logger.warning("ignoring unreadable %s (%s)", sidecar, error)
    data = build_onnx_model(path).SerializeToString()
    if cache and not sidecar.exists():
        try:
            write_atomically(sidecar, lambda temporary: temporary.write_bytes(data))
        except OSError as error:
            logger.info("not caching the ONNX export next to %s (%s)", path, error)
    return create_session(data, threads)


class OnnxPredictor(Predictor):
    """A :class:`Predictor` whose forward pass runs in onnxruntime on the CPU.

    Example:
        >>> predictor = OnnxPredictor.from_file("runs/hasy/model.safetensors")
        >>> predictor.predict(["alpha.png"])[0][0].label
        '\\\\alpha'
    """

    def __init__(self, session: Any, metadata: ModelMetadata) -> None:
        # Predictor.__init__ expects a torch module; everything else it sets is set here.
        self.session = session
        self.model = None
        self.metadata = metadata
        self.device = torch.device("cpu")
        self._lock = threading.Lock()
        self._input_name = session.get_inputs()[0].name
        self._output_name = session.get_outputs()[0].name

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        device: str = "cpu",
        cache: bool = True,
        threads: int | None = None,
    ) -> OnnxPredictor:
        """Load an ``.onnx`` file from :func:`cnnkit.inference.export.export_onnx`, or a
        ``.safetensors`` model file (exported on the fly, see below).

        Args:
            path: the model file.
            device: only ``"cpu"`` is supported.
            cache: for a ``.safetensors`` file, keep the export as ``<name>.onnx`` beside it
                and reuse that file while it matches the model's metadata and checksum.
            threads: onnxruntime intra-op threads (default: one per available core).

        Raises:
            ModelFileError: for a missing or invalid model file.
            ValueError: for a device other than the CPU.
        """
        if device != "cpu":
            raise ValueError(f"the ONNX backend runs on the CPU only; got device {device!r}")
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        if path.suffix.lower() == ".onnx":
            try:
                session = create_session(path, threads)
            except Exception as error:  # onnxruntime raises its own unrelated types.
                raise ModelFileError(f"{path}: not a valid ONNX file ({error})") from error
        else:
            session = _session_for_safetensors(path, cache, threads)
        metadata = ModelMetadata.from_dict(_session_metadata(session, str(path)), str(path))
        return cls(session, metadata)

    def logits(self, prepared: np.ndarray) -> np.ndarray:
        """Logits ``float32 [B, num_classes]`` for prepared ``uint8 [B, S, S, C]`` images."""
        inputs = np.ascontiguousarray(self.model_input(prepared).numpy(), dtype=np.float32)
        # InferenceSession.run is thread-safe, so concurrent requests need no lock.
        return self.session.run([self._output_name], {self._input_name: inputs})[0]
