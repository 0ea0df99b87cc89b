"""Tests for the weights' moving average (EMA); its use in the trainer is in test_trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.config import TrainConfig
from cnnkit.training.averaging import WeightAverage, start_share


def test_each_update_moves_the_average_by_one_minus_the_decay() -> None:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average = WeightAverage(layer, decay=0.75)
    average.update(layer)  # The first update copies the weights.
    expected = torch.ones(1, 2)
    assert torch.equal(average.module.weight, expected)
    for value in [3.0, -1.0, 5.0]:
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update(layer)
        expected = 0.75 * expected + 0.25 * value
        assert torch.allclose(average.module.weight, expected)
    assert average.updates == 4
    # The starting weights' share is what start_share says: 0.75 ** 3 of the first value.
    assert start_share(0.75, 4) == pytest.approx(0.75**3)
    # The trained layer itself is untouched.
    assert torch.equal(layer.weight, torch.full((1, 2), 5.0))


def test_batch_norm_statistics_are_averaged_and_the_step_counter_copied() -> None:
    norm = nn.BatchNorm1d(3)
    average = WeightAverage(norm, decay=0.9)
    average.update(norm)
    norm.train()
    norm(torch.randn(8, 3) + 4.0)
    average.update(norm)
    expected = 0.1 * norm.running_mean  # The average started at zero means.
    assert torch.allclose(average.module.running_mean, expected)
    assert average.module.num_batches_tracked.item() == norm.num_batches_tracked.item() == 1


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_zero_one_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(nn.Linear(2, 2), decay)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_the_config_refuses_a_bad_ema_decay(decay: float) -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=decay)
