"""Batches straight from in-memory uint8 arrays, transformed on the target device.

Small images make per-sample Python work (a ``Dataset`` + ``DataLoader`` with workers) the
bottleneck on a CPU; slicing one uint8 tensor and transforming the whole batch at once is
several times faster, and the same code runs the augmentation on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from cnnkit.config import AugmentConfig, Preprocessing, RunConfig, TrainConfig
from cnnkit.data.augment import augment_batch
from cnnkit.data.dataset import DataSplits, ImageSet
from cnnkit.data.normalize import normalize, to_float, to_model_input
from cnnkit.runtime import DistributedContext, rank_seed

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# Evaluation batches hold at most about this many input pixels: 512 symbols of 32x32, but only
# about 80 photos of 224x224. Batches of 512 photos made a three-backbone network's activations
# (and the allocator's kept heap) outgrow 24 GB of memory.
MAX_EVAL_BATCH_PIXELS = 4_000_000


def eval_batch_size(requested: int, preprocessing: Preprocessing) -> int:
    """``requested``, lowered for large inputs so an evaluation batch stays a few GB at most."""
    pixels = preprocessing.image_size * preprocessing.image_size
    return max(1, min(requested, MAX_EVAL_BATCH_PIXELS // pixels))


def build_eval_transform(preprocessing: Preprocessing) -> BatchTransform:
    """Deterministic transform: centre crop and normalise (the predictor's transform)."""
    return lambda images, generator: to_model_input(images, preprocessing)


def build_train_transform(preprocessing: Preprocessing, augment: AugmentConfig) -> BatchTransform:
    """Random augmentation at ``augment.train_size`` (default: the model's input size), then
    normalisation; falls back to the eval transform when augmentation is disabled."""
    if not augment.enabled:
        return build_eval_transform(preprocessing)
    background = "white" if preprocessing.mode == "symbol" else "reflect"
    size = augment.train_size or preprocessing.image_size
    # Without random resized crops, an un-augmented view is the evaluation's centre crop, at
    # the scale evaluation sees objects (photos are stored larger than the model's input).
    view = preprocessing.image_size / preprocessing.stored_size

    def transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = augment_batch(to_float(images), augment, size, generator, background, view)
        return normalize(batch, preprocessing)

    return transform


class BatchLoader:
    """Iterates ``(inputs [B, C, H, W], labels [B])`` over an :class:`ImageSet`.

    Args:
        images: the image set (uint8 ``[N, S, S, C]``).
        batch_size: images per batch (per process when distributed).
        transform: turns a uint8 batch on ``device`` into model input.
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch number).
        drop_last: drop a final incomplete batch.
        device: where batches are produced.
        rank, world_size: the process's share of each epoch under torchrun.
        seed: base seed for shuffling and augmentation.
        max_batches: stop an epoch after this many batches (for quick runs).
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        transform: BatchTransform,
        shuffle: bool = False,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        max_batches: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(images.images))
        self.labels = torch.from_numpy(np.asarray(images.labels, dtype=np.int64))
        self.batch_size = batch_size
        self.transform = transform
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.max_batches = max_batches
        self.epoch = 0
        self.rank, self.world_size = rank, world_size
        # Training shards use torch's DistributedSampler; evaluation shards are strided without
        # padding so that summed metrics count every image exactly once.
        self.sampler = (
            DistributedSampler(
                range(len(self.labels)),
                num_replicas=world_size,
                rank=rank,
                shuffle=shuffle,
                # It permutes with seed + epoch: the single-process order's seed below, so
                # that the processes together draw the same batches for every --seed.
                seed=seed * 100_003,
                drop_last=drop_last,
            )
            if world_size > 1 and shuffle
            else None
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentation stream of ``epoch``."""
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _indices(self) -> torch.Tensor:
        if self.sampler is not None:
            return torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return torch.randperm(len(self.labels), generator=generator)
        return torch.arange(self.rank, len(self.labels), self.world_size)

    @property
    def num_samples(self) -> int:
        """Images this process sees per epoch."""
        count = (
            len(self.sampler)
            if self.sampler is not None
            else len(range(self.rank, len(self.labels), self.world_size))
        )
        if self.drop_last:
            count = count // self.batch_size * self.batch_size
        if self.max_batches is not None:
            count = min(count, self.max_batches * self.batch_size)
        return count

    def __len__(self) -> int:
        if self.sampler is not None:
            count = len(self.sampler)
        else:
            count = len(range(self.rank, len(self.labels), self.world_size))
        return batch_count(count, self.batch_size, self.drop_last, self.max_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices()
        # Augmentation draws differ per rank, so ranks do not crop their images alike.
        generator = torch.Generator().manual_seed(
            rank_seed(self.seed * 7_919 + self.epoch + 1, self.rank)
        )
        non_blocking = self.device.type == "cuda"
        for batch_number in range(len(self)):
            batch = indices[batch_number * self.batch_size : (batch_number + 1) * self.batch_size]
            images = self.images[batch]
            labels = self.labels[batch]
            if non_blocking:
                images = images.pin_memory()
                labels = labels.pin_memory()
            images = images.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking)
            yield self.transform(images, generator), labels


def batch_count(
    count: int, batch_size: int, drop_last: bool, max_batches: int | None = None
) -> int:
    """Batches of ``batch_size`` in ``count`` images (a last part-batch dropped with
    ``drop_last``), at most ``max_batches``."""
    batches = count // batch_size if drop_last else -(-count // batch_size)
    return min(batches, max_batches) if max_batches is not None else batches


def _drops_last(count: int, batch_size: int) -> bool:
    """Whether training drops a last part-batch: only where there is a whole one."""
    return count > batch_size


def training_steps_per_epoch(count: int, train: TrainConfig, capped: bool = True) -> int:
    """Optimizer steps an epoch of ``count`` training images takes, as :func:`build_loaders`
    sets the training loader up (``capped``: at most ``max_steps_per_epoch``)."""
    cap = train.max_steps_per_epoch if capped else None
    return batch_count(count, train.batch_size, _drops_last(count, train.batch_size), cap)


def build_loaders(
    splits: DataSplits,
    config: RunConfig,
    preprocessing: Preprocessing,
    device: torch.device,
    distributed: DistributedContext,
) -> tuple[BatchLoader, BatchLoader | None, BatchLoader]:
    """Training, validation and test loaders for one process.

    ``config.train.batch_size`` is the global batch: under torchrun each of the N processes
    takes ``batch_size / N`` images per step, so results do not depend on the process count.
    The test loader is not sharded; only rank 0 uses it.
    """
    world = distributed.world_size
    if config.train.batch_size % world:
        raise ValueError(
            f"batch_size {config.train.batch_size} must be divisible by the {world} processes"
        )
    train_transform = build_train_transform(preprocessing, config.augment)
    eval_transform = build_eval_transform(preprocessing)
    shard = {"device": device, "rank": distributed.rank, "world_size": world}
    batch_size = config.train.batch_size // world
    train = BatchLoader(
        splits.train,
        batch_size,
        train_transform,
        shuffle=True,
        drop_last=_drops_last(len(splits.train), config.train.batch_size),
        seed=config.train.seed,
        max_batches=config.train.max_steps_per_epoch,
        **shard,
    )
    batch = eval_batch_size(config.train.eval_batch_size, preprocessing)
    val = BatchLoader(splits.val, batch, eval_transform, **shard) if splits.val else None
    test = BatchLoader(splits.test, batch, eval_transform, device=device)
    return train, val, test
