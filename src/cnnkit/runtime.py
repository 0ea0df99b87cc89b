"""Process-level settings: CPU fast path, device choice, seeding, and torch.distributed setup."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import functools
import gc
import logging
import os
import platform
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, where glibc's ``mallopt`` and ``malloc_trim`` live; None if not found.
    Looked up once: the memory check asks before every model it trains."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune_allocator() -> bool:
    """Stop glibc from returning freed memory to the OS after every large tensor.

    PyTorch's CPU allocator frees activation buffers each step; glibc then unmaps them and the
    next step page-faults them back in. Disabling mmap-backed allocations and raising the trim
    threshold keeps the memory in the process (measured in ``benchmarks/cpu_levers.py``).

    Returns:
        True if ``mallopt`` was applied (glibc only).
    """
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
        return bool(ok)
    except AttributeError:
        return False


def release_freed_memory() -> None:
    """Return to the system the heap memory that freed objects left in this process.

    :func:`tune_allocator` keeps it in the process, where the system's free-memory figure does
    not see it; a model trained after another in one process (an ensemble's next member, a
    search worker's next trial) must count the first one's memory as free. ``malloc_trim``
    returns it (glibc only; elsewhere nothing happens).
    """
    gc.collect()
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; other names are checked for presence."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' requested but MPS is not available")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} requested but there are {torch.cuda.device_count()} CUDA devices"
        )
    return device


def tune_cuda_for_training() -> None:
    """Let CUDA pick the fastest kernels for a training run's fixed input shapes.

    cuDNN then times its convolution algorithms on the first batch of each shape and keeps the
    fastest, and float32 matrix products (those outside AMP's half-precision regions) use
    TensorFloat-32 on GPUs that have it. Both trade bit-for-bit reproducibility on CUDA for
    speed; CPU runs, which the seeds make reproducible, are unaffected.
    """
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with channels-last memory, in place: the layout the trainer uses,
    and on a CPU the fastest for convolutions (the EfficientNet-Lite trio at 320 px: 95 ms an
    image against 216 ms in the default layout, on 2 cores). Outputs are unchanged up to
    float rounding, and a model saved later is written in the usual layout; a ``forward`` that
    calls ``.view`` on a convolution's output fails in this layout (``.reshape`` works), so it
    is for models cnnkit loads itself, not a caller's module."""
    return model.eval().to(memory_format=torch.channels_last)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s random stream: ``seed`` itself on rank 0.

    Under torchrun every process starts from the same seed; without an offset all ranks would
    draw the same dropout masks and augmentation parameters for their (different) images.
    """
    return seed + rank * 7_777_777


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
"""The CPU flags of x86's int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI)."""


def cpu_flags(cpuinfo: str | os.PathLike | None = None) -> frozenset[str] | None:
    """The instruction-set flags the kernel lists for this CPU (the first ``flags`` line of
    ``/proc/cpuinfo``, or ``Features`` on ARM), or None where it lists none (macOS, Windows).
    This CPU's are read once."""
    return _cpu_flags(str(cpuinfo)) if cpuinfo is not None else _this_cpus_flags()


@functools.cache
def _this_cpus_flags() -> frozenset[str] | None:
    return _cpu_flags("/proc/cpuinfo")


def _cpu_flags(cpuinfo: str) -> frozenset[str] | None:
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as handle:
            line = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return None
    return frozenset(line.partition(":")[2].split()) if line else None


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() or frozenset()))


def int8_products_saturate(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Whether onnxruntime's uint8 x int8 products can saturate on this CPU: an x86 CPU with
    AVX2 (or AVX-512) but without VNNI, whose kernels add pairs of products in 16 bits.

    Full 8-bit weights then lose accuracy (the bundled model's int8 export scored 53% instead
    of 86% on HASYv2); 7-bit weights, as ``cnnkit export --quantize int8`` writes, do not.
    False where the flags are unknown, and on x86 CPUs without AVX2, whose kernel widens to 32
    bits first.
    """
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags() if flags is None else flags
    if machine not in ("x86_64", "amd64") or flags is None:
        return False
    return "avx2" in flags and not VNNI_FLAGS & flags


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a torchrun job (``world_size == 1`` when not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def main_process_first(context: DistributedContext) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks together.

    For work that fills a cache (decoded images, frozen features): rank 0 writes it, and the
    other ranks then read it instead of all computing (and writing) the same files at once.
    """
    if context.enabled and not context.is_main:
        torch.distributed.barrier()
    yield
    if context.enabled and context.is_main:
        torch.distributed.barrier()


def init_distributed(
    rank: int, local_rank: int, world_size: int, device: str | torch.device = "cpu"
) -> DistributedContext:
    """Join the process group started by ``torchrun``: NCCL when training on CUDA (one GPU a
    process, ``cuda:LOCAL_RANK``), gloo on the CPU, also on a machine that has GPUs.

    The rendezvous address comes from the environment torchrun sets (``MASTER_ADDR``...), which
    ``torch.distributed`` reads itself; callers pass the rank values they parsed.

    Raises:
        ValueError: when training on CUDA with more processes on this machine than GPUs.
    """
    context = DistributedContext(rank, local_rank, world_size)
    if not context.enabled or torch.distributed.is_initialized():
        return context
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ValueError(
                "training on CUDA, but this machine has no CUDA device: use --device cpu"
            )
        if local_rank >= gpus:
            raise ValueError(
                f"torchrun started process {local_rank + 1} on this machine, which has {gpus} "
                f"CUDA device{'s' if gpus != 1 else ''}: start one process a GPU "
                f"(--nproc_per_node {gpus}), or train on the CPU with --device cpu"
            )
        torch.cuda.set_device(local_rank)
    # Other ranks wait while rank 0 decodes the data and computes frozen features into the
    # caches (main_process_first): allow an hour, not NCCL's default 10 minutes.
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(hours=1))
    logger.info("joined %s process group: rank %d of %d", backend, rank, world_size)
    return context


def shutdown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
