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
from cnnkit.training.mixing import MixedBatch
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


def test_a_batch_that_cannot_fit_is_split_into_micro_batches_that_do(caplog) -> None:
    estimate = MemoryEstimate(per_sample=GIB // 2, fixed=0, states=GIB)
    fits = estimate.largest_batch(int(8 * GIB * memory.WARN_FRACTION))
    assert estimate.total(fits) <= 8 * GIB * memory.WARN_FRACTION < estimate.total(fits + 1)
    with caplog.at_level(logging.WARNING, logger="cnnkit.training.memory"):
        chunk = check_training_memory(estimate, batch_size=32, available=8 * GIB)
    # 32 samples, at most 8 a pass: four passes of 8.
    assert fits == 8 and chunk == 8
    assert "batch size 32 needs about 21.8 GiB, and 8.0 GiB is available" in caplog.text
    assert "4 passes of at most 8 samples instead (about 6.2 GiB" in caplog.text


def test_even_chunks_use_the_fewest_passes() -> None:
    assert memory.even_chunk(32, 13) == 11  # 11 + 11 + 10
    assert memory.even_chunk(32, 32) == 32 and memory.even_chunk(32, 100) == 32
    assert memory.even_chunk(7, 1) == 1 and memory.even_chunk(10, 4) == 4  # 4 + 4 + 2


def test_a_micro_batch_that_cannot_fit_is_refused_with_one_that_does() -> None:
    estimate = MemoryEstimate(per_sample=GIB // 2, fixed=0, states=GIB)
    with pytest.raises(InsufficientMemoryError) as error:
        check_training_memory(estimate, batch_size=32, available=8 * GIB, micro_batch_size=16)
    message = str(error.value)
    assert "batch size 32 in micro-batches of 16 needs about 11.4 GiB" in message
    assert "use --micro-batch 8 or smaller" in message
    assert check_training_memory(estimate, 32, 8 * GIB, micro_batch_size=4) == 4
    # Not even one sample fits: no split helps.
    with pytest.raises(InsufficientMemoryError, match="a smaller model or image size"):
        check_training_memory(estimate, batch_size=32, available=GIB)


def test_a_split_that_fits_only_past_the_margin_is_warned_about_not_refused(caplog) -> None:
    # One sample needs 1.95 GiB of 2.2: under the whole, over the 85% margin.
    estimate = MemoryEstimate(per_sample=int(1.5 * GIB), fixed=0, states=0)
    with caplog.at_level(logging.WARNING, logger="cnnkit.training.memory"):
        assert check_training_memory(estimate, 4, int(2.2 * GIB), micro_batch_size=1) == 1
    assert "close to the limit" in caplog.text


def test_near_the_limit_warns_and_far_below_is_silent(caplog) -> None:
    estimate = MemoryEstimate(per_sample=GIB // 4, fixed=0, states=0)
    with caplog.at_level(logging.WARNING, logger="cnnkit.training.memory"):
        assert check_training_memory(estimate, batch_size=8, available=int(8 * GIB)) == 8
        assert caplog.records == []
        # 7.8 GiB of 8: past the margin, but it fits, so the batch stays whole (a split would
        # change the rounding, and the result would depend on the memory free at the time).
        assert check_training_memory(estimate, batch_size=24, available=8 * GIB) == 24
        assert "close to the limit" in caplog.text and "--micro-batch 12" in caplog.text
        caplog.clear()
        # 7.8 GiB of 8.5: over the 85% mark but under the whole, with the split fixed.
        assert check_training_memory(estimate, 48, int(8.5 * GIB), micro_batch_size=24) == 24
    assert "close to the limit" in caplog.text and "--micro-batch 16 or smaller" in caplog.text
    assert check_training_memory(estimate, batch_size=10_000, available=None) == 10_000


def test_processes_on_one_machine_share_its_memory() -> None:
    estimate = MemoryEstimate(per_sample=GIB // 4, fixed=0, states=0)
    assert check_training_memory(estimate, batch_size=20, available=8 * GIB) == 20
    # Two processes: 6.5 GiB needed of a 4 GiB share, so passes of at most 10 (3.25 GiB).
    assert check_training_memory(estimate, 20, 8 * GIB, world_size=2) == 10
    with pytest.raises(InsufficientMemoryError, match="4.0 GiB is available"):
        check_training_memory(estimate, 16, 8 * GIB, world_size=2, micro_batch_size=16)


def _fit(tiny_image_set, monkeypatch, available: int | None, check: bool) -> nn.Module:
    monkeypatch.setattr(memory, "available_memory", lambda device, needed=None: available)
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


def _fit_plain(tiny_image_set, norm: bool = False, **train: object) -> tuple[nn.Module, Trainer]:
    """Two epochs of a network without dropout, and without batch norm unless ``norm``: then
    its gradients do not depend on how a batch is split."""
    torch.manual_seed(0)
    hidden = [nn.Linear(64, 32), nn.BatchNorm1d(32)] if norm else [nn.Linear(64, 32)]
    model = nn.Sequential(nn.Flatten(), *hidden, nn.ReLU(), nn.Linear(32, 4))
    images = tiny_image_set(num_classes=4, per_class=5, size=8, seed=1)
    loader = BatchLoader(
        images, 8, build_eval_transform(Preprocessing("symbol", 1, 8, 8)), shuffle=True, seed=3
    )
    config = TrainConfig(epochs=2, batch_size=8, channels_last=False, mixup_alpha=0.4, **train)
    trainer = Trainer(model, config, CPU, progress=False)
    trainer.fit(loader)
    return model, trainer


def _assert_same_weights(first: nn.Module, second: nn.Module) -> None:
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_micro_batches_give_the_whole_batch_update(tiny_image_set) -> None:
    whole, trainer = _fit_plain(tiny_image_set, memory_check=False)
    split, split_trainer = _fit_plain(tiny_image_set, memory_check=False, micro_batch_size=3)
    assert split_trainer.micro_batch_size == 3
    _assert_same_weights(whole, split)
    # Loss and accuracy are reported for whole batches either way.
    assert split_trainer.history[-1]["train_loss"] == pytest.approx(
        trainer.history[-1]["train_loss"], rel=1e-5
    )
    assert split_trainer.history[-1]["train_accuracy"] == pytest.approx(
        trainer.history[-1]["train_accuracy"], rel=1e-5
    )


def test_a_batch_too_big_for_memory_trains_in_micro_batches(tiny_image_set, monkeypatch):
    probe = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    estimate = estimate_training_memory(probe, torch.rand(4, 1, 8, 8), contextlib.nullcontext)
    # Just too little room for the whole batch of eight: it is split into the fewest even
    # passes that fit within the margin.
    room = estimate.total(8) - 1
    monkeypatch.setattr(memory, "available_memory", lambda device, needed=None: room)
    split, trainer = _fit_plain(tiny_image_set)
    # Passes within the margin, or when the fixed costs leave none, within the whole room.
    fits = estimate.largest_batch(int(room * memory.WARN_FRACTION)) or estimate.largest_batch(room)
    assert 1 <= fits < 8 and trainer.micro_batch_size == memory.even_chunk(8, fits)
    whole, _ = _fit_plain(tiny_image_set, memory_check=False)
    _assert_same_weights(whole, split)


def test_a_batch_is_split_evenly_so_no_pass_holds_a_lone_sample(tiny_image_set) -> None:
    # Batches of 8 with at most 7 a pass: 4 + 4, not 7 + 1, which batch norm cannot train on.
    model, trainer = _fit_plain(tiny_image_set, norm=True, micro_batch_size=7)
    assert trainer.micro_batch_size == 7 and all(p.isfinite().all() for p in model.parameters())


def test_gradient_scaling_applies_to_every_pass_and_steps_once() -> None:
    """The CUDA AMP path (GradScaler), run with the CPU scaler: the same weights as no scaler."""
    inputs, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def step(micro: int | None, scaler: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        config = TrainConfig(batch_size=8, micro_batch_size=micro, channels_last=False)
        trainer = Trainer(nn.Linear(6, 3), config, CPU, progress=False)
        trainer.optimizer = trainer._build_optimizer()
        if scaler:
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        trainer.train_step(MixedBatch(inputs, labels, labels.flip(0), 0.7))
        return [p.detach().clone() for p in trainer.module.parameters()]

    reference = step(None, scaler=False)
    for first, second in zip(reference, step(3, scaler=True), strict=True):
        torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)


def test_with_no_room_for_the_margin_splits_and_advice_use_all_the_memory(caplog) -> None:
    # A large fixed cost: within 85% of 9 GiB not even one sample fits, within 9 GiB seven do.
    estimate = MemoryEstimate(per_sample=GIB // 8, fixed=6 * GIB, states=0)
    with pytest.raises(InsufficientMemoryError, match="use --micro-batch 7 or smaller"):
        check_training_memory(estimate, 32, 9 * GIB, micro_batch_size=16)
    with caplog.at_level(logging.WARNING, logger="cnnkit.training.memory"):
        assert check_training_memory(estimate, 32, 9 * GIB, micro_batch_size=7) == 7
        assert check_training_memory(estimate, batch_size=32, available=9 * GIB) == 7
    assert "no split leaves a margin" in caplog.text


def test_gpu_memory_cached_by_pytorch_counts_as_free(monkeypatch) -> None:
    # An ensemble's second member trains after the first freed its tensors into the
    # allocator's cache: the driver does not count that memory free, but training can use it.
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * gib)
    assert memory.available_memory(torch.device("cuda", 0)) == 27 * gib


def test_freed_memory_is_given_back_only_when_what_is_free_falls_short(monkeypatch) -> None:
    """Giving back what this process freed takes a full garbage collection: only worth it when
    the memory the system reports free is not enough."""
    free = iter([3 * GIB, 3 * GIB, 5 * GIB, 5 * GIB])
    monkeypatch.setattr(memory, "_free_system_memory", lambda: next(free))
    released = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: released.append(True))
    cpu = torch.device("cpu")
    assert memory.available_memory(cpu, needed=2 * GIB) == 3 * GIB
    assert released == []
    # 4 GiB needed and 3 free: what the process kept goes back, and the memory is measured again.
    assert memory.available_memory(cpu, needed=4 * GIB) == 5 * GIB
    assert released == [True]
    assert memory.available_memory(cpu) == 5 * GIB  # No need given: always given back.
    assert released == [True, True]


def test_cgroup_headroom_counts_inactive_page_cache_as_free(tmp_path) -> None:
    gib = 1 << 30
    (tmp_path / "memory.max").write_text(f"{8 * gib}\n")
    (tmp_path / "memory.current").write_text(f"{int(7.5 * gib)}\n")
    # 6 GiB of the usage is page cache the kernel would reclaim: 4 GiB of it inactive.
    (tmp_path / "memory.stat").write_text(f"anon {gib}\nfile {6 * gib}\ninactive_file {4 * gib}\n")
    assert memory._cgroup_headroom(tmp_path) == int(4.5 * gib)
    (tmp_path / "memory.stat").unlink()  # No breakdown: all of the usage counts.
    assert memory._cgroup_headroom(tmp_path) == gib // 2
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_headroom(tmp_path) is None
