"""Predict class names for images with a saved model, from Python, the CLI or the web app."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from cnnkit.data.image import BadImageError, decode_image, read_image_file
from cnnkit.data.loader import eval_batch_size
from cnnkit.data.normalize import to_model_input
from cnnkit.data.prepare import array_to_image, prepare_image
from cnnkit.inference.artifact import (
    ModelFileError,
    ModelMetadata,
    load_model,
    resolve_model_file,
)
from cnnkit.runtime import for_inference, select_device

# The names open_predictor and the CLI's --backend take, matched exactly as argparse does.
BACKENDS = ("torch", "onnx")
MAX_BATCH = 512  # Images per forward pass (fewer for large inputs, see eval_batch_size).

ImageInput = Image.Image | str | Path | np.ndarray | bytes | bytearray | memoryview | BinaryIO

_ENCODED = (bytes, bytearray, memoryview)  # Encoded image file contents.
_ONE_IMAGE = "a path, image bytes, a binary file, a PIL image or a numpy array"


def _wrong_type(name: str, value: Any, expected: str = _ONE_IMAGE) -> TypeError:
    """The one-line error for an input of the wrong type; ``name`` says which input."""
    return TypeError(f"{name}: expected {expected}; got {type(value).__name__}")


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image (a path, encoded bytes, an open binary file, a PIL image, an ``HxW[xC]``
    array) as a list of one; an ``NxHxWxC`` array as a list of N; a sequence or iterator of
    images as a list.

    Raises:
        ValueError: for a 3-D array that is not ``HxWxC`` with C = 1, 3 or 4 (a stack of
            grayscale images is ambiguous: pass a list, or an ``NxHxWx1`` array).
        TypeError: for anything else, including a mapping or a set (their order would not
            say which result belongs to which image).
    """
    if isinstance(images, (str, Path, Image.Image, *_ENCODED)) or _is_file(images):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 1 and images.dtype.kind in "USO":
            return images.tolist()  # Paths or encoded files, as a table's column gives them.
        if images.ndim == 4:
            return list(images)
        if images.ndim == 3 and images.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"an array of shape {images.shape} is neither one H x W x C image (C = 1, 3 "
                "or 4) nor an N x H x W x C batch; pass a list of images (or grayscale ones as "
                "N x H x W x 1)"
            )
        return [images]
    if isinstance(images, (Mapping, AbstractSet)) or not isinstance(images, Iterable):
        raise _wrong_type("images", images, f"{_ONE_IMAGE}, or a list of them")
    return list(images)


def _is_file(value: Any) -> bool:
    """Whether ``value`` is an open file (``open(path, "rb")``, ``io.BytesIO``, an upload):
    one image, where iterating it would give lines of bytes."""
    return callable(getattr(value, "read", None)) and not isinstance(value, Image.Image)


def _read_file(file: Any, name: str) -> bytes:
    """The contents of an open binary file; raises TypeError for one opened as text."""
    data = None if isinstance(file, io.TextIOBase) else file.read()
    if data is None or isinstance(data, str):
        raise TypeError(f"{name}: a file opened as text; open it in binary mode ('rb')")
    if not isinstance(data, _ENCODED):
        raise _wrong_type(name, file)
    if not data and callable(getattr(file, "tell", None)) and _position(file):
        raise BadImageError(f"{name}: nothing left to read (the file was read to its end)")
    return bytes(data)


def _position(file: Any) -> int:
    """Where ``file`` stands (0 where it cannot say: a pipe)."""
    try:
        return int(file.tell())
    except (OSError, ValueError):
        return 0


def _at_least_one(name: str, value: Any, also: str = "") -> int:
    """``value`` as an int; raises ValueError naming ``name`` unless it is a whole number >= 1
    (``also`` names what else the caller takes)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1{also}; got {value!r}")
    return int(value)


def check_threads(threads: Any) -> int | None:
    """``threads`` as an int (None: the default); raises ValueError unless it is None or a
    whole number >= 1."""
    return None if threads is None else _at_least_one("threads", threads, " (or None)")


def check_top_k(top_k: Any) -> int:
    """``top_k`` as an int; raises ValueError unless it is a whole number >= 1."""
    return _at_least_one("top_k", top_k)


def resolve_model_path(path: str | Path | None) -> Path:
    """The model file for ``path``: the bundled symbol model for None, else as
    :func:`cnnkit.inference.artifact.resolve_model_file`."""
    if path is None:
        from cnnkit.inference.bundled import bundled_model_path

        return bundled_model_path()
    return resolve_model_file(path)


@dataclass(frozen=True)
class Prediction:
    """One ranked guess: the class name, its index and the softmax probability."""

    label: str
    index: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "confidence": self.confidence}


class Predictor:
    """Wraps a model and its metadata; preprocesses exactly as the training evaluation did.

    Example:
        >>> predictor = Predictor.from_file("runs/hasy-symbol_cnn/model.safetensors")
        >>> predictor.predict("alpha.png")[0][0].label
        '\\\\alpha'
    """

    # What runs the forward pass, as the web API reports it.
    runtime = "pytorch"

    def __init__(self, model: torch.nn.Module, metadata: ModelMetadata, device: str = "cpu"):
        self.device = select_device(device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata
        # Torch modules are not re-entrant across threads for in-place buffers; one lock keeps
        # concurrent web requests safe while the web layer batches them.
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path | None = None, device: str = "cpu") -> Predictor:
        """Load a ``.safetensors`` model file (see :func:`cnnkit.load_model`), a training run's
        folder, or with no ``path`` the bundled symbol model.

        Raises:
            cnnkit.inference.artifact.ModelFileError: for a bad model file, or an ``.onnx``
                file (run one with :func:`open_predictor`).
            TypeError: for a ``path`` that is not a str or a path object.
            ValueError: for an empty ``path``, or an unknown or unavailable ``device``.
        """
        # A model of its own: channels-last memory (for_inference) changes no caller's module.
        model = for_inference(load_model(resolve_model_path(path), device))
        return cls(model, model.metadata, device)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    def prepare(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Decode and convert images to the stored ``uint8 [B, S, S, C]`` form.

        Args:
            images: one image or several (see :func:`as_image_list`): paths, encoded bytes,
                open binary files (read to their end), PIL images of any mode, or arrays
                (see :func:`cnnkit.data.prepare.array_to_image`).

        Raises:
            cnnkit.data.image.BadImageError: for a file that is missing or not an image, or an
                array or image that cannot be one; the message names the path or position.
            ValueError: for a stack of images that is ambiguous (see :func:`as_image_list`).
            TypeError: for anything else.
        """
        return self._prepare(as_image_list(images), 0)

    def _prepare(self, images: list[ImageInput], first: int) -> np.ndarray:
        """:meth:`prepare` for a list whose first image is number ``first`` of the call."""
        arrays = []
        for position, image in enumerate(images, start=first):
            name = str(image) if isinstance(image, (str, Path)) else f"image {position}"
            if isinstance(image, (str, Path)):
                image = read_image_file(str(image))
            elif isinstance(image, _ENCODED):
                image = decode_image(bytes(image), name)
            elif _is_file(image):
                file_name = getattr(image, "name", None)
                name = file_name if isinstance(file_name, str) and file_name else name
                image = decode_image(_read_file(image, name), name)
            elif isinstance(image, np.ndarray):
                image = array_to_image(image, name)
            elif not isinstance(image, Image.Image):
                raise _wrong_type(name, image)
            try:
                arrays.append(prepare_image(image, self.metadata.preprocessing))
            except BadImageError as error:
                raise BadImageError(f"{name}: {error}") from error
        size, channels = (
            self.metadata.preprocessing.stored_size,
            self.metadata.preprocessing.channels,
        )
        return np.stack(arrays) if arrays else np.zeros((0, size, size, channels), np.uint8)

    def model_input(self, prepared: np.ndarray) -> torch.Tensor:
        """``uint8 [B, S, S, C]`` -> normalised ``float32 [B, C, H, W]`` on the model's device."""
        batch = torch.from_numpy(np.ascontiguousarray(prepared)).to(self.device)
        return to_model_input(batch, self.metadata.preprocessing)

    @torch.inference_mode()
    def logits(self, prepared: np.ndarray) -> np.ndarray:
        """Logits ``float32 [B, num_classes]`` for prepared ``uint8 [B, S, S, C]`` images."""
        with self._lock:
            logits = self.model(self.model_input(prepared))
        return logits.float().cpu().numpy()

    def probabilities(self, prepared: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``[B, num_classes]`` for prepared images."""
        if len(prepared) == 0:
            return np.zeros((0, self.metadata.num_classes), dtype=np.float32)
        # Many large photos go through in chunks, so memory stays bounded for any count.
        chunk = eval_batch_size(MAX_BATCH, self.metadata.preprocessing)
        rows = [
            torch.softmax(torch.from_numpy(self.logits(prepared[start : start + chunk])), dim=1)
            for start in range(0, len(prepared), chunk)
        ]
        return torch.cat(rows).numpy()

    def rank(self, probabilities: np.ndarray, top_k: int = 5) -> list[list[Prediction]]:
        """Turn probability rows into the ``top_k`` predictions of each image (all classes
        where there are fewer).

        Raises:
            ValueError: unless ``top_k`` is a whole number >= 1.
        """
        top_k = min(check_top_k(top_k), self.metadata.num_classes)
        ranked = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:top_k]
            ranked.append([Prediction(self.class_names[i], int(i), float(row[i])) for i in order])
        return ranked

    def predict(
        self, images: ImageInput | Sequence[ImageInput], top_k: int = 5
    ) -> list[list[Prediction]]:
        """Rank the classes for one image or several (see :meth:`prepare`).

        Images are decoded a batch at a time, so memory stays bounded for any count.

        Returns:
            One list of ``top_k`` :class:`Prediction` per image, best first (a list of one for
            a single image). ``Prediction.to_dict()`` gives the CLI's JSON fields.

        Raises:
            ValueError: for ``top_k`` below 1 or not whole, or an ambiguous stack of images.
            cnnkit.data.image.BadImageError, TypeError: as :meth:`prepare`.
        """
        check_top_k(top_k)
        images = as_image_list(images)
        chunk = eval_batch_size(MAX_BATCH, self.metadata.preprocessing)
        ranked: list[list[Prediction]] = []
        for start in range(0, len(images), chunk):
            prepared = self._prepare(images[start : start + chunk], start)
            ranked.extend(self.rank(self.probabilities(prepared), top_k))
        return ranked


def open_predictor(
    path: str | Path | None = None,
    backend: str | None = None,
    threads: int | None = None,
    device: str = "cpu",
) -> Predictor:
    """A predictor for a model file or a training run's folder: ``backend="onnx"`` (the
    default for a ``.onnx`` file) runs it in onnxruntime, ``"torch"`` (the default otherwise)
    in PyTorch on ``device``; no ``path`` means the bundled symbol model. ``threads`` sets
    onnxruntime's intra-op threads (default: one per available core); PyTorch's come from
    ``torch.set_num_threads``.

    Raises:
        FileNotFoundError: if no path is given and the bundled model is missing.
        cnnkit.inference.artifact.ModelFileError: for a bad model file.
        ValueError: for a ``backend`` other than None, ``"torch"`` or ``"onnx"``, an unknown or
            unavailable ``device``, a GPU ``device`` for onnxruntime (it runs on the CPU), or
            ``threads`` not a whole number >= 1.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use 'torch' or 'onnx' (or None)")
    threads = check_threads(threads)
    path = resolve_model_path(path)
    if backend == "torch" and path.suffix.lower() == ".onnx":
        raise ModelFileError(
            f"{path}: an ONNX export runs on ONNX Runtime only: use backend 'onnx' (on the "
            "command line, leave out --backend torch), or the .safetensors model it came from"
        )
    if (backend or ("onnx" if path.suffix.lower() == ".onnx" else "torch")) == "onnx":
        from cnnkit.inference.onnx_backend import OnnxPredictor

        if device not in ("cpu", "auto"):
            use = (
                "the .safetensors model it came from"
                if path.suffix.lower() == ".onnx"
                else "backend 'torch' (on the command line, --backend torch)"
            )
            raise ValueError(
                f"{path}: ONNX Runtime runs it on the CPU, not {device}: leave out the device, "
                f"or use {use}"
            )
        return OnnxPredictor.from_file(path, threads=threads)
    return Predictor.from_file(path, device=device)
