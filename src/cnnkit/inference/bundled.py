"""The symbol model shipped inside the package, used when no model file is given."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_SYMBOL_MODEL = "hasy_symbol_cnn.safetensors"


def bundled_model_path() -> Path:
    """Path of the bundled HASYv2 symbol model.

    Raises:
        FileNotFoundError: if the package was installed without it.
    """
    path = Path(str(resources.files("cnnkit") / "bundled" / BUNDLED_SYMBOL_MODEL))
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled symbol model is missing ({path}); pass a model file explicitly"
        )
    return path
