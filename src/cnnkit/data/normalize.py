"""Turn stored uint8 batches into normalised float model input, identically everywhere."""

from __future__ import annotations

import torch

from cnnkit.config import Preprocessing


def center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Crop the centre ``size`` x ``size`` of ``[B, C, H, W]`` (a no-op when already that size)."""
    height, width = batch.shape[-2:]
    if height == size and width == size:
        return batch
    top, left = (height - size) // 2, (width - size) // 2
    return batch[..., top : top + size, left : left + size]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, S, S, C]`` -> ``float32 [B, C, S, S]`` in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(batch: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Subtract the mean and divide by the std, per channel, of ``[B, C, H, W]`` in [0, 1]."""
    mean = torch.tensor(preprocessing.mean, dtype=batch.dtype, device=batch.device)
    std = torch.tensor(preprocessing.std, dtype=batch.dtype, device=batch.device)
    return (batch - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def to_model_input(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """The evaluation transform: stored ``uint8 [B, S, S, C]`` -> ``float32 [B, C, H, W]``.

    Training evaluation, the predictor and the web app all call this, so their inputs match.
    """
    batch = center_crop(to_float(images), preprocessing.image_size)
    return normalize(batch, preprocessing)
