"""Tests for Mixup and CutMix: what the mixed images hold and how the loss blends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnkit.config import TrainConfig
from cnnkit.training.mixing import MixedBatch, cutmix_box, mix_batch


def _batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    # Each image is constant at its own index, so every pixel names the image it came from.
    inputs = torch.arange(size, dtype=torch.float32).view(size, 1, 1, 1).expand(size, 3, 16, 16)
    return inputs.contiguous(), torch.arange(size) % 5


def test_no_alpha_leaves_the_batch_unmixed() -> None:
    inputs, labels = _batch()
    batch = mix_batch(inputs, labels, 0.0, 0.0)
    assert batch.weight == 1.0 and batch.inputs is inputs
    logits = torch.randn(8, 5)
    assert torch.equal(batch.loss(logits), F.cross_entropy(logits, labels))
    assert batch.correct(logits) == (logits.argmax(1) == labels).sum()


def test_mixup_blends_each_image_with_its_partner() -> None:
    torch.manual_seed(0)
    inputs, labels = _batch()
    batch = mix_batch(inputs, labels, 0.4, 0.0)
    assert 0.0 < batch.weight < 1.0
    # Recover each image's partner from its blended value and check the label goes with it.
    partner = (inputs[:, 0, 0, 0] * batch.weight - batch.inputs[:, 0, 0, 0]) / (batch.weight - 1)
    order = partner.round().long()
    assert torch.allclose(partner, order.float(), atol=1e-4)
    assert sorted(order.tolist()) == list(range(8))
    assert torch.equal(batch.other_labels, labels[order])
    assert torch.equal(batch.inputs, batch.inputs[:, :1].expand_as(batch.inputs))


def test_cutmix_pastes_one_box_and_weights_labels_by_its_area() -> None:
    torch.manual_seed(3)
    inputs, labels = _batch()
    batch = mix_batch(inputs, labels, 0.0, 1.0)
    changed = batch.inputs[:, 0] != inputs[:, 0]  # [B, H, W]
    moved = changed.any(dim=0)
    pasted_share = moved.float().mean().item()
    assert 0 < pasted_share < 1
    assert batch.weight == pytest.approx(1.0 - pasted_share)
    rows, cols = moved.any(dim=1).nonzero(), moved.any(dim=0).nonzero()
    box = moved[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and box.numel() == moved.sum()  # One solid rectangle.
    # Inside the box every image shows its partner; outside it, itself.
    inside = batch.inputs[:, 0][:, moved]
    assert torch.equal(inside, inside[:, :1].expand_as(inside))
    partners = inside[:, 0].long()
    assert torch.equal(batch.other_labels, labels[partners])
    assert torch.equal(batch.inputs[:, 0][:, ~moved], inputs[:, 0][:, ~moved])


def test_both_alphas_pick_one_method_per_batch() -> None:
    torch.manual_seed(0)
    inputs, labels = _batch()
    kinds = set()
    for _ in range(40):
        batch = mix_batch(inputs, labels, 0.4, 1.0)
        values = batch.inputs[:, 0].flatten(1)
        fractional = (values != values.round()).any().item()
        kinds.add("mixup" if fractional else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_cutmix_box_is_inside_the_image_and_about_the_area() -> None:
    torch.manual_seed(0)
    for area in (0.0, 0.25, 0.5, 1.0):
        boxes = [cutmix_box(32, 32, area) for _ in range(200)]
        for top, bottom, left, right in boxes:
            assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        areas = [(bottom - top) * (right - left) / 1024 for top, bottom, left, right in boxes]
        # Clipping at the border only shrinks a box; an unclipped one covers about ``area``.
        assert max(areas) <= area + 1e-6
        assert max(areas) >= area - 2 * 32 / 1024 - 1e-6


def test_blended_loss_and_accuracy() -> None:
    logits = torch.randn(4, 3)
    labels, others = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    batch = MixedBatch(torch.zeros(4, 1, 2, 2), labels, others, 0.3)
    expected = 0.3 * F.cross_entropy(logits, labels) + 0.7 * F.cross_entropy(logits, others)
    assert torch.allclose(batch.loss(logits), expected)
    predicted = logits.argmax(1)
    expected_correct = 0.3 * (predicted == labels).sum() + 0.7 * (predicted == others).sum()
    assert batch.correct(logits).item() == pytest.approx(expected_correct.item())


@pytest.mark.parametrize("field", ["mixup_alpha", "cutmix_alpha"])
def test_negative_alpha_is_rejected(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: -0.1})


def test_split_keeps_images_labels_partners_and_weight_together() -> None:
    inputs = torch.arange(13.0).view(13, 1, 1, 1)
    labels = torch.arange(13)
    batch = MixedBatch(inputs, labels, labels + 100, 0.3)
    parts = batch.split(4)
    assert [len(part.labels) for part in parts] == [4, 3, 3, 3]
    for part in parts:
        assert part.weight == 0.3
        assert torch.equal(part.inputs.flatten().long(), part.labels)
        assert torch.equal(part.other_labels, part.labels + 100)
    assert torch.equal(torch.cat([part.labels for part in parts]), labels)
    assert len(batch.split(1)) == 1 and len(batch.split(13)) == 13
