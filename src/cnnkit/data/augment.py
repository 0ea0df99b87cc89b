"""Batched tensor augmentation: random affine, random resized crop, flips and colour jitter.

Everything runs as a few tensor ops on the whole batch, on whatever device the batch is on, and
draws from an explicit ``torch.Generator`` so runs are reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnkit.config import AugmentConfig


def _uniform(size: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(size, generator=generator) * (high - low) + low


def random_theta(
    batch_size: int, config: AugmentConfig, generator: torch.Generator, view: float = 1.0
) -> torch.Tensor:
    """Affine matrices ``[B, 2, 3]`` mapping output to input coordinates in [-1, 1] units.

    ``view`` is the share of the stored image's side that an un-augmented view covers: the
    centre crop the model sees at evaluation (``image_size / stored_size``). Random resized
    crops choose their own share of the whole image and ignore it.
    """
    angle = _uniform(batch_size, -config.max_rotation, config.max_rotation, generator)
    angle = angle * (math.pi / 180.0)
    scale = _uniform(batch_size, config.scale_min, config.scale_max, generator)
    shear = _uniform(batch_size, -config.max_shear, config.max_shear, generator)
    shift = _uniform(2 * batch_size, -config.max_shift, config.max_shift, generator)
    shift = shift.view(batch_size, 2) * 2.0
    scale_x = scale_y = 1.0 / scale
    center = torch.zeros(batch_size, 2)
    if not config.random_resized_crop:
        scale_x = scale_y = scale_x * view
    else:
        # Area fraction and aspect ratio as in torchvision's RandomResizedCrop (in grid units).
        area = _uniform(batch_size, config.crop_scale_min, 1.0, generator)
        log_ratio = _uniform(batch_size, math.log(3 / 4), math.log(4 / 3), generator)
        ratio = torch.exp(log_ratio)
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        scale_x, scale_y = scale_x * width, scale_y * height
        center = torch.stack(
            [
                (torch.rand(batch_size, generator=generator) * 2 - 1) * (1 - width),
                (torch.rand(batch_size, generator=generator) * 2 - 1) * (1 - height),
            ],
            dim=1,
        )
    if config.hflip:
        flip = torch.where(torch.rand(batch_size, generator=generator) < 0.5, -1.0, 1.0)
        scale_x = scale_x * flip
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(batch_size, 2, 3)
    theta[:, 0, 0] = cos * scale_x
    theta[:, 0, 1] = (-sin + shear * cos) * scale_y
    theta[:, 1, 0] = sin * scale_x
    theta[:, 1, 1] = (cos + shear * sin) * scale_y
    theta[:, :, 2] = center + shift
    return theta


def color_jitter(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation in ``[1 - strength, 1 + strength]``."""
    size = batch.shape[0]
    shape = (size, 1, 1, 1)
    brightness = _uniform(size, 1 - strength, 1 + strength, generator).view(shape)
    contrast = _uniform(size, 1 - strength, 1 + strength, generator).view(shape)
    saturation = _uniform(size, 1 - strength, 1 + strength, generator).view(shape)
    brightness, contrast, saturation = (
        t.to(batch.device) for t in (brightness, contrast, saturation)
    )
    batch = batch * brightness
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    batch = (batch - mean) * contrast + mean
    if batch.shape[1] == 3:
        gray = batch.mean(dim=1, keepdim=True)
        batch = (batch - gray) * saturation + gray
    return batch.clamp_(0.0, 1.0)


def augment_batch(
    batch: torch.Tensor,
    config: AugmentConfig,
    output_size: int,
    generator: torch.Generator,
    background: str = "white",
    view: float = 1.0,
) -> torch.Tensor:
    """Augment ``float [B, C, S, S]`` in [0, 1] and resample it to ``output_size``.

    Args:
        batch: images in [0, 1], any device.
        config: augmentation settings.
        output_size: side of the returned images (the model's input size).
        generator: CPU generator for the random parameters.
        background: ``"white"`` fills uncovered pixels with white (symbols); ``"reflect"``
            mirrors the photo at its borders.
        view: the share of the side an un-augmented view covers (see :func:`random_theta`).

    Returns:
        ``float [B, C, output_size, output_size]``.
    """
    size, channels = batch.shape[0], batch.shape[1]
    theta = random_theta(size, config, generator, view).to(batch.device, batch.dtype)
    grid = F.affine_grid(theta, [size, channels, output_size, output_size], align_corners=False)
    if background == "white":
        # grid_sample pads with zeros; sampling the inverted image pads with white instead.
        out = 1.0 - F.grid_sample(1.0 - batch, grid, mode="bilinear", align_corners=False)
    else:
        out = F.grid_sample(
            batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
    if config.color_jitter > 0:
        out = color_jitter(out, config.color_jitter, generator)
    return out
