"""Process-level settings: device choice and joining a torchrun job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnkit.cli.train import distributed_from_env
from cnnkit.runtime import init_distributed, select_device, tune_cuda_for_training


def test_one_process_joins_no_group() -> None:
    context = init_distributed(0, 0, 1, "cuda")
    assert not context.enabled and context.is_main
    assert not torch.distributed.is_initialized()


@pytest.fixture
def one_gpu_machine(monkeypatch) -> dict:
    """A machine with one CUDA device, as torch sees it; the process group is recorded, not
    joined (joining needs the other ranks torchrun would start)."""
    joined: dict = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.update(gpu=index))

    def join(backend: str, **options) -> None:
        joined["backend"] = backend

    monkeypatch.setattr(torch.distributed, "init_process_group", join)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    return joined


def test_cpu_training_on_a_gpu_machine_uses_gloo(one_gpu_machine: dict) -> None:
    context = distributed_from_env("cpu")
    assert context.enabled and context.world_size == 2
    assert one_gpu_machine == {"backend": "gloo"}  # No GPU taken: NCCL needs one a process.


def test_cuda_training_uses_nccl_one_gpu_a_process(one_gpu_machine: dict) -> None:
    distributed_from_env("auto")
    assert one_gpu_machine == {"backend": "nccl", "gpu": 0}


def test_more_cuda_processes_than_gpus_is_refused(one_gpu_machine: dict, monkeypatch) -> None:
    # torchrun --nproc_per_node 2 on a one-GPU machine: the second process has no GPU.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    message = (
        r"torchrun started process 2 on this machine, which has 1 CUDA device: start one "
        r"process a GPU \(--nproc_per_node 1\), or train on the CPU with --device cpu"
    )
    with pytest.raises(ValueError, match=message):
        distributed_from_env("cuda")
    assert one_gpu_machine == {}


def test_cuda_without_a_gpu_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="this machine has no CUDA device: use --device cpu"):
        init_distributed(1, 1, 2, torch.device("cuda", 0))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_devices_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        select_device(name)


def test_cpu_is_always_there() -> None:
    assert select_device("cpu") == torch.device("cpu")


RELEASE_SCRIPT = """
import torch
from cnnkit.runtime import tune_allocator
from cnnkit.training.memory import available_memory

def resident_mib():
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * 4096 / 2**20

assert tune_allocator()
blocks = [torch.ones(64, 1024, 1024 // 4) for _ in range(8)]  # 8 x 64 MiB
del blocks
kept = resident_mib()
assert available_memory(torch.device("cpu")) > 0  # The memory check's measurement.
print(kept, resident_mib())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_freed_memory_that_the_tuned_allocator_keeps_is_given_back() -> None:
    # tune_allocator keeps freed tensors' memory in the process (fast for training, but the
    # system's free-memory figure no longer sees it); the memory check of a model trained next
    # (an ensemble's next member, a search worker's next trial) must count it as free.
    from tests.conftest import subprocess_env

    result = subprocess.run(
        [sys.executable, "-c", RELEASE_SCRIPT],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
    )
    kept, released = map(float, result.stdout.split())
    assert kept - released > 400  # Most of the 512 MiB freed goes back to the system.


def test_tuning_cuda_for_training_turns_on_kernel_timing_and_tf32() -> None:
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.benchmark = cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        tune_cuda_for_training()
        assert cudnn.benchmark and cudnn.allow_tf32 and matmul.allow_tf32
    finally:  # The flags are process-wide: later tests get them as they were.
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
