"""Tests for batched augmentation, normalisation and the in-memory batch loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnkit.config import AugmentConfig, Preprocessing
from cnnkit.data.augment import augment_batch, color_jitter, random_theta
from cnnkit.data.dataset import ImageSet
from cnnkit.data.loader import BatchLoader, build_eval_transform, build_train_transform
from cnnkit.data.normalize import center_crop, normalize, to_float, to_model_input
from cnnkit.runtime import rank_seed

SYMBOLS = Preprocessing("symbol", 1, 32, 32, (0.5,), (0.5,))
PHOTOS = Preprocessing("photo", 3, 24, 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
STRONG = AugmentConfig(max_rotation=45, max_shift=0.3, scale_min=0.7, scale_max=1.3, max_shear=0.3)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _indexed_set(count: int, size: int = 8, channels: int = 1) -> ImageSet:
    """Images whose label is their own index, so batches show which images they hold."""
    images = np.random.default_rng(0).integers(0, 256, (count, size, size, channels), np.uint8)
    return ImageSet(images, np.arange(count, dtype=np.int64), [str(i) for i in range(count)])


def _collect(loader: BatchLoader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# ----------------------------------------------------------------------------- normalize


def test_to_float_and_normalize() -> None:
    images = torch.tensor([[[[0], [255]], [[51], [102]]]], dtype=torch.uint8)  # [1, 2, 2, 1]
    batch = to_float(images)
    assert batch.shape == (1, 1, 2, 2) and batch.dtype == torch.float32
    assert torch.allclose(batch.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))
    assert torch.allclose(
        normalize(batch, SYMBOLS).flatten(), torch.tensor([-1.0, 1.0, -0.6, -0.2])
    )


def test_center_crop() -> None:
    batch = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(center_crop(batch, 6), batch)
    assert torch.equal(center_crop(batch, 2), batch[..., 2:4, 2:4])


def test_to_model_input_crops_and_normalises_per_channel() -> None:
    images = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
    out = to_model_input(images, PHOTOS)
    assert out.shape == (2, 3, 24, 24)
    expected = (1 - torch.tensor(PHOTOS.mean)) / torch.tensor(PHOTOS.std)
    assert torch.allclose(out[0, :, 0, 0], expected)


# ----------------------------------------------------------------------------- augment


def test_augment_shapes_and_range() -> None:
    batch = torch.rand(4, 3, 40, 40)
    config = AugmentConfig(hflip=True, random_resized_crop=True, color_jitter=0.3)
    out = augment_batch(batch, config, 24, _generator(), background="reflect")
    assert out.shape == (4, 3, 24, 24)
    assert out.min() >= 0 and out.max() <= 1
    assert random_theta(5, config, _generator()).shape == (5, 2, 3)


def test_augment_is_deterministic_for_a_seed() -> None:
    batch = torch.rand(4, 1, 32, 32)
    first = augment_batch(batch, STRONG, 32, _generator(3))
    second = augment_batch(batch, STRONG, 32, _generator(3))
    other = augment_batch(batch, STRONG, 32, _generator(4))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_identity_config_keeps_the_image() -> None:
    still = AugmentConfig(max_rotation=0, max_shift=0, scale_min=1, scale_max=1, max_shear=0)
    batch = torch.rand(2, 1, 16, 16)
    out = augment_batch(batch, still, 16, _generator())
    assert torch.allclose(out, batch, atol=1e-5)


def test_white_background_fills_uncovered_pixels_for_symbols() -> None:
    black = torch.zeros(8, 1, 32, 32)
    out = augment_batch(black, STRONG, 32, _generator())
    # Rotations up to 45 degrees and large shifts uncover corners: they must be white, not black.
    corners = out[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners > 0.99).any()
    white = torch.ones(8, 1, 32, 32)
    assert torch.allclose(augment_batch(white, STRONG, 32, _generator()), white, atol=1e-6)


def test_reflect_background_never_adds_white_for_photos() -> None:
    black = torch.zeros(4, 3, 32, 32)
    out = augment_batch(black, STRONG, 32, _generator(), background="reflect")
    assert out.abs().max() < 1e-6


def test_color_jitter_keeps_range_and_shape() -> None:
    batch = torch.rand(3, 3, 8, 8)
    out = color_jitter(batch.clone(), 0.5, _generator())
    assert out.shape == batch.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, batch)


# ----------------------------------------------------------------------------- transforms


def test_eval_transform_is_deterministic_and_equals_to_model_input() -> None:
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    transform = build_eval_transform(PHOTOS)
    first = transform(images, _generator(1))
    second = transform(images, _generator(2))
    assert torch.equal(first, second)
    assert torch.equal(first, to_model_input(images, PHOTOS))


def test_disabled_augmentation_falls_back_to_the_eval_transform() -> None:
    images = torch.randint(0, 256, (2, 32, 32, 1), dtype=torch.uint8)
    transform = build_train_transform(SYMBOLS, AugmentConfig(enabled=False))
    assert torch.equal(transform(images, _generator()), to_model_input(images, SYMBOLS))


def test_train_transform_outputs_model_size_for_photos() -> None:
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    transform = build_train_transform(PHOTOS, AugmentConfig(hflip=True, random_resized_crop=True))
    assert transform(images, _generator()).shape == (2, 3, 24, 24)


def test_train_size_sets_the_training_crop_and_leaves_evaluation_alone() -> None:
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    augment = AugmentConfig(hflip=True, random_resized_crop=True, train_size=16)
    assert build_train_transform(PHOTOS, augment)(images, _generator()).shape == (2, 3, 16, 16)
    assert build_eval_transform(PHOTOS)(images, _generator()).shape == (2, 3, 24, 24)
    # Without augmentation the model's own input is used, whatever train_size says.
    plain = build_train_transform(PHOTOS, AugmentConfig(enabled=False, train_size=16))
    assert plain(images, _generator()).shape == (2, 3, 24, 24)


def test_train_size_below_eight_pixels_is_refused() -> None:
    with pytest.raises(ValueError, match="train_size must be >= 8"):
        AugmentConfig(train_size=4)


# ----------------------------------------------------------------------------- loader


def test_loader_shapes_lengths_and_labels(tiny_image_set) -> None:
    images = tiny_image_set(num_classes=3, per_class=5, size=32)
    loader = BatchLoader(images, 4, build_eval_transform(SYMBOLS))
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert loader.num_samples == 15
    inputs, labels = batches[0]
    assert inputs.shape == (4, 1, 32, 32) and inputs.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(images.labels))


def test_loader_drop_last_and_max_batches() -> None:
    images = _indexed_set(10)
    identity = build_eval_transform(Preprocessing(image_size=8, stored_size=8))
    dropped = BatchLoader(images, 4, identity, drop_last=True)
    assert len(dropped) == 2 and dropped.num_samples == 8 and len(list(dropped)) == 2
    capped = BatchLoader(images, 3, identity, max_batches=2)
    assert len(capped) == 2 and capped.num_samples == 6
    assert len(_collect(capped)[1]) == 6


def test_shuffle_and_augmentation_repeat_for_the_same_seed_and_epoch() -> None:
    images = _indexed_set(12, size=32)
    transform = build_train_transform(SYMBOLS, STRONG)

    def epoch_batches(seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader = BatchLoader(images, 5, transform, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return _collect(loader)

    inputs, labels = epoch_batches(seed=1, epoch=2)
    again_inputs, again_labels = epoch_batches(seed=1, epoch=2)
    assert torch.equal(inputs, again_inputs) and torch.equal(labels, again_labels)
    assert sorted(labels.tolist()) == list(range(12))
    next_inputs, next_labels = epoch_batches(seed=1, epoch=3)
    assert not torch.equal(labels, next_labels)
    # Even for the same images, the augmentation of another epoch differs.
    order = torch.argsort(labels)
    next_order = torch.argsort(next_labels)
    assert not torch.allclose(inputs[order], next_inputs[next_order])


def test_eval_loader_is_unshuffled_and_identical_across_epochs() -> None:
    images = _indexed_set(7)
    loader = BatchLoader(
        images, 3, build_eval_transform(Preprocessing(image_size=8, stored_size=8))
    )
    first = _collect(loader)
    loader.set_epoch(5)
    second = _collect(loader)
    assert first[1].tolist() == list(range(7))
    assert torch.equal(first[0], second[0])


@pytest.mark.parametrize("count", [7, 8, 1])
def test_eval_shards_cover_every_index_exactly_once(count: int) -> None:
    images = _indexed_set(count)
    transform = build_eval_transform(Preprocessing(image_size=8, stored_size=8))
    seen = []
    for rank in range(2):
        loader = BatchLoader(images, 2, transform, rank=rank, world_size=2)
        labels = _collect(loader)[1].tolist() if len(loader) else []
        assert loader.num_samples == len(labels)
        seen += labels
    assert sorted(seen) == list(range(count))


def test_training_shards_are_disjoint_and_cover_the_epoch() -> None:
    images = _indexed_set(8)
    transform = build_eval_transform(Preprocessing(image_size=8, stored_size=8))
    shards = []
    for rank in range(2):
        loader = BatchLoader(images, 2, transform, shuffle=True, rank=rank, world_size=2, seed=3)
        loader.set_epoch(1)
        shards.append(_collect(loader)[1].tolist())
    assert len(shards[0]) == len(shards[1]) == 4
    assert sorted(shards[0] + shards[1]) == list(range(8))


@pytest.mark.parametrize("seed", [0, 3])
def test_processes_together_draw_the_single_process_batches(seed: int) -> None:
    """Each step's images over both processes are the one process's batch of twice the size,
    whatever the seed: the run does not depend on the process count."""
    images = _indexed_set(16)
    transform = build_eval_transform(Preprocessing(image_size=8, stored_size=8))

    def batches(rank: int, world_size: int, batch_size: int) -> list[list[int]]:
        loader = BatchLoader(
            images, batch_size, transform, True, rank=rank, world_size=world_size, seed=seed
        )
        loader.set_epoch(2)
        return [sorted(labels.tolist()) for _, labels in loader]

    single = batches(0, 1, 4)
    pairs = zip(batches(0, 2, 2), batches(1, 2, 2), strict=True)
    assert [sorted(first + second) for first, second in pairs] == single


def test_each_rank_draws_its_own_augmentation_and_rank_zero_draws_the_single_process_one():
    images = _indexed_set(8)

    def draws(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(len(batch), 1, 1, 1, generator=generator)  # The stream itself.

    def first_draws(rank: int, world_size: int) -> torch.Tensor:
        loader = BatchLoader(images, 4, draws, rank=rank, world_size=world_size, seed=3)
        loader.set_epoch(2)
        return next(iter(loader))[0].flatten()

    single = first_draws(0, 1)
    assert torch.equal(first_draws(0, 2), single)
    assert not torch.allclose(first_draws(1, 2)[:1], single[:1])
    assert rank_seed(11, 0) == 11 and len({rank_seed(11, rank) for rank in range(64)}) == 64


def test_without_random_crops_training_sees_objects_at_the_evaluation_scale() -> None:
    """Photos are stored larger than the model's input: an un-augmented training view is the
    evaluation's centre crop, not the whole stored square shrunk to the input size."""
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    still = AugmentConfig(
        max_rotation=0,
        max_shift=0,
        scale_min=1,
        scale_max=1,
        max_shear=0,
        hflip=False,
        random_resized_crop=False,
        color_jitter=0,
    )
    trained = build_train_transform(PHOTOS, still)(images, _generator())
    evaluated = build_eval_transform(PHOTOS)(images, _generator())
    torch.testing.assert_close(trained, evaluated, atol=1e-4, rtol=0)
