"""An exponential moving average (EMA) of a model's weights, kept beside the trained model.

After every optimizer step the average moves a ``1 - decay`` share of the way to the current
weights, so it mostly holds the last ``1 / (1 - decay)`` steps of training (0.98: about 50
steps). Batch-norm statistics are averaged the same way, as in timm's ``ModelEmaV2``. The
average starts at the weights after the first step, and after ``S`` steps they still weigh
``decay ** S`` in it: :func:`start_share` tells when a run is too short for its decay.

The averaging itself is PyTorch's :class:`torch.optim.swa_utils.AveragedModel`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def start_share(decay: float, steps: int) -> float:
    """How much the starting weights still weigh in the average after ``steps`` updates."""
    return decay ** max(steps - 1, 0)


def _ema_step(decay: float):
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _: Any) -> None:
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:  # Integer buffers (batch norm's step counter) follow the model.
            for mean, value in zip(averaged, current, strict=True):
                mean.copy_(value)

    return update


class WeightAverage:
    """The moving average of ``module``'s parameters and buffers.

    Args:
        module: the model being trained (not wrapped in DistributedDataParallel).
        decay: the share of the average kept at each update, in (0, 1).

    Raises:
        ValueError: for a decay outside (0, 1).
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the weight-average decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(module, multi_avg_fn=_ema_step(decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged network, a copy of the trained one with the averaged weights."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold ``module``'s current weights into the average."""
        self.averaged.update_parameters(module)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
