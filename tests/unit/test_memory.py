"""The pre-flight memory estimate: what it counts, that it changes nothing, and the refusal."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch import nn

from cnnkit.config import Preprocessing, TrainConfig
from cnnkit.data.loader import BatchLoader, build_eval_transform
from cnnkit.training import memory
from cnnkit.training.memory import (
    GIB,
    InsufficientMemoryError,
    MemoryEstimate,
    check_training_memory,
    estimate_training_memory,
)
from cnnkit.training.trainer import Trainer

CPU = torch.device("cpu")


def test_estimate_counts_saved_activations_per_sample_and_skips_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 3)).train()
    estimate = estimate_training_memory(model, torch.randn(4, 8), contextlib.nullcontext)
    # The first layer keeps its input (8 floats), ReLU and the second layer share one output
    # (256 floats); the weights they keep are parameters, which exist already.
    assert estimate.per_sample == (8 + 256) * 4
    assert estimate.fixed == 0
    parameters = 8 * 256 + 256 + 256 * 3 + 3
    assert estimate.states == parameters * 4 * 3  # gradients and two Adam states
    assert estimate.total(10) == int(10 * (8 + 256) * 4 * memory.BACKWARD_HEADROOM) + (
        parameters * 12
    )


def test_estimate_leaves_batch_norm_statistics_and_the_random_state_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5)).train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    inputs = torch.randn(4, 8) * 5 + 3
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    estimate_training_memory(model, inputs, contextlib.nullcontext)
    assert torch.equal(torch.rand(3), expected)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_estimate_needs_four_samples() -> None:
    with pytest.raises(ValueError, match="at least four samples"):
        estimate_training_memory(nn.Linear(2, 2), torch.randn(3, 2), contextlib.nullcontext)


def test_a_batch_that_cannot_fit_is_refused_with_a_batch_size_that_does() -> None:
    estimate = MemoryEstimate(per_sample=GIB // 2, fixed=0, states=GIB)
    with pytest.raises(InsufficientMemoryError) as error:
        check_training_memory(estimate, batch_size=32, available=8 * GIB)
    message = str(error.value)
    assert "batch size 32 needs about 21.8 GiB, and 8.0 GiB is available" in message
    fits = estimate.largest_batch(int(8 * GIB * memory.WARN_FRACTION))
    assert f"--batch-size {fits} or smaller" in message and 1 <= fits < 32
    assert estimate.total(fits) <= 8 * GIB * memory.WARN_FRACTION < estimate.total(fits + 1)


def test_near_the_limit_warns_and_far_below_is_silent(caplog) -> None:
    estimate = MemoryEstimate(per_sample=GIB // 4, fixed=0, states=0)
    with caplog.at_level(logging.WARNING, logger="cnnkit.training.memory"):
        check_training_memory(estimate, batch_size=8, available=int(8 * GIB))  # 2.6 GiB
        assert caplog.records == []
        check_training_memory(estimate, batch_size=24, available=int(8.5 * GIB))  # 7.8 GiB
    assert "close to the limit" in caplog.text
    check_training_memory(estimate, batch_size=10_000, available=None)  # unknown: no check


def test_processes_on_one_machine_share_its_memory() -> None:
    estimate = MemoryEstimate(per_sample=GIB // 4, fixed=0, states=0)
    check_training_memory(estimate, batch_size=16, available=8 * GIB)
    with pytest.raises(InsufficientMemoryError, match="4.0 GiB is available"):
        check_training_memory(estimate, batch_size=16, available=8 * GIB, world_size=2)


def _fit(tiny_image_set, monkeypatch, available: int | None, check: bool) -> nn.Module:
    monkeypatch.setattr(memory, "available_memory", lambda device: available)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.3), nn.Linear(32, 4)
    )
    images = tiny_image_set(num_classes=4, per_class=4, size=8, seed=1)
    loader = BatchLoader(
        images, 8, build_eval_transform(Preprocessing("symbol", 1, 8, 8)), shuffle=True, seed=3
    )
    config = TrainConfig(epochs=2, batch_size=8, channels_last=False, memory_check=check)
    Trainer(model, config, CPU, progress=False).fit(loader)
    return model


def test_training_that_cannot_fit_stops_before_the_first_step(tiny_image_set, monkeypatch):
    with pytest.raises(InsufficientMemoryError, match="batch size 8 needs about"):
        _fit(tiny_image_set, monkeypatch, available=1000, check=True)
    _fit(tiny_image_set, monkeypatch, available=1000, check=False)  # the check can be turned off


def test_checking_memory_does_not_change_the_trained_weights(tiny_image_set, monkeypatch):
    checked = _fit(tiny_image_set, monkeypatch, available=64 * GIB, check=True)
    unchecked = _fit(tiny_image_set, monkeypatch, available=64 * GIB, check=False)
    for (name, first), second in zip(
        checked.state_dict().items(), unchecked.state_dict().values(), strict=True
    ):
        assert torch.equal(first, second), name
