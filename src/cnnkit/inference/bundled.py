"""The symbol model shipped inside the package, used when no model file is given.

It ships twice: as a float16 model file (what ``cnnkit predict`` and the Python API load) and
as that file's int8 ONNX export (what ``cnnkit serve`` runs when onnxruntime is installed: a
forward pass 1.5-2.3x as fast on a 2-core CPU, with the float model's fold-1 top-1 accuracy).
``benchmarks/bundle_symbol_model.py`` writes both.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

BUNDLED_SYMBOL_MODEL = "hasy_symbol_cnn.safetensors"
BUNDLED_INT8_MODEL = "hasy_symbol_cnn-int8.onnx"


def _bundled_file(name: str) -> Path:
    return Path(str(resources.files("cnnkit") / "bundled" / name))


def is_bundled(path: Path) -> bool:
    """Whether ``path`` lies in the package's folder of bundled models (where nothing is ever
    written: an installed package may be read-only, and is shared)."""
    folder = _bundled_file(BUNDLED_SYMBOL_MODEL).parent
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def bundled_model_path() -> Path:
    """Path of the bundled HASYv2 symbol model.

    Raises:
        FileNotFoundError: if the package was installed without it.
    """
    path = _bundled_file(BUNDLED_SYMBOL_MODEL)
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled symbol model is missing ({path}); pass a model file explicitly"
        )
    return path


def bundled_int8_path() -> Path | None:
    """Path of the bundled model's int8 ONNX export, or None where it is missing or
    onnxruntime (``pip install cnnkit[web]``) is not installed to run it."""
    path = _bundled_file(BUNDLED_INT8_MODEL)
    if not path.is_file() or importlib.util.find_spec("onnxruntime") is None:
        return None
    return path
