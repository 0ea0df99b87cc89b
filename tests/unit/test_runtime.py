"""Process-level settings: device choice and joining a torchrun job."""

from __future__ import annotations

import pytest
import torch

from cnnkit.runtime import init_distributed, select_device


def test_one_process_joins_no_group() -> None:
    context = init_distributed(0, 0, 1, "cuda")
    assert not context.enabled and context.is_main
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(("gpus", "plural"), [(1, ""), (0, "s")])
def test_more_cuda_processes_than_gpus_is_refused(monkeypatch, gpus: int, plural: str) -> None:
    # torchrun --nproc_per_node 2 on a one-GPU machine: NCCL needs a GPU a process.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    message = (
        rf"torchrun started process 2 on this machine, which has {gpus} CUDA device{plural}: "
        rf"start one process a GPU \(--nproc_per_node {gpus}\), or train on the CPU with "
        r"--device cpu"
    )
    with pytest.raises(ValueError, match=message):
        init_distributed(1, 1, 2, torch.device("cuda", 0))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_devices_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        select_device(name)


def test_cpu_is_always_there() -> None:
    assert select_device("cpu") == torch.device("cpu")
