"""The single-file model format: safetensors weights plus JSON metadata, never pickle.

The metadata (architecture, options, class names, preprocessing) lets :func:`load_model`
rebuild the network before loading its tensors; a SHA-256 of the tensors guards against
tampering and corruption.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cnnkit import __version__
from cnnkit.atomic import write_atomically
from cnnkit.config import Preprocessing
from cnnkit.errors import error_line
from cnnkit.runtime import select_device

FORMAT_NAME = "cnnkit-model"
FORMAT_VERSION = 1
_METADATA_KEY = "cnnkit"
# What create_model sets itself, so never a model option: a file's options naming one would
# pass it twice.
RESERVED_OPTIONS = ("name", "num_classes", "in_channels", "pretrained")


class ModelFileError(ValueError):
    """A model file that is missing, truncated, tampered with or inconsistent."""


def _version_tuple(text: object) -> tuple[int, ...] | None:
    """``"0.3.1"`` as ``(0, 3, 1)``; None for anything else (``unknown``, a local build)."""
    if not isinstance(text, str):
        return None
    parts = text.split("+")[0].split(".")
    return tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else None


def newer_writer(version: object) -> str:
    """The hint for a file that a newer cnnkit wrote (what this one cannot read may be new
    there): ``"; written by cnnkit 0.3.0, this is 0.1.0: upgrade cnnkit"``, else ``""``."""
    written, running = _version_tuple(version), _version_tuple(__version__)
    if written is None or running is None or written <= running:
        return ""
    return f"; written by cnnkit {version}, this is {__version__}: upgrade cnnkit to read it"


@dataclass(frozen=True)
class ModelMetadata:
    """Everything needed to rebuild a model and preprocess its input."""

    architecture: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    options: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    cnnkit_version: str = __version__

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def kind(self) -> str:
        """``"symbols"`` for drawn symbols, ``"photos"`` for photographs."""
        return "symbols" if self.preprocessing.mode == "symbol" else "photos"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "options": self.options,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "kind": self.kind,
            "preprocessing": asdict(self.preprocessing),
            "training": self.training,
            "cnnkit_version": self.cnnkit_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<metadata>") -> ModelMetadata:
        """Validate and parse metadata; raises :class:`ModelFileError` naming ``source``."""
        if data.get("format") != FORMAT_NAME:
            raise ModelFileError(
                f"{source}: not a cnnkit model file (format {data.get('format')!r})"
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: unsupported model format version {data.get('format_version')!r}"
                + newer_writer(data.get("cnnkit_version"))
            )
        try:
            class_names = tuple(str(name) for name in data["class_names"])
            if data.get("num_classes", len(class_names)) != len(class_names):
                raise ModelFileError(
                    f"{source}: metadata lists {len(class_names)} class names but num_classes is "
                    f"{data['num_classes']}"
                )
            preprocessing = Preprocessing(**data["preprocessing"])
            options, training = data.get("options", {}), data.get("training", {})
            if not isinstance(options, dict) or not isinstance(training, dict):
                raise ModelFileError(f"{source}: metadata options and training must be objects")
            reserved = sorted(set(options) & set(RESERVED_OPTIONS))
            if reserved:
                raise ModelFileError(
                    f"{source}: metadata options name {', '.join(reserved)}, which are not "
                    "options (architecture, class_names and preprocessing set them)"
                )
            return cls(
                architecture=str(data["architecture"]),
                class_names=class_names,
                preprocessing=preprocessing,
                options=dict(options),
                training=dict(training),
                cnnkit_version=str(data.get("cnnkit_version", "unknown")),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, ModelFileError):
                raise
            raise ModelFileError(
                f"{source}: invalid metadata ({error})" + newer_writer(data.get("cnnkit_version"))
            ) from error


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def utf8_json(value: Any) -> str:
    """``value`` as JSON that encodes to UTF-8, as model files and ONNX metadata must: other
    scripts kept as they are, but a name that is not UTF-8 (a file system's odd bytes, held as
    surrogates) escaped as ``\\udcXX``, which reads back as the same string."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def metadata_digest(header: dict[str, Any]) -> str:
    """SHA-256 of the metadata (every key but ``metadata_sha256``), as canonical JSON."""
    body = {key: value for key, value in header.items() if key != "metadata_sha256"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # A path that is not UTF-8 (a recorded data folder) holds surrogates: hashed as its bytes.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def check_metadata_digest(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """``raw`` itself, once its ``metadata_sha256`` is checked: model files and their ONNX
    exports both carry it, so edited class names or preprocessing are refused in either.

    Raises:
        ModelFileError: naming ``source`` when the digest differs or is missing.
    """
    try:
        digest = metadata_digest(raw)
    except RecursionError as error:
        raise ModelFileError(f"{source}: cnnkit metadata is nested too deeply") from error
    if "metadata_sha256" not in raw:
        raise ModelFileError(
            f"{source}: cnnkit metadata has no metadata_sha256 (not written by cnnkit)"
        )
    if raw["metadata_sha256"] != digest:
        raise ModelFileError(f"{source}: metadata checksum mismatch (file modified or corrupt)")
    return raw


def _state_tensors(model: nn.Module, half: bool) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if half and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        tensors[name] = tensor.clone()
    return tensors


def save_model(
    path: str | Path, model: nn.Module, metadata: ModelMetadata, half: bool = False
) -> Path:
    """Write ``model`` and ``metadata`` to one ``.safetensors`` file, atomically.

    Args:
        path: destination file.
        model: the trained network (its ``state_dict`` is saved).
        metadata: architecture, options, class names and preprocessing.
        half: store floating-point tensors as float16 (about half the size).

    Returns:
        The path written.
    """
    path = Path(path)
    tensors = _state_tensors(model, half)
    header = metadata.to_dict()
    header["tensor_sha256"] = tensor_digest(tensors)
    header["dtype"] = "float16" if half else "float32"
    header["metadata_sha256"] = metadata_digest(header)
    text = {_METADATA_KEY: utf8_json(header)}
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=text))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read the raw JSON metadata of a model file without loading its tensors."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: a folder with no model.safetensors in it")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with open(path, "rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            if length <= 0 or length > 100_000_000 or length + 8 > path.stat().st_size:
                raise ModelFileError(f"{path}: truncated or not a safetensors file")
            header = json.loads(stream.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelFileError(f"{path}: unreadable safetensors header ({error})") from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(metadata or {}, dict):
        raise ModelFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    text = (metadata or {}).get(_METADATA_KEY)
    return parse_metadata_text(text, str(path), "safetensors file")


def parse_metadata_text(text: str | None, source: str, container: str) -> dict:
    """The cnnkit metadata dictionary from its stored JSON text.

    Raises:
        ModelFileError: naming ``source`` when the text is missing or not valid JSON.
    """
    if text is None:
        raise ModelFileError(f"{source}: no cnnkit metadata in this {container}")
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{source}: cnnkit metadata is not valid JSON ({error})") from error
    except RecursionError as error:  # Nested deeper than Python's parser goes.
        raise ModelFileError(f"{source}: cnnkit metadata is nested too deeply") from error
    if not isinstance(data, dict):
        raise ModelFileError(f"{source}: cnnkit metadata is not a JSON object")
    return data


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The model file ``path`` names: a training run's ``model.safetensors`` for its folder,
    else ``path`` itself.

    Raises:
        TypeError: unless ``path`` is a str or a path object.
        ValueError: for an empty string (which would mean the current folder).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            "a model path must be a .safetensors file or a training run's folder (str or "
            f"Path); got {type(path).__name__}"
        )
    if path == "":
        raise ValueError("a model path must not be empty")
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    return path


def refuse_onnx(path: Path) -> None:
    """Raise :class:`ModelFileError` with the way to run it if ``path`` is an ONNX file."""
    if path.suffix.lower() == ".onnx":
        raise ModelFileError(
            f"{path}: an ONNX file runs on ONNX Runtime: use "
            "cnnkit.open_predictor(path) (or OnnxPredictor.from_file)"
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from its file or a training run's folder; never unpickles anything.

    The returned module is in eval mode on ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or ``"mps"``) and carries its :class:`ModelMetadata` as ``model.metadata``.

    Raises:
        ModelFileError: if the file is missing, truncated, tampered with, or inconsistent, or
            is an ``.onnx`` file (run one with :func:`cnnkit.open_predictor`).
        TypeError: unless ``path`` is a str or a path object.
        ValueError: for an empty path, or an unknown or unavailable ``device``.
    """
    path = resolve_model_file(path)
    refuse_onnx(path)
    device = select_device(device)
    raw = check_metadata_digest(read_metadata(path), str(path))
    metadata = ModelMetadata.from_dict(raw, str(path))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: corrupt tensor data ({error})") from error
    expected = raw.get("tensor_sha256")
    if expected is None:
        raise ModelFileError(f"{path}: metadata has no tensor_sha256")
    if tensor_digest(tensors) != expected:
        raise ModelFileError(f"{path}: tensor checksum mismatch (file modified or corrupt)")
    # The layers first, with no memory for their weights: options that do not fit the tensors
    # (a hidden size of 1e9) are refused before anything is allocated.
    _check_tensors_fit(path, metadata, tensors, _rebuild(path, metadata, outline=True))
    model = _rebuild(path, metadata, outline=False)
    state = model.state_dict()
    for name, tensor in tensors.items():
        wanted = state[name].dtype
        # Floats of any width convert; integer or boolean weights would only be garbage.
        if tensor.is_floating_point() != state[name].is_floating_point():
            raise ModelFileError(
                f"{path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                f"{'a float type' if state[name].is_floating_point() else wanted} expected"
            )
        tensors[name] = tensor.to(wanted)
    model.load_state_dict(tensors, strict=True)
    model.metadata = metadata
    return model.to(device).eval()


def _rebuild(path: Path, metadata: ModelMetadata, outline: bool) -> nn.Module:
    """The model the metadata describes, on the meta device when ``outline``.

    Raises:
        ModelFileError: naming ``path`` for options the model refuses or cannot be built with.
    """
    from cnnkit.models.registry import create_model, create_model_outline

    create = create_model_outline if outline else create_model
    try:
        return create(
            metadata.architecture,
            num_classes=metadata.num_classes,
            in_channels=metadata.preprocessing.channels,
            **metadata.options,
        )
    # ValueError from the checks; TypeError, RuntimeError (torch) or MemoryError from values
    # that pass them but that no layer can be built with.
    except (ValueError, TypeError, RuntimeError, MemoryError) as error:
        raise ModelFileError(
            f"{path}: cannot rebuild the model ({error_line(error)})"
            + newer_writer(metadata.cnnkit_version)
        ) from error


def _check_tensors_fit(
    path: Path, metadata: ModelMetadata, tensors: dict[str, torch.Tensor], model: nn.Module
) -> None:
    """Refuse tensors whose names or shapes differ from the rebuilt model's state.

    Raises:
        ModelFileError: naming ``path`` and the first tensors that differ.
    """
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    extra = sorted(set(tensors) - set(state))
    if missing or extra:
        raise ModelFileError(
            f"{path}: tensors do not match {metadata.architecture}"
            + (f"; missing {missing[:5]}" if missing else "")
            + (f"; unexpected {extra[:5]}" if extra else "")
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ModelFileError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the architecture "
                f"expects {tuple(state[name].shape)} (class-count or option mismatch?)"
            )
