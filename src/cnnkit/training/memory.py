"""A pre-flight memory estimate, so a batch too big for RAM is split, or refused with advice,
instead of killed.

On CPU the kernel's OOM killer ends a process that outgrows the machine with a bare
``Killed``: no traceback, no hint. Before the first optimiser step the trainer measures what
two and four samples keep alive for the backward pass (the tensors autograd saves), scales that
to the batch, adds gradients and optimiser state, and compares it with the memory available.
A batch that does not fit is then computed in micro-batches whose gradients add up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnkit.runtime import release_freed_memory

logger = logging.getLogger(__name__)

GIB = 2**30
# The backward pass holds input gradients next to the saved activations; measured on the
# transfer trio at 320 px, peak use was about 1.2x the saved tensors (batch 16: 10 GB).
BACKWARD_HEADROOM = 1.3
WARN_FRACTION = 0.85


class InsufficientMemoryError(ValueError):
    """Training would need more memory than the machine has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step needs beyond what is already allocated.

    Attributes:
        per_sample: activations saved for backward, per sample in the batch.
        fixed: activations saved whatever the batch size.
        states: gradients plus optimiser state (``optimizer_states`` tensors per parameter).
    """

    per_sample: int
    fixed: int
    states: int

    def total(self, batch_size: int) -> int:
        activations = self.per_sample * batch_size + self.fixed
        return int(activations * BACKWARD_HEADROOM) + self.states

    def largest_batch(self, available: int) -> int:
        """The largest batch size whose :meth:`total` fits in ``available`` bytes (0 if none)."""
        room = available / BACKWARD_HEADROOM - self.fixed - self.states / BACKWARD_HEADROOM
        return max(0, int(room // max(self.per_sample, 1)))


def _saved_bytes(model: nn.Module, inputs: torch.Tensor, autocast: Callable) -> int:
    """Bytes of the distinct new storages autograd saves during one forward pass.

    Parameters that are saved (a linear layer keeps its weight) exist already and are skipped.
    """
    existing = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in existing:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        model(inputs)
    return sum(storages.values())


def estimate_training_memory(
    model: nn.Module, inputs: torch.Tensor, autocast: Callable, optimizer_states: int = 2
) -> MemoryEstimate:
    """Measure ``model``'s training memory on the first two and four samples of ``inputs``.

    The model's buffers (batch-norm statistics) and the random state are restored afterwards,
    so measuring changes nothing about the run.

    Args:
        model: the model in training mode.
        inputs: a batch of at least four samples, as the model will see them (two, not one,
            is the smaller probe: batch norm on ``[1, C]`` features cannot train).
        autocast: returns the autocast context the training step uses.
        optimizer_states: tensors the optimiser keeps per parameter (Adam: 2, SGD momentum: 1).
    """
    if len(inputs) < 4:
        raise ValueError("estimate_training_memory needs a batch of at least four samples")
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # Clones, so that a saved input holds two or four samples, not the whole batch.
        two = _saved_bytes(model, inputs[:2].clone(), autocast)
        four = _saved_bytes(model, inputs[:4].clone(), autocast)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    per_sample = max(four - two, 0) // 2
    fixed = max(two - 2 * per_sample, 0)
    return MemoryEstimate(per_sample, fixed, trainable * (1 + optimizer_states))


def _cgroup_headroom(folder: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, if it has one. The usage
    counts page cache too; its inactive file pages (the decoded-image cache just written,
    say) are reclaimed before the limit bites, so they count as free."""
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((folder / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    try:
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        used -= int(stat.get("inactive_file", 0))
    except (OSError, ValueError):
        pass  # Without the breakdown, all of the usage counts.
    return int(limit) - max(used, 0)


def available_memory(device: torch.device, needed: int | None = None) -> int | None:
    """Bytes free for training on ``device``: RAM for the CPU, the GPU's free memory for CUDA.

    On the CPU, memory that this process freed but its allocator kept (an earlier model's) is
    free too: it is given back to the system before measuring, unless ``needed`` bytes are free
    without it (giving it back takes a full garbage collection, seconds in a large process).

    Returns:
        The bytes, or None where they cannot be told (non-Linux CPUs, MPS).
    """
    if device.type == "cuda":
        # Memory PyTorch's allocator holds but no tensor uses (an earlier model's, such as an
        # ensemble's previous member) is free to this process too, though not to the driver.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type != "cpu":
        return None
    if needed is not None:
        available = _free_system_memory()
        if available is not None and available >= needed:
            return available
    release_freed_memory()
    return _free_system_memory()


def _free_system_memory() -> int | None:
    """MemAvailable, or less where this process's cgroup limit leaves less."""
    try:
        with open("/proc/meminfo") as stream:
            fields = dict(line.split(":", 1) for line in stream)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    headroom = _cgroup_headroom()
    return min(available, headroom) if headroom is not None else available


def pass_count(batch_size: int, largest: int) -> int:
    """The fewest passes of at most ``largest`` samples that cover ``batch_size`` samples."""
    return -(-batch_size // max(largest, 1))


def even_chunk(batch_size: int, largest: int) -> int:
    """The largest pass when ``batch_size`` is split into the fewest passes of at most
    ``largest`` samples, as evenly as possible (32 with at most 13 a pass: 11, 11 and 10)."""
    return -(-batch_size // pass_count(batch_size, largest))


def check_training_memory(
    estimate: MemoryEstimate,
    batch_size: int,
    available: int | None,
    world_size: int = 1,
    micro_batch_size: int | None = None,
) -> int:
    """Choose how many samples each forward pass takes, so that training fits in memory.

    A batch that fits is taken whole (with a warning when it nearly fills the memory). One that
    does not is split into micro-batches, sized to leave a margin, whose gradients are
    accumulated: mathematically the same update, in more passes. Only a batch that cannot fit
    at all is split, because a split sums in another order, and the result then depends on how
    much memory happened to be free. ``micro_batch_size`` fixes the split; a fixed split that
    cannot fit is refused.

    Args:
        estimate: from :func:`estimate_training_memory`.
        batch_size: the batch size of one process (under torchrun, its share of the batch).
        available: from :func:`available_memory`; None skips the check.
        world_size: processes sharing this machine's memory (torchrun on CPU).
        micro_batch_size: samples per pass chosen by the user; None lets the check choose.

    Returns:
        Samples per forward pass (``batch_size`` when the batch is taken whole).

    Raises:
        InsufficientMemoryError: naming the need, what is available and a size that fits.
    """
    chunk = min(micro_batch_size or batch_size, batch_size)
    if available is None:
        return chunk
    share = available // max(world_size, 1)
    limit = int(share * WARN_FRACTION)
    needed = estimate.total(chunk)
    if needed <= limit:
        return chunk
    fits = estimate.largest_batch(limit)
    passes = f" in micro-batches of {chunk}" if chunk < batch_size else ""
    message = (
        f"training at batch size {batch_size}{passes} needs about {needed / GIB:.1f} GiB, and "
        f"{share / GIB:.1f} GiB is available"
    )
    past_margin = fits < 1
    if past_margin:
        fits = estimate.largest_batch(share)  # No room for the margin: use all there is.
    if fits >= 1 and micro_batch_size is None and needed > share:
        return _accumulating_chunk(estimate, batch_size, fits, message, past_margin)
    _refuse_or_warn(message, batch_size, fits, out_of_memory=needed > share)
    return chunk


def _accumulating_chunk(
    estimate: MemoryEstimate, batch_size: int, fits: int, message: str, past_margin: bool
) -> int:
    """The largest pass of an even split of ``batch_size`` into passes of at most ``fits``
    samples, with a warning that gradients are accumulated over the passes."""
    chunk = even_chunk(batch_size, fits)
    logger.warning(
        "%s: accumulating gradients over %d passes of at most %d samples instead (about "
        "%.1f GiB%s; the same updates up to rounding, except that batch norm in training "
        "mode normalises each pass by itself; --micro-batch sets the size)",
        message,
        pass_count(batch_size, chunk),
        chunk,
        estimate.total(chunk) / GIB,
        ", close to the limit: no split leaves a margin" if past_margin else "",
    )
    return chunk


def _refuse_or_warn(message: str, batch_size: int, fits: int, out_of_memory: bool) -> None:
    """Refuse a step that would run out of memory, or warn about one close to the limit,
    advising a micro-batch size of ``fits`` samples or fewer (or, at 0, a smaller model).

    Raises:
        InsufficientMemoryError: when ``out_of_memory``.
    """
    advice = (  # The even split that fits: 31 of 32 would run as passes of 16 anyway.
        f"use --micro-batch {even_chunk(batch_size, fits)} or smaller"
        if fits >= 1
        else "a smaller model or image size is needed"
    )
    if out_of_memory:
        raise InsufficientMemoryError(
            f"{message}: it would run out of memory ({advice}; set train.memory_check: false "
            "in a --config file to try anyway)"
        )
    logger.warning("%s: close to the limit; if the process is killed, %s", message, advice)


def check_before_training(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_size: int,
    autocast: Callable = contextlib.nullcontext,
    optimizer_states: int = 2,
    micro_batch_size: int | None = None,
) -> int:
    """Estimate and check in one call; returns the samples per forward pass (see
    :func:`check_training_memory`). Batches under four samples are not checked.

    On CPU, the processes torchrun starts on this machine (``LOCAL_WORLD_SIZE``) share its RAM.
    """
    if len(inputs) < 4:
        return min(micro_batch_size or batch_size, batch_size)  # too few samples to measure
    estimate = estimate_training_memory(model, inputs, autocast, optimizer_states)
    logger.info(
        "memory estimate: %.2f GiB per step at batch size %d",
        estimate.total(batch_size) / GIB,
        batch_size,
    )
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if inputs.device.type == "cpu" else 1
    # Where this much is free, the check takes the batch whole without a word.
    chunk = min(micro_batch_size or batch_size, batch_size)
    comfortable = math.ceil(estimate.total(chunk) * sharing / WARN_FRACTION)
    available = available_memory(inputs.device, needed=comfortable)
    return check_training_memory(estimate, batch_size, available, sharing, micro_batch_size)
