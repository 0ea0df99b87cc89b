"""The single-file model format: safetensors weights plus JSON metadata, never pickle.

The metadata (architecture, options, class names, preprocessing) lets :func:`load_model`
rebuild the network before loading its tensors; a SHA-256 of the tensors guards against
tampering and corruption.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cnnkit.atomic import write_atomically
from cnnkit.data.image import IMAGE_SUFFIXES
from cnnkit.errors import error_line
from cnnkit.inference.checksums import check_metadata_digest, metadata_digest, tensor_digest
from cnnkit.inference.model_metadata import (
    ModelFileError,
    ModelMetadata,
    newer_writer,
    parse_metadata_text,
    utf8_json,
)
from cnnkit.runtime import select_device

# The format's public names, the metadata's among them, all importable from here.
__all__ = [
    "ModelFileError",
    "ModelMetadata",
    "load_model",
    "read_metadata",
    "refuse_onnx",
    "resolve_model_file",
    "save_model",
]

_METADATA_KEY = "cnnkit"


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
    text = {_METADATA_KEY: utf8_json(_header(tensors, metadata, half))}
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=text))
    return path


def _header(tensors: dict[str, torch.Tensor], metadata: ModelMetadata, half: bool) -> dict:
    """The metadata a model file stores, with the digests of its tensors and of itself."""
    header = metadata.to_dict()
    header["tensor_sha256"] = tensor_digest(tensors)
    header["dtype"] = "float16" if half else "float32"
    header["metadata_sha256"] = metadata_digest(header)
    return header


def holds_model(path: str | Path, model: nn.Module, metadata: ModelMetadata) -> bool:
    """Whether the model file at ``path`` holds ``model`` with ``metadata`` as
    :func:`save_model` would write them (in float32): the same weights and metadata, judged by
    their recorded digests. False for a file that is missing or unreadable."""
    try:
        stored = read_metadata(path)
    except ModelFileError:
        return False
    header = _header(_state_tensors(model, half=False), metadata, half=False)
    return stored == json.loads(utf8_json(header))  # As stored: tuples read back as lists.


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
                if path.suffix.lower() in IMAGE_SUFFIXES:  # `cnnkit serve photo.jpg`
                    raise ModelFileError(
                        f"{path}: an image, not a model file (pass a .safetensors model file "
                        "or a training run's folder)"
                    )
                raise ModelFileError(f"{path}: truncated or not a safetensors file")
            header = json.loads(stream.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelFileError(f"{path}: unreadable safetensors header ({error})") from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(metadata or {}, dict):
        raise ModelFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    text = (metadata or {}).get(_METADATA_KEY)
    return parse_metadata_text(text, str(path), "safetensors file")


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
    tensors = _load_checked_tensors(path, raw.get("tensor_sha256"))
    # The layers first, with no memory for their weights: options that do not fit the tensors
    # (a hidden size of 1e9) are refused before anything is allocated.
    _check_tensors_fit(path, metadata, tensors, _rebuild(path, metadata, outline=True))
    model = _rebuild(path, metadata, outline=False)
    model.load_state_dict(_cast_to_state(path, tensors, model.state_dict()), strict=True)
    model.metadata = metadata
    return model.to(device).eval()


def _load_checked_tensors(path: Path, expected: str | None) -> dict[str, torch.Tensor]:
    """The file's tensors, once their SHA-256 matches ``expected`` (the metadata's).

    Raises:
        ModelFileError: naming ``path`` for corrupt tensor data or a missing or wrong checksum.
    """
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: corrupt tensor data ({error})") from error
    if expected is None:
        raise ModelFileError(f"{path}: metadata has no tensor_sha256")
    if tensor_digest(tensors) != expected:
        raise ModelFileError(f"{path}: tensor checksum mismatch (file modified or corrupt)")
    return tensors


def _cast_to_state(
    path: Path, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``tensors`` in the dtypes of the model's ``state`` (a float16 file loads as float32).

    Raises:
        ModelFileError: naming ``path`` for a tensor that is not a float where one is expected,
            or the other way round.
    """
    for name, tensor in tensors.items():
        wanted = state[name].dtype
        # Floats of any width convert; integer or boolean weights would only be garbage.
        if tensor.is_floating_point() != state[name].is_floating_point():
            raise ModelFileError(
                f"{path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                f"{'a float type' if state[name].is_floating_point() else wanted} expected"
            )
        tensors[name] = tensor.to(wanted)
    return tensors


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
