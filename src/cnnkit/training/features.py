"""Frozen-backbone features, computed once per image view and cached on disk as ``.npy`` files.

An entry's key covers the decoded images' bytes, the preprocessing, the backbone's name and
weights, and the view (the centre crop, or augmented view N with its seed and settings), so a
change in any of them computes the features again; otherwise they are read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cnnkit.atomic import write_atomically
from cnnkit.config import AugmentConfig, Preprocessing
from cnnkit.data.loader import BatchTransform, build_eval_transform, build_train_transform
from cnnkit.progress import bar_disabled

logger = logging.getLogger(__name__)
FEATURE_FORMAT = 1
# Augmented views draw their random crops batch by batch, so the batch size is part of a view's
# identity; a fixed size keeps cached views valid whatever the run's batch size.
EXTRACTION_BATCH_SIZE = 64
_DIGEST_CHUNK = 1 << 24


def digest_array(array: np.ndarray) -> str:
    """A content hash of ``array`` (shape, dtype and bytes), read in chunks."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.shape}|{array.dtype.str}|".encode())
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _DIGEST_CHUNK):
        digest.update(flat[start : start + _DIGEST_CHUNK].data)
    return digest.hexdigest()


def digest_module(module: nn.Module) -> str:
    """A hash of ``module``'s state (parameter and buffer names, shapes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureView:
    """Which view of every image the features describe.

    Attributes:
        index: 0 for the centre crop the model is evaluated on; ``1..V`` for augmented views.
        seed: seeds the random augmentation of an augmented view.
        augment: the augmentation settings of an augmented view (``None`` for the centre crop).
    """

    index: int = 0
    seed: int = 0
    augment: AugmentConfig | None = None

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"view index must be >= 0; got {self.index}")
        if self.index > 0 and self.augment is None:
            raise ValueError(f"augmented view {self.index} needs augmentation settings")

    def describe(self) -> dict:
        """Everything that decides this view's pixels, as plain data."""
        if self.index == 0:
            return {"index": 0}
        return {
            "index": self.index,
            "seed": self.seed,
            "augment": asdict(self.augment),
            "batch_size": EXTRACTION_BATCH_SIZE,
            "geometry": 2,  # 2: without random resized crops, views are the centre crop's.
        }

    def transform(self, preprocessing: Preprocessing) -> BatchTransform:
        """The batch transform that produces this view from stored uint8 images."""
        if self.index == 0:
            return build_eval_transform(preprocessing)
        return build_train_transform(preprocessing, self.augment)


@dataclass(frozen=True)
class FeatureSource:
    """The backbone side of a cache key: which network computes the features, and how.

    Attributes:
        backbone_name: the registry name of the model.
        backbone_digest: :func:`digest_module` of the backbone's weights.
        preprocessing: the model input the backbone sees.
        bf16: whether the features are computed under CPU bfloat16 autocast.
    """

    backbone_name: str
    backbone_digest: str
    preprocessing: Preprocessing
    bf16: bool = False


def feature_key(images_digest: str, source: FeatureSource, view: FeatureView) -> str:
    """The cache key of one view of one image array under one backbone."""
    payload = {
        "format": FEATURE_FORMAT,
        "images": images_digest,
        "backbone": source.backbone_name,
        "weights": source.backbone_digest,
        "preprocessing": asdict(source.preprocessing),
        "bf16": source.bf16,
        "view": view.describe(),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class FeatureCache:
    """Feature arrays under ``root/<key>.npy``, written to a temporary file and renamed.

    Args:
        root: the cache folder; ``None`` keeps nothing (every lookup misses).
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.npy" if self.root is not None else None

    def load(self, key: str, count: int) -> np.ndarray | None:
        """The cached ``[count, F]`` array of ``key``, or ``None`` if absent or unreadable."""
        path = self.path(key)
        if path is None or not path.exists():
            return None
        try:
            features = np.load(path)
        except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file.
            logger.warning("ignoring unreadable feature cache entry %s: %s", path, error)
            return None
        if features.ndim != 2 or len(features) != count:
            logger.warning("ignoring feature cache entry %s of shape %s", path, features.shape)
            return None
        return features

    def save(self, key: str, features: np.ndarray) -> None:
        """Store ``features`` atomically (a failed write only logs a warning; an interrupt
        leaves no temporary file behind)."""
        path = self.path(key)
        if path is None:
            return

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as stream:  # np.save would add .npy to the name.
                np.save(stream, features)

        try:
            write_atomically(path, write)
        except OSError as error:
            logger.warning("could not write the feature cache %s: %s", path, error)


@torch.inference_mode()
def compute_features(
    model: nn.Module,
    images: np.ndarray,
    transform: BatchTransform,
    device: torch.device,
    seed: int = 0,
    bf16: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """Run ``model.forward_features`` over stored images in fixed-size batches.

    Args:
        model: a registered model in eval mode (``forward_features`` gives ``[B, F]``).
        images: uint8 ``[N, S, S, C]``.
        transform: turns a uint8 batch into model input.
        device: where the model runs.
        seed: seeds the transform's random stream (augmented views).
        bf16: compute under CPU bfloat16 autocast.
        progress: show a progress bar.

    Returns:
        float32 ``[N, F]``.
    """
    generator = torch.Generator().manual_seed(seed)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if bf16 and device.type == "cpu"
        else contextlib.nullcontext()
    )
    outputs = []
    for start in tqdm(
        range(0, len(images), EXTRACTION_BATCH_SIZE),
        desc="backbone features",
        unit="batch",
        disable=bar_disabled(progress),
        leave=False,
    ):
        stop = start + EXTRACTION_BATCH_SIZE
        batch = torch.from_numpy(np.array(images[start:stop])).to(device)
        inputs = transform(batch, generator)
        with autocast:
            features = model.forward_features(inputs.contiguous(memory_format=torch.channels_last))
        outputs.append(features.float().cpu())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outputs).numpy()


def load_or_compute_features(
    model: nn.Module,
    images: np.ndarray,
    source: FeatureSource,
    view: FeatureView,
    cache: FeatureCache,
    device: torch.device,
    images_digest: str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, bool]:
    """The features of one view of ``images``, from ``cache`` when present.

    Args:
        model: the backbone's model, in eval mode.
        images: uint8 ``[N, S, S, C]``.
        source: names the backbone and its preprocessing (part of the key).
        view: the centre crop or an augmented view.
        cache: where entries are read and written.
        device: where the model runs on a cache miss.
        images_digest: :func:`digest_array` of ``images`` if already known.
        progress: show a progress bar while computing.

    Returns:
        float32 ``[N, F]`` features and whether they came from the cache.
    """
    key = feature_key(images_digest or digest_array(images), source, view)
    cached = cache.load(key, len(images))
    if cached is not None:
        return cached.astype(np.float32), True
    transform = view.transform(source.preprocessing)
    seed = view.seed * 1_000_003 + view.index
    features = compute_features(model, images, transform, device, seed, source.bf16, progress)
    # float16 halves the files; pooled ReLU6 activations lose nothing that matters to a head.
    # A fresh result is rounded the same way, so a rerun from the cache gives identical values.
    stored = features.astype(np.float16)
    cache.save(key, stored)
    return stored.astype(np.float32), False


class FeatureExtractor:
    """Features of image arrays under one backbone, read from the cache or computed and stored.

    Args:
        model: the model whose ``forward_features`` runs (in eval mode, backbone frozen).
        source: the backbone's identity and preprocessing.
        cache: where entries are read and written.
        device: where the model runs.
        progress: show a progress bar while computing.

    Attributes:
        computed, reused: how many views were computed and how many came from the cache.
    """

    def __init__(
        self,
        model: nn.Module,
        source: FeatureSource,
        cache: FeatureCache,
        device: torch.device,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.source = source
        self.cache = cache
        self.device = device
        self.progress = progress
        self.computed = 0
        self.reused = 0

    def views(
        self,
        images: np.ndarray,
        augmented: int = 0,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> list[np.ndarray]:
        """Features ``[N, F]`` of the centre crop, then of ``augmented`` augmented views.

        Raises:
            ValueError: if ``augmented > 0`` without ``augment`` settings.
        """
        digest = digest_array(images)
        views = [FeatureView(0)]
        views += [FeatureView(index, seed, augment) for index in range(1, augmented + 1)]
        arrays = []
        for view in views:
            features, from_cache = load_or_compute_features(
                self.model,
                images,
                self.source,
                view,
                self.cache,
                self.device,
                digest,
                self.progress,
            )
            self.reused += int(from_cache)
            self.computed += int(not from_cache)
            arrays.append(features)
        return arrays
