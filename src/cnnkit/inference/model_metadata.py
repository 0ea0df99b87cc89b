"""A model file's metadata: :class:`ModelMetadata` (what rebuilds the model and preprocesses its
input), its validation, and its JSON text as model files and ONNX exports store it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cnnkit import __version__
from cnnkit.config import Preprocessing

FORMAT_NAME = "cnnkit-model"
FORMAT_VERSION = 1
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
