"""The model file's checksums: SHA-256 of the tensors and of the metadata, which model files and
their ONNX exports both carry so that a modified or corrupt file is refused.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from cnnkit.inference.model_metadata import ModelFileError


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
