"""Predict class names for images with a saved model, from Python, the CLI or the web app."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnnkit.data.image import prepare_image, read_image_file
from cnnkit.data.loader import eval_batch_size
from cnnkit.data.normalize import to_model_input
from cnnkit.inference.artifact import ModelMetadata, load_model

MAX_BATCH = 512  # Images per forward pass (fewer for large inputs, see eval_batch_size).

ImageInput = Image.Image | str | Path | np.ndarray


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
        >>> predictor = Predictor.from_file("runs/hasy/model.safetensors")
        >>> predictor.predict(["alpha.png"])[0][0].label
        '\\\\alpha'
    """

    def __init__(self, model: torch.nn.Module, metadata: ModelMetadata, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.metadata = metadata
        self.device = torch.device(device)
        # Torch modules are not re-entrant across threads for in-place buffers; one lock keeps
        # concurrent web requests safe while the web layer batches them.
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu") -> Predictor:
        """Load a ``.safetensors`` model file (see :func:`cnnkit.load_model`)."""
        model = load_model(path, device)
        return cls(model, model.metadata, device)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    def prepare(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Decode and convert images to the stored ``uint8 [B, S, S, C]`` form.

        Raises:
            cnnkit.data.image.BadImageError: for a file that is missing or not an image.
        """
        arrays = []
        for image in images:
            if isinstance(image, (str, Path)):
                image = read_image_file(str(image))
            elif isinstance(image, np.ndarray):
                # Pillow has no mode for H x W x 1; that is a grayscale H x W image.
                single_channel = image.ndim == 3 and image.shape[2] == 1
                image = Image.fromarray(image[:, :, 0] if single_channel else image)
            arrays.append(prepare_image(image, self.metadata.preprocessing))
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
        """Turn probability rows into the ``top_k`` predictions of each image."""
        top_k = max(1, min(top_k, self.metadata.num_classes))
        ranked = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:top_k]
            ranked.append([Prediction(self.class_names[i], int(i), float(row[i])) for i in order])
        return ranked

    def predict(self, images: Sequence[ImageInput], top_k: int = 5) -> list[list[Prediction]]:
        """Rank the classes for each image (a path, a PIL image or an ``HxW[xC]`` uint8 array).

        Returns:
            One list of ``top_k`` :class:`Prediction` per image, best first.
        """
        return self.rank(self.probabilities(self.prepare(images)), top_k)


def open_predictor(path: str | Path | None = None, backend: str | None = None) -> Predictor:
    """A predictor for a model file: ``backend="onnx"`` (the default for a ``.onnx`` file) runs
    it in onnxruntime, ``"torch"`` (the default otherwise) in PyTorch; no ``path`` means the
    bundled symbol model.

    Raises:
        FileNotFoundError: if no path is given and the bundled model is missing.
        cnnkit.inference.artifact.ModelFileError: for a bad model file.
    """
    from cnnkit.inference.bundled import bundled_model_path

    path = Path(path) if path is not None else bundled_model_path()
    if (backend or ("onnx" if path.suffix.lower() == ".onnx" else "torch")) == "onnx":
        from cnnkit.inference.onnx_backend import OnnxPredictor

        return OnnxPredictor.from_file(path)
    return Predictor.from_file(path)
