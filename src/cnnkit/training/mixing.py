"""Mixup and CutMix: train on blends of two images with the matching blend of their labels.

Both draw a mixing weight ``lam`` from ``Beta(alpha, alpha)`` and pair each image with another
of the same batch (a random permutation). Mixup averages whole images, ``lam * x + (1 - lam) *
x[perm]``; CutMix pastes a box of ``x[perm]`` covering ``1 - lam`` of the image, and ``lam`` is
then recomputed from the box actually pasted (clipped at the border). The loss is the same
blend of the two cross-entropies. With both alphas set, each batch uses one of the two at
random, as timm's ``Mixup`` does with ``switch_prob=0.5``.

Random draws come from torch's global generator, which the trainer seeds every epoch, so runs
stay reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixedBatch:
    """A mixed batch: ``inputs`` ``[B, C, H, W]`` blend ``labels`` with ``other_labels``.

    ``weight`` is the share of ``labels`` (``lam``); 1.0 means the batch is unmixed.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    other_labels: torch.Tensor
    weight: float

    def loss(self, logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The blended cross-entropy of ``logits`` ``[B, K]``."""
        loss = F.cross_entropy(logits, self.labels, label_smoothing=label_smoothing)
        if self.weight >= 1.0:
            return loss
        other = F.cross_entropy(logits, self.other_labels, label_smoothing=label_smoothing)
        return self.weight * loss + (1.0 - self.weight) * other

    def split(self, parts: int) -> list[MixedBatch]:
        """``parts`` consecutive chunks as equal in size as can be (13 in 4: 4, 3, 3, 3), each
        with the batch's ``weight``."""
        pieces = zip(
            self.inputs.tensor_split(parts),
            self.labels.tensor_split(parts),
            self.other_labels.tensor_split(parts),
            strict=True,
        )
        return [MixedBatch(inputs, labels, other, self.weight) for inputs, labels, other in pieces]

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        """Blended count of right answers: a prediction of either label counts by its share."""
        predicted = logits.argmax(dim=1)
        first = (predicted == self.labels).sum()
        if self.weight >= 1.0:
            return first
        second = (predicted == self.other_labels).sum()
        return self.weight * first + (1.0 - self.weight) * second


def cutmix_box(height: int, width: int, area: float) -> tuple[int, int, int, int]:
    """A random box ``(top, bottom, left, right)`` of about ``area`` of the image, clipped.

    Its centre is uniform over the image, so near a border the box is cut and covers less.
    """
    side = min(max(area, 0.0), 1.0) ** 0.5  # Each side's share of the image's.
    cut_height, cut_width = int(height * side), int(width * side)
    centre_y = int(torch.randint(height, ()).item())
    centre_x = int(torch.randint(width, ()).item())
    top, bottom = max(centre_y - cut_height // 2, 0), min(centre_y + cut_height // 2, height)
    left, right = max(centre_x - cut_width // 2, 0), min(centre_x + cut_width // 2, width)
    return top, bottom, left, right


def mix_batch(
    inputs: torch.Tensor, labels: torch.Tensor, mixup_alpha: float, cutmix_alpha: float
) -> MixedBatch:
    """Mix ``inputs`` ``[B, C, H, W]`` and ``labels`` ``[B]`` with Mixup or CutMix.

    An alpha of 0 turns that method off; with both off the batch comes back unmixed.
    """
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0 or len(labels) < 2:
        return MixedBatch(inputs, labels, labels, 1.0)
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(len(labels), device=labels.device)
    if use_cutmix:
        height, width = inputs.shape[-2:]
        top, bottom, left, right = cutmix_box(height, width, 1.0 - weight)
        mixed = inputs.clone()
        mixed[..., top:bottom, left:right] = inputs[..., top:bottom, left:right][order]
        weight = 1.0 - (bottom - top) * (right - left) / (height * width)
    else:
        mixed = weight * inputs + (1.0 - weight) * inputs[order]
    return MixedBatch(mixed, labels, labels[order], weight)
