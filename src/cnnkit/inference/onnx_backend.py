"""Predict with onnxruntime instead of torch: the same interface as :class:`Predictor`.

Only the forward pass differs; decoding, preprocessing and ranking are :class:`Predictor`'s own
code, so both backends prepare images identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit import __version__
from cnnkit.atomic import write_atomically
from cnnkit.inference.artifact import (
    ModelFileError,
    ModelMetadata,
    read_metadata,
)
from cnnkit.inference.export import (
    QUANTIZATION_KEY,
    build_onnx_model,
    metadata_from_properties,
)
from cnnkit.inference.predictor import Predictor, check_threads, resolve_model_path
from cnnkit.paths import default_cache_dir
from cnnkit.runtime import available_cores, int8_products_saturate

logger = logging.getLogger(__name__)


def create_session(
    model: str | Path | bytes, threads: int | None = None, exact_int8: bool = False
) -> Any:
    """An onnxruntime CPU session with all graph optimisations and one thread per core.

    Args:
        model: an ``.onnx`` file or its serialized bytes.
        threads: intra-op threads (default: :func:`available_cores`).
        exact_int8: run int8 products in kernels that cannot saturate (slower), for 8-bit
            weights on a CPU where the fast ones do (:func:`int8_products_saturate`).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    # Idle worker threads sleep rather than spin between runs. Spinning saves microseconds on
    # back-to-back large batches, but in a server it takes the cores the event loop needs:
    # with it, the bundled model's int8 export served 16 clients at p50 14.9-15.3 ms, without
    # it 9.95-10.03 ms (benchmarks/serve_load.py, 2 cores; README, Results).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if exact_int8:
        options.add_session_config_entry("session.x64quantprecision", "1")
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(
        source, sess_options=options, providers=["CPUExecutionProvider"]
    )


def _session_metadata(session: Any, source: str) -> dict[str, Any]:
    return metadata_from_properties(session.get_modelmeta().custom_metadata_map, source)


def _export_key(raw: dict[str, Any]) -> str:
    """A name for a model's export: a hash of its metadata, which holds the tensors' SHA-256,
    and of the cnnkit and torch versions that export it (a newer exporter exports again)."""
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    text += f"|cnnkit {__version__}|torch {torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _export_name(key: str, data: bytes) -> str:
    """``<key>-<sha256 of the export's bytes>.onnx``: the name checks the contents."""
    return f"{key}-{hashlib.sha256(data).hexdigest()[:16]}.onnx"


def _cached_exports(folder: Path, key: str) -> Iterator[bytes]:
    """The cached exports of ``key`` whose bytes match their name (:func:`_export_name`)."""
    for candidate in sorted(folder.glob(f"{key}-*.onnx")):
        try:
            data = candidate.read_bytes()
        except OSError as error:
            logger.warning("ignoring unreadable %s (%s)", candidate, error)
            continue
        if candidate.name == _export_name(key, data):
            yield data
        else:
            logger.warning("ignoring %s: its contents do not match its checksum", candidate)


def _session_for_safetensors(path: Path, cache_dir: Path | None, threads: int | None) -> Any:
    """A session for a ``.safetensors`` model, exported once and kept in ``cache_dir/onnx``.

    The cached file is named by a hash of the model's metadata (which includes the SHA-256 of
    its tensors) and a hash of the export's own bytes, and is used only while both match; the
    model's folder (perhaps read-only, or the installed package) is never written to.
    """
    raw = read_metadata(path)
    key = _export_key(raw)
    folder = cache_dir / "onnx" if cache_dir is not None else None
    for data in _cached_exports(folder, key) if folder is not None and folder.is_dir() else ():
        try:
            session = create_session(data, threads)
            if _session_metadata(session, str(path)) == raw:
                return session
        except Exception as error:  # onnxruntime raises its own unrelated types.
            logger.warning("ignoring a cached ONNX export of %s (%s)", path, error)
    data = build_onnx_model(path).SerializeToString()
    if folder is not None:
        target = folder / _export_name(key, data)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(target, lambda temporary: temporary.write_bytes(data))
        except OSError as error:
            logger.info("not caching the ONNX export of %s (%s)", path, error)
    return create_session(data, threads)


def _cache_folder(cache_dir: str | Path | None) -> Path | None:
    """``cache_dir``, else the default cache folder; None (no cache) where there is no home."""
    if cache_dir is not None:
        return Path(cache_dir)
    try:
        return default_cache_dir()
    except RuntimeError as error:  # Path.home() without HOME or a passwd entry.
        logger.info("not caching ONNX exports (%s)", error)
        return None


def _weights_may_saturate(session: Any) -> bool:
    """Whether ``session`` runs an int8 export whose weights are not known to keep to 7 bits
    (cnnkit exported 8-bit weights before) on a CPU whose fast int8 products saturate."""
    raw = session.get_modelmeta().custom_metadata_map.get(QUANTIZATION_KEY)
    if raw is None or not int8_products_saturate():
        return False
    try:
        details = json.loads(raw)
    except (ValueError, RecursionError):
        details = None
    return not (isinstance(details, dict) and details.get("weight_bits") == 7)


def _int8_session(path: Path, threads: int | None) -> Any:
    """A session for the ``.onnx`` file ``path``; an int8 export with 8-bit weights on a CPU
    where they saturate runs in onnxruntime's exact kernels, with a warning."""
    session = create_session(path, threads)
    if not _weights_may_saturate(session):
        return session
    logger.warning(
        "%s: its int8 weights may use all 8 bits, whose products saturate on this CPU (x86 "
        "without VNNI), so onnxruntime runs its exact kernels, 1.3-1.9x slower; for 7-bit "
        "weights, as fast and as accurate, export the float model again: `cnnkit export "
        "MODEL.safetensors --quantize int8 --dataset ... --data ...`",
        path,
    )
    return create_session(path, threads, exact_int8=True)


class OnnxPredictor(Predictor):
    """A :class:`Predictor` whose forward pass runs in onnxruntime on the CPU.

    Example:
        >>> predictor = OnnxPredictor.from_file("runs/hasy-symbol_cnn/model.safetensors")
        >>> predictor.predict("alpha.png")[0][0].label
        '\\\\alpha'
    """

    def __init__(self, session: Any, metadata: ModelMetadata) -> None:
        # Predictor.__init__ expects a torch module; everything else it sets is set here.
        self.session = session
        self.model = None
        self.metadata = metadata
        self.device = torch.device("cpu")
        self._lock = threading.Lock()
        properties = session.get_modelmeta().custom_metadata_map
        self.runtime = "onnxruntime int8" if QUANTIZATION_KEY in properties else "onnxruntime"
        self._input_name = session.get_inputs()[0].name
        self._output_name = session.get_outputs()[0].name

    @classmethod
    def from_file(
        cls,
        path: str | Path | None = None,
        device: str = "cpu",
        cache: bool = True,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> OnnxPredictor:
        """Load an ``.onnx`` file from :func:`cnnkit.inference.export.export_onnx`, or a
        ``.safetensors`` model file (exported on the fly, see below).

        Args:
            path: the model file, a training run's folder, or None for the bundled model.
            device: only ``"cpu"`` (or ``"auto"``, which means it here) is supported.
            cache: for a ``.safetensors`` file, keep the export in ``cache_dir/onnx`` and
                reuse it while it matches the model's metadata (with its tensors' SHA-256)
                and its own checksum; False exports in memory every time.
            threads: onnxruntime intra-op threads (default: one per available core).
            cache_dir: default :func:`cnnkit.paths.default_cache_dir`.

        Raises:
            ModelFileError: for a missing or invalid model file.
            ValueError: for a device other than the CPU, or ``threads`` not a whole number >= 1.
        """
        if device not in ("cpu", "auto"):
            raise ValueError(f"the ONNX backend runs on the CPU only; got device {device!r}")
        threads = check_threads(threads)  # Not the file's fault: checked before opening it.
        path = resolve_model_path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        if path.suffix.lower() == ".onnx":
            try:
                session = _int8_session(path, threads)
            except ImportError:  # onnxruntime missing or broken: not the file's fault.
                raise
            except Exception as error:  # onnxruntime raises its own unrelated types.
                raise ModelFileError(f"{path}: not a valid ONNX file ({error})") from error
        else:
            folder = _cache_folder(cache_dir) if cache else None
            session = _session_for_safetensors(path, folder, threads)
        metadata = ModelMetadata.from_dict(_session_metadata(session, str(path)), str(path))
        return cls(session, metadata)

    def logits(self, prepared: np.ndarray) -> np.ndarray:
        """Logits ``float32 [B, num_classes]`` for prepared ``uint8 [B, S, S, C]`` images."""
        return self.run(self.model_input(prepared).numpy())

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """Logits for normalised ``float32 [B, C, H, W]`` model inputs."""
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        # InferenceSession.run is thread-safe, so concurrent requests need no lock.
        return self.session.run([self._output_name], {self._input_name: inputs})[0]


class OnnxModule(torch.nn.Module):
    """An ONNX model in onnxruntime, called like the torch model (normalised input, logits
    out), with its ``metadata``: what ``cnnkit evaluate`` needs to score an ``.onnx`` file."""

    def __init__(self, predictor: OnnxPredictor) -> None:
        super().__init__()
        self.predictor = predictor
        self.metadata = predictor.metadata

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.predictor.run(x.detach().float().cpu().numpy()))
