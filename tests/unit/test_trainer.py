"""Tests for the generic Trainer: overfitting, resume, checkpoints, early stopping and loggers."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import re
import tempfile
from pathlib import Path

import pytest
import torch
from tests.conftest import StopAfter
from torch import nn

from cnnkit.atomic import write_atomically
from cnnkit.config import AugmentConfig, Preprocessing, TrainConfig
from cnnkit.data.loader import BatchLoader, build_eval_transform, build_train_transform
from cnnkit.training.callbacks import CsvLogger, TensorBoardLogger
from cnnkit.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
)
from cnnkit.training.trainer import Callback, Trainer, TrainingDiverged, TrainingInterrupted

CPU = torch.device("cpu")
PREPROCESSING = Preprocessing("symbol", 1, 8, 8, (0.5,), (0.5,))
BASE = TrainConfig(
    epochs=4,
    batch_size=8,
    learning_rate=1e-2,
    weight_decay=1e-4,
    label_smoothing=0.0,
    channels_last=False,
    amp=False,
)


class BoringModel(nn.Module):
    """A tiny classifier over 8x8 one-channel images, with dropout so the RNG matters."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _model(seed: int = 0) -> BoringModel:
    torch.manual_seed(seed)
    return BoringModel()


def _loaders(tiny_image_set, augment: bool = False) -> tuple[BatchLoader, BatchLoader]:
    # Two training batches of eight; augmentation (when on) makes the epoch's RNG matter too.
    train = tiny_image_set(num_classes=4, per_class=4, size=8, seed=1)
    val = tiny_image_set(num_classes=4, per_class=2, size=8, seed=2)
    config = AugmentConfig(enabled=augment, max_rotation=5)
    train_loader = BatchLoader(
        train, 8, build_train_transform(PREPROCESSING, config), shuffle=True, seed=3
    )
    val_loader = BatchLoader(val, 8, build_eval_transform(PREPROCESSING))
    return train_loader, val_loader


def _equal_states(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _metrics_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.events.append(f"start@{trainer.epoch}")

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.events.append(f"epoch{int(metrics['epoch'])}")

    def on_fit_end(self, trainer: Trainer, result) -> None:
        self.events.append("end")

    def teardown(self, trainer: Trainer) -> None:
        self.events.append("teardown")


def test_overfits_two_small_batches(tiny_image_set) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=40, schedule="constant", warmup_fraction=0.0)
    result = Trainer(_model(), config, CPU, progress=False).fit(train_loader)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 40 and result.epochs_run == 40
    assert losses[-1] < 0.25 * losses[0]
    assert result.history[-1]["train_accuracy"] >= 0.9


def test_history_rows_and_evaluation(tiny_image_set) -> None:
    train_loader, val_loader = _loaders(tiny_image_set)
    trainer = Trainer(_model(), dataclasses.replace(BASE, epochs=2), CPU, progress=False)
    result = trainer.fit(train_loader, val_loader)
    row = result.history[-1]
    for key in ("epoch", "train_loss", "train_accuracy", "learning_rate", "val_accuracy"):
        assert key in row
    # The best epoch is the first with the highest validation accuracy (a tie does not replace it).
    scores = [r["val_accuracy"] for r in result.history]
    assert result.best_epoch == 1 + scores.index(max(scores))
    assert result.best_val_accuracy == max(scores)
    logits, labels = trainer.predict(val_loader)
    assert logits.shape == (8, 4) and labels.shape == (8,)
    metrics = trainer.evaluate(val_loader)
    assert set(metrics) == {"loss", "accuracy", "top5"}
    assert metrics["top5"] == 1.0  # Four classes: the true one is always in the top five.


def test_callbacks_are_called_in_order(tiny_image_set) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    recorder = Recorder()
    config = dataclasses.replace(BASE, epochs=2)
    Trainer(_model(), config, CPU, callbacks=[recorder], progress=False).fit(train_loader)
    assert recorder.events == ["start@0", "epoch1", "epoch2", "end", "teardown"]


class Prune(Callback):
    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        raise LookupError("pruned")


def test_a_raising_callback_still_tears_down_and_closes_tensorboard(
    tiny_image_set, tmp_path: Path
) -> None:
    """A pruned search trial ends fit with an exception: the TensorBoard writer must not leak,
    and the epoch it logged before the trial was pruned is in its file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_loader, _ = _loaders(tiny_image_set)
    recorder, board = Recorder(), TensorBoardLogger(tmp_path / "tb", prefix="trial/")
    callbacks = [recorder, board, CsvLogger(tmp_path / "metrics.csv"), Prune()]
    trainer = Trainer(_model(), BASE, CPU, callbacks=callbacks, progress=False)
    with pytest.raises(LookupError, match="pruned"):
        trainer.fit(train_loader)
    assert recorder.events == ["start@0", "epoch1", "teardown"]
    assert board.writer is None
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    # Every figure of epoch 1's row but the epoch itself, at step 1, as metrics.csv has it.
    (row,) = _metrics_rows(tmp_path / "metrics.csv")
    assert {key: float(value) for key, value in row.items()} == trainer.history[0]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    expected = {f"trial/{key}": float(value) for key, value in row.items() if key != "epoch"}
    assert "trial/train_loss" in expected and "trial/learning_rate" in expected
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, value in expected.items():
        logged = [(scalar.step, scalar.value) for scalar in events.Scalars(tag)]
        assert logged == [(1, pytest.approx(value, rel=1e-6))], tag


def test_interrupted_run_resumes_to_the_same_weights(tiny_image_set, tmp_path: Path) -> None:
    """Ctrl-C after epoch 2 of 4, then --resume: identical to an uninterrupted run (onecycle)."""
    config = dataclasses.replace(BASE, epochs=4)
    train_loader, val_loader = _loaders(tiny_image_set, augment=True)
    straight = Trainer(_model(), config, CPU, tmp_path / "straight", progress=False)
    straight.fit(train_loader, val_loader)

    run = tmp_path / "interrupted"
    first = Trainer(_model(), config, CPU, run, callbacks=[StopAfter(2)], progress=False)
    with pytest.raises(TrainingInterrupted) as interrupted:
        first.fit(train_loader, val_loader)
    assert interrupted.value.epochs_completed == 2
    assert interrupted.value.checkpoint == run / CHECKPOINT_NAME

    recorder = Recorder()
    second = Trainer(_model(seed=99), config, CPU, run, callbacks=[recorder], progress=False)
    result = second.fit(train_loader, val_loader, resume=True)
    assert recorder.events[:2] == ["start@2", "epoch3"]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert _equal_states(second.module.state_dict(), straight.module.state_dict())


class InterruptedLoader(BatchLoader):
    """Simulates Ctrl-C during the first batch, before any checkpoint exists."""

    def __iter__(self):
        raise KeyboardInterrupt
        yield


def test_ctrl_c_before_any_checkpoint_reports_none(tiny_image_set, run_dir: Path) -> None:
    train_loader, val_loader = _loaders(tiny_image_set)
    train_loader.__class__ = InterruptedLoader
    trainer = Trainer(_model(), BASE, CPU, run_dir, progress=False)
    with pytest.raises(TrainingInterrupted) as interrupted:
        trainer.fit(train_loader, val_loader)
    assert interrupted.value.epochs_completed == 0
    assert interrupted.value.checkpoint is None
    assert not (run_dir / CHECKPOINT_NAME).exists()


def test_resume_with_more_epochs_continues_like_a_longer_run(tiny_image_set, tmp_path) -> None:
    """2 epochs, then resume with epochs=4: the same weights as 4 epochs straight."""
    config = dataclasses.replace(BASE, epochs=4, schedule="constant", warmup_fraction=0.0)
    train_loader, _ = _loaders(tiny_image_set, augment=True)
    straight = Trainer(_model(), config, CPU, tmp_path / "straight", progress=False)
    straight.fit(train_loader)

    run = tmp_path / "resumed"
    short = dataclasses.replace(config, epochs=2)
    Trainer(_model(), short, CPU, run, [CsvLogger(run / "metrics.csv")], progress=False).fit(
        train_loader
    )
    assert load_checkpoint(run / CHECKPOINT_NAME)["epoch"] == 2
    assert len(_metrics_rows(run / "metrics.csv")) == 2

    logger = CsvLogger(run / "metrics.csv")
    resumed = Trainer(_model(seed=5), config, CPU, run, [logger], progress=False)
    result = resumed.fit(train_loader, resume=True)
    assert result.epochs_run == 4
    assert _equal_states(resumed.module.state_dict(), straight.module.state_dict())
    rows = _metrics_rows(run / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    assert "train_loss" in rows[0]


def test_resume_with_more_epochs_works_with_onecycle(tiny_image_set, tmp_path: Path) -> None:
    """`cnnkit train --epochs 1` then `--resume --epochs 2` under the default schedule."""
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=1, schedule="onecycle")
    Trainer(_model(), config, CPU, tmp_path, progress=False).fit(train_loader)
    longer, recorder = dataclasses.replace(config, epochs=2), Recorder()
    resumed = Trainer(_model(), longer, CPU, tmp_path, [recorder], progress=False)
    result = resumed.fit(train_loader, resume=True)
    # It went on after epoch 1 (a fresh start, seeded alike, would end with the same rows).
    assert recorder.events == ["start@1", "epoch2", "end", "teardown"]
    assert [row["epoch"] for row in result.history] == [1, 2]


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_longer_resumed_run_steps_at_the_longer_schedules_rate(tiny_image_set, schedule) -> None:
    """Epoch 2 of a 1-epoch run resumed with epochs=2 starts at the 2-epoch schedule's rate,
    not at the rate where the 1-epoch schedule ended."""
    train_loader, _ = _loaders(tiny_image_set)  # Two steps an epoch.
    config = dataclasses.replace(BASE, epochs=2, schedule=schedule, warmup_fraction=0.0)
    straight = Trainer(_model(), config, CPU, progress=False).fit(train_loader).history
    with tempfile.TemporaryDirectory() as folder:
        short = dataclasses.replace(config, epochs=1)
        Trainer(_model(), short, CPU, Path(folder), progress=False).fit(train_loader)
        recorder = Recorder()
        resumed = Trainer(_model(), config, CPU, Path(folder), [recorder], progress=False)
        history = resumed.fit(train_loader, resume=True).history
    # Only epoch 2 was trained: a fresh 2-epoch run would match the straight run's rates too.
    assert recorder.events == ["start@1", "epoch2", "end", "teardown"]
    # Epoch 1 ran under the 1-epoch schedule (one-cycle's warm-up is a share of the run).
    assert history[1]["learning_rate"] == pytest.approx(straight[1]["learning_rate"])
    assert history[1]["learning_rate"] > 1e-3  # Where the 1-epoch schedule ended: about 0.


def test_resume_with_fewer_steps_per_epoch_than_its_onecycle_took_is_refused(
    tiny_image_set, tmp_path: Path
) -> None:
    """Two batches an epoch, then a resume at one batch an epoch: the one-cycle schedule would
    step past its end, so the checkpoint is refused with the figures, before any step."""
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=1, schedule="onecycle")
    Trainer(_model(), config, CPU, tmp_path, progress=False).fit(train_loader)
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    train = tiny_image_set(num_classes=4, per_class=2, size=8, seed=1)  # One batch of eight.
    shorter = BatchLoader(train, 8, build_eval_transform(PREPROCESSING), shuffle=True, seed=3)
    longer = dataclasses.replace(config, epochs=2)
    resumed = Trainer(_model(), longer, CPU, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"took 2 optimizer steps in 1 epoch\(s\).* of 2 "):
        resumed.fit(shorter, resume=True)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == saved["epoch"] == 1
    # With no epoch left to run no step is taken, so the shorter schedule does not matter.
    done = Trainer(_model(), config, CPU, tmp_path, progress=False).fit(shorter, resume=True)
    assert [row["epoch"] for row in done.history] == [1]


def test_a_cosine_resumed_at_another_batch_size_goes_on_from_the_epochs_done(
    tiny_image_set, tmp_path: Path, caplog
) -> None:
    """Two steps an epoch, then a resume at one step an epoch: the checkpoint's 2 steps would
    put this run's 2-step cosine at its end (a rate of 0 for epoch 2). The schedule goes on
    from the end of epoch 1 as this run counts it, halfway, and the change is logged."""
    train_loader, _ = _loaders(tiny_image_set)  # Two steps an epoch.
    config = dataclasses.replace(BASE, epochs=1, schedule="cosine", warmup_fraction=0.0)
    Trainer(_model(), config, CPU, tmp_path, progress=False).fit(train_loader)
    train = tiny_image_set(num_classes=4, per_class=2, size=8, seed=1)  # One batch of eight.
    whole = BatchLoader(train, 8, build_eval_transform(PREPROCESSING), shuffle=True, seed=3)
    longer = dataclasses.replace(config, epochs=2)
    resumed = Trainer(_model(), longer, CPU, tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="cnnkit.training.resume"):
        history = resumed.fit(whole, resume=True).history
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["learning_rate"] == pytest.approx(5e-3)  # cos(pi / 2) of 1e-2's range.
    assert "took 2 optimizer steps in 1 epoch(s), this one takes 1 an epoch" in caplog.text


def test_resume_without_a_checkpoint_starts_fresh(tiny_image_set, run_dir: Path) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    trainer = Trainer(_model(), dataclasses.replace(BASE, epochs=1), CPU, run_dir, progress=False)
    assert trainer.fit(train_loader, resume=True).epochs_run == 1


def test_checkpoint_is_written_atomically(tiny_image_set, run_dir: Path, monkeypatch) -> None:
    """A crash while epoch 3's checkpoint is written, part of it on disk, leaves epoch 2's
    checkpoint as it was and no temporary file."""
    train_loader, _ = _loaders(tiny_image_set)
    trainer = Trainer(_model(), dataclasses.replace(BASE, epochs=2), CPU, run_dir, progress=False)
    trainer.fit(train_loader)
    assert sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_NAME]
    path = run_dir / CHECKPOINT_NAME
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert _equal_states(state["model"], trainer.module.state_dict())
    saved = path.read_bytes()

    def crash_mid_write(obj, target, *args, **kwargs) -> None:
        Path(target).write_bytes(saved[: len(saved) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    longer = Trainer(_model(), dataclasses.replace(BASE, epochs=3), CPU, run_dir, progress=False)
    with pytest.raises(OSError, match="disk full"):
        longer.fit(train_loader, resume=True)
    assert longer.epoch == 3  # Epoch 3 was trained; its checkpoint was being written.
    assert path.read_bytes() == saved
    assert sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_NAME]
    assert load_checkpoint(path)["epoch"] == 2


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(run_dir: Path) -> None:
    path = run_dir / CHECKPOINT_NAME
    save_checkpoint(path, {"epoch": 1})

    def broken_write(temporary: Path) -> None:
        temporary.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, broken_write)
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in run_dir.iterdir()] == [CHECKPOINT_NAME]


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_remove_checkpoints_deletes_the_runs_and_its_phases(run_dir: Path) -> None:
    for folder in (run_dir, run_dir / "finetune"):
        save_checkpoint(folder / CHECKPOINT_NAME, {"epoch": 1})
    (run_dir / "model.safetensors").write_bytes(b"kept")
    remove_checkpoints(run_dir)
    assert not list(run_dir.rglob(CHECKPOINT_NAME))
    assert (run_dir / "model.safetensors").read_bytes() == b"kept"


def test_checkpoint_loading_never_unpickles_code(run_dir: Path) -> None:
    path = run_dir / "evil.pt"
    torch.save({"epoch": 1, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    garbage = run_dir / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt") as raised:
        load_checkpoint(garbage)
    assert "\n" not in str(raised.value)  # One line, not torch's explanation of weights_only.
    assert "weights_only" not in str(raised.value)  # Nor its advice to load unsafely.
    assert "delete it to start afresh" in str(raised.value)
    empty = run_dir / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: empty checkpoint file"):
        load_checkpoint(empty)


def test_early_stopping_stops(tiny_image_set) -> None:
    train_loader, val_loader = _loaders(tiny_image_set)
    # A learning rate this small cannot change a single prediction, so accuracy never improves.
    config = dataclasses.replace(
        BASE, epochs=10, learning_rate=1e-12, weight_decay=0.0, early_stopping_patience=2
    )
    result = Trainer(_model(), config, CPU, progress=False).fit(train_loader, val_loader)
    assert result.stopped_early
    assert result.epochs_run == 3
    assert result.best_epoch == 1


def test_without_validation_every_epoch_runs_whatever_the_patience(tiny_image_set) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(
        BASE, epochs=5, learning_rate=1e-12, weight_decay=0.0, early_stopping_patience=1
    )
    result = Trainer(_model(), config, CPU, progress=False).fit(train_loader)
    assert not result.stopped_early
    assert result.epochs_run == 5
    # The last epoch's weights are kept, and best_epoch says so (training accuracy, which
    # never improves at this rate, does not choose it).
    assert result.best_epoch == 5


def test_without_validation_a_resume_with_nothing_left_keeps_the_last_epoch(
    tiny_image_set, tmp_path: Path
) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=3)
    Trainer(_model(), config, CPU, tmp_path, progress=False).fit(train_loader)
    # An older checkpoint recorded the epoch of the best training accuracy.
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {**load_checkpoint(path), "best_epoch": 1})
    recorder = Recorder()
    again = Trainer(_model(), config, CPU, tmp_path, [recorder], progress=False)
    result = again.fit(train_loader, resume=True)
    assert recorder.events == ["start@3", "end", "teardown"]  # Resumed, with no epoch to train.
    assert result.best_epoch == result.epochs_run == 3


def test_resuming_a_run_that_stopped_early_trains_no_further(
    tiny_image_set, tmp_path, caplog
) -> None:
    train_loader, val_loader = _loaders(tiny_image_set)
    config = dataclasses.replace(
        BASE, epochs=10, learning_rate=1e-12, weight_decay=0.0, early_stopping_patience=2
    )
    first = Trainer(_model(), config, CPU, tmp_path, progress=False)
    assert first.fit(train_loader, val_loader).epochs_run == 3
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    recorder = Recorder()
    # More epochs with the same patience: the run says (at WARNING, which the CLI shows) why
    # it trains nothing, and how to go on.
    more = dataclasses.replace(config, epochs=12)
    again = Trainer(_model(seed=7), more, CPU, tmp_path, [recorder], progress=False)
    with caplog.at_level("WARNING", logger="cnnkit.training.fit_loop"):
        result = again.fit(train_loader, val_loader, resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "the run stopped early after epoch 3" in warnings[0]
    assert "resume with --patience above 2" in warnings[0]
    assert result.stopped_early and result.epochs_run == 3
    assert not [event for event in recorder.events if event.startswith("epoch")]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == saved["epoch"] == 3
    # The kept weights are the best epoch's, as when the first run ended.
    assert _equal_states(again.module.state_dict(), first.module.state_dict())
    # More patience on resume continues the run.
    patient = dataclasses.replace(config, early_stopping_patience=3)
    resumed = Trainer(_model(seed=7), patient, CPU, tmp_path, progress=False)
    assert resumed.fit(train_loader, val_loader, resume=True).epochs_run == 4


def test_best_validation_weights_are_restored(tiny_image_set) -> None:
    train_loader, val_loader = _loaders(tiny_image_set)

    class Snapshots(Callback):
        def __init__(self) -> None:
            self.states: dict[int, dict] = {}

        def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            self.states[trainer.epoch] = {
                k: v.clone() for k, v in trainer.module.state_dict().items()
            }

    snapshots = Snapshots()
    config = dataclasses.replace(BASE, epochs=3)
    trainer = Trainer(_model(), config, CPU, callbacks=[snapshots], progress=False)
    result = trainer.fit(train_loader, val_loader)
    assert _equal_states(trainer.module.state_dict(), snapshots.states[result.best_epoch])


def test_a_model_without_trainable_parameters_is_rejected(tiny_image_set) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    model = _model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, BASE, CPU, progress=False).fit(train_loader)


def test_mixing_trains_reproducibly_and_changes_the_run(tiny_image_set) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    mixed = dataclasses.replace(BASE, epochs=3, mixup_alpha=0.4, cutmix_alpha=1.0)
    first = Trainer(_model(), mixed, CPU, progress=False)
    first.fit(train_loader)
    again = Trainer(_model(), mixed, CPU, progress=False)
    again.fit(train_loader)
    plain = Trainer(_model(), dataclasses.replace(BASE, epochs=3), CPU, progress=False)
    plain.fit(train_loader)
    assert _equal_states(first.module.state_dict(), again.module.state_dict())
    assert not _equal_states(first.module.state_dict(), plain.module.state_dict())
    # Blended accuracy is fractional: a mixed batch counts either label by its share.
    accuracies = [row["train_accuracy"] for row in first.history]
    assert any(abs(a * 16 - round(a * 16)) > 1e-6 for a in accuracies)


EMA = dataclasses.replace(BASE, epochs=4, ema_decay=0.9)


def _trained(config: TrainConfig, loader: BatchLoader, run_dir: Path | None = None) -> Trainer:
    trainer = Trainer(_model(), config, CPU, run_dir, progress=False)
    trainer.fit(loader)
    return trainer


def test_the_trained_model_is_the_average_and_training_itself_is_unchanged(
    tiny_image_set, tmp_path: Path
) -> None:
    train_loader, _ = _loaders(tiny_image_set, augment=True)
    plain = _trained(BASE, train_loader)
    averaged = _trained(EMA, train_loader, tmp_path / "ema")
    # The optimizer's trajectory (saved in the checkpoint) is the plain run's: averaging draws
    # no random numbers and never feeds back into training.
    raw = load_checkpoint(tmp_path / "ema" / CHECKPOINT_NAME)
    assert _equal_states(raw["model"], plain.module.state_dict())
    assert raw["average"]["n_averaged"].item() == 4 * len(train_loader)
    # The model that comes out is the average, which differs from the last weights, and it is
    # what the trainer evaluates from then on.
    average = {k.removeprefix("module."): v for k, v in raw["average"].items() if k != "n_averaged"}
    assert _equal_states(averaged.module.state_dict(), average)
    assert not _equal_states(averaged.module.state_dict(), plain.module.state_dict())
    assert averaged.eval_module is averaged.module


def test_an_interrupted_averaged_run_resumes_to_the_same_average(
    tiny_image_set, tmp_path: Path
) -> None:
    train_loader, _ = _loaders(tiny_image_set, augment=True)
    straight = _trained(EMA, train_loader)
    run = tmp_path / "interrupted"
    first = Trainer(_model(), EMA, CPU, run, callbacks=[StopAfter(2)], progress=False)
    with pytest.raises(TrainingInterrupted):
        first.fit(train_loader)
    second = Trainer(_model(seed=7), EMA, CPU, run, progress=False)
    second.fit(train_loader, resume=True)
    assert _equal_states(second.module.state_dict(), straight.module.state_dict())


def test_validation_scores_and_keeps_the_averaged_weights(tiny_image_set) -> None:
    train_loader, val_loader = _loaders(tiny_image_set)

    class Snapshots(Callback):
        def __init__(self) -> None:
            self.averaged: dict[int, dict] = {}
            self.raw: dict[int, dict] = {}
            self.losses: dict[int, float] = {}

        def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            for store, module in ((self.averaged, trainer.eval_module), (self.raw, trainer.module)):
                store[trainer.epoch] = {k: v.clone() for k, v in module.state_dict().items()}
            self.losses[trainer.epoch] = metrics["val_loss"]

    snapshots = Snapshots()
    trainer = Trainer(_model(), EMA, CPU, callbacks=[snapshots], progress=False)
    result = trainer.fit(train_loader, val_loader)
    best = result.best_epoch
    assert not _equal_states(snapshots.averaged[best], snapshots.raw[best])
    assert _equal_states(trainer.module.state_dict(), snapshots.averaged[best])
    # The recorded validation loss is the averaged network's, and so is a later evaluation.
    assert trainer.evaluate(val_loader)["loss"] == pytest.approx(snapshots.losses[best], rel=1e-5)


def test_resuming_with_an_average_the_checkpoint_lacks_keeps_the_trained_weights(
    tiny_image_set, tmp_path: Path, caplog
) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    plain = _trained(BASE, train_loader, tmp_path)
    with caplog.at_level("WARNING", logger="cnnkit.training.resume"):
        resumed = Trainer(_model(seed=3), EMA, CPU, tmp_path, progress=False)
        resumed.fit(train_loader, resume=True)  # Nothing left to train: no step is averaged.
    assert "has no moving average" in caplog.text
    assert _equal_states(resumed.module.state_dict(), plain.module.state_dict())


def test_a_decay_too_high_for_the_run_is_reported(tiny_image_set, caplog) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=2, ema_decay=0.999)
    with caplog.at_level("WARNING", logger="cnnkit.training.optimization"):
        Trainer(_model(), config, CPU, progress=False).fit(train_loader)
    assert "ema_decay 0.999 is high for 4 steps" in caplog.text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_show_on_a_terminal_only(tiny_image_set, monkeypatch, terminal) -> None:
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    train_loader, _ = _loaders(tiny_image_set)
    Trainer(_model(), dataclasses.replace(BASE, epochs=2), CPU, progress=True).fit(train_loader)
    text = stream.getvalue()
    assert ("batch" in text) is terminal  # The bar's unit.
    # Off a terminal (a log file, a pipe) each epoch is one plain line, printed as it ends.
    lines = re.findall(
        r"^epoch (\d)/2: train_loss \d\.\d{4}  train_accuracy .* img/s  \d+ s$", text, re.M
    )
    assert lines == ([] if terminal else ["1", "2"])
    assert ("\r" in text) is terminal


def test_resuming_a_run_on_other_classes_is_refused(tiny_image_set, run_dir: Path) -> None:
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=1)
    first = {"class_names": ["a", "b", "c", "d"]}
    Trainer(_model(), config, CPU, run_dir, progress=False, identity=first).fit(train_loader)
    longer = dataclasses.replace(config, epochs=2)
    other = {"class_names": ["w", "x", "y", "z"]}
    with pytest.raises(
        CheckpointError, match="other class_names \\(the checkpoint's: a, b, c, d; this run's: w, x"
    ):
        Trainer(_model(), longer, CPU, run_dir, progress=False, identity=other).fit(
            train_loader, resume=True
        )
    same = Trainer(_model(), longer, CPU, run_dir, progress=False, identity=first)
    assert same.fit(train_loader, resume=True).epochs_run == 2


class _OverflowOnce(nn.Module):
    """Returns infinite logits on its first call, as float16 can overflow on one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = self.net(x)
        return logits * float("inf") if self.calls == 1 else logits


@pytest.mark.parametrize("scaled", [True, False])
def test_one_overflowing_step_under_a_grad_scaler_is_not_divergence(tiny_image_set, scaled):
    train_loader, _ = _loaders(tiny_image_set)
    torch.manual_seed(0)
    config = dataclasses.replace(BASE, epochs=1, memory_check=False)  # No probing forward pass.
    trainer = Trainer(_OverflowOnce(), config, CPU, progress=False)
    if scaled:  # The CUDA float16 path, with the CPU scaler: it skips the overflowing step.
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        assert trainer.fit(train_loader).epochs_run == 1
        assert all(p.isfinite().all() for p in trainer.module.parameters())
    else:
        with pytest.raises(TrainingDiverged, match="training diverged in epoch 1"):
            trainer.fit(train_loader)


def test_the_learning_rate_column_is_the_rate_of_each_epochs_first_step(tiny_image_set) -> None:
    train_loader, _ = _loaders(tiny_image_set)  # Two steps an epoch.
    config = dataclasses.replace(BASE, epochs=2, schedule="cosine", warmup_fraction=0.0)
    result = Trainer(_model(), config, CPU, progress=False).fit(train_loader)
    # Four steps of a cosine from 1e-2: the first epoch starts at the peak, the second halfway
    # (the rate after an epoch's last step, 5e-3 and 0, was used by no step of it).
    assert [row["learning_rate"] for row in result.history] == pytest.approx([1e-2, 5e-3])


def test_resume_with_other_optimization_settings_is_refused(tiny_image_set, tmp_path) -> None:
    """The optimizer's and scheduler's saved state holds the learning rate, weight decay,
    optimizer and schedule of the checkpoint's run, and loading it would keep them: a resume
    asking for others is refused in one line that names them, before any step."""
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=1)
    Trainer(_model(), config, CPU, tmp_path, progress=False).fit(train_loader)
    longer = dataclasses.replace(config, epochs=2)

    def resume(**changes) -> Trainer:
        trainer = Trainer(_model(), dataclasses.replace(longer, **changes), CPU, tmp_path)
        trainer.progress = False
        trainer.fit(train_loader, resume=True)
        return trainer

    with pytest.raises(CheckpointError) as refused:
        resume(learning_rate=1e-4, weight_decay=0.1)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / CHECKPOINT_NAME}: its run trained with ")
    assert "trained with learning_rate 0.01, weight_decay 0.0001, which its optimizer" in message
    assert "this run asks for learning_rate 0.0001, weight_decay 0.1;" in message
    assert "start a fresh run" in message and "\n" not in message
    for optimizer in ("sgd", "adam"):  # SGD used to fail mid-epoch; Adam silently stayed AdamW.
        with pytest.raises(CheckpointError, match=f"asks for optimizer {optimizer};"):
            resume(optimizer=optimizer)
    with pytest.raises(CheckpointError, match="trained with schedule onecycle, which"):
        resume(schedule="cosine")
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1
    # More epochs with the same settings go on: the schedule's length is this run's.
    assert [row["epoch"] for row in resume().history] == [1, 2]


def test_resume_may_switch_between_the_cosine_and_constant_schedules(tiny_image_set, tmp_path):
    """Both rebuild their factor from the resumed run's config, so the switch is honoured."""
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=1, schedule="cosine", warmup_fraction=0.0)
    Trainer(_model(), config, CPU, tmp_path, progress=False).fit(train_loader)
    constant, recorder = dataclasses.replace(config, epochs=2, schedule="constant"), Recorder()
    resumed = Trainer(_model(), constant, CPU, tmp_path, [recorder], progress=False)
    assert resumed.fit(train_loader, resume=True).epochs_run == 2
    assert recorder.events == ["start@1", "epoch2", "end", "teardown"]
    # The cosine ended at 0; the constant schedule's steps are back at the peak.
    assert resumed.optimizer.param_groups[-1]["lr"] == pytest.approx(1e-2)


def test_a_checkpoint_without_recorded_settings_resumes_or_names_its_optimizer(
    tiny_image_set, tmp_path: Path
) -> None:
    """A checkpoint from before the settings were recorded still resumes; another optimizer or
    a schedule of another kind is refused in one line (SGD used to raise KeyError mid-epoch)."""
    train_loader, _ = _loaders(tiny_image_set)
    config = dataclasses.replace(BASE, epochs=1)
    Trainer(_model(), config, CPU, tmp_path, progress=False).fit(train_loader)
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    del state["optimization"]
    save_checkpoint(path, state)
    longer = dataclasses.replace(config, epochs=2)
    for changes in ({"optimizer": "sgd"}, {"schedule": "cosine"}):
        trainer = Trainer(_model(), dataclasses.replace(longer, **changes), CPU, tmp_path)
        with pytest.raises(CheckpointError, match="comes from another --optimizer or --schedule"):
            trainer.fit(train_loader, resume=True)
    recorder = Recorder()
    resumed = Trainer(_model(), longer, CPU, tmp_path, [recorder], progress=False)
    assert resumed.fit(train_loader, resume=True).epochs_run == 2
    assert recorder.events == ["start@1", "epoch2", "end", "teardown"]


class _NormModel(nn.Module):
    """A tiny classifier with batch norm, whose running statistics each process updates."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _BufferProbe(Callback):
    """Gathers every process's buffers (the model's and the average's) after each epoch."""

    def __init__(self) -> None:
        self.same: list[bool] = []

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        for module in (trainer.module, trainer.eval_module):
            flat = torch.cat([buffer.double().flatten() for buffer in module.buffers()])
            gathered = [torch.zeros_like(flat) for _ in range(trainer.distributed.world_size)]
            torch.distributed.all_gather(gathered, flat)
            self.same.append(all(torch.equal(gathered[0], other) for other in gathered))


def _buffers_worker(rank: int, rendezvous: str, out: str) -> None:
    """One of two gloo processes training _NormModel with a moving average and validation."""
    from tests.conftest import make_image_set

    from cnnkit.runtime import DistributedContext

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2
    )
    try:
        train = make_image_set(num_classes=4, per_class=8, size=8, seed=1)
        val = make_image_set(num_classes=4, per_class=2, size=8, seed=2)
        shard = {"rank": rank, "world_size": 2}
        transform = build_train_transform(PREPROCESSING, AugmentConfig(enabled=False))
        train_loader = BatchLoader(train, 8, transform, shuffle=True, seed=3, **shard)
        val_loader = BatchLoader(val, 8, build_eval_transform(PREPROCESSING), **shard)
        torch.manual_seed(0)
        probe = _BufferProbe()
        context = DistributedContext(rank, rank, 2)
        config = dataclasses.replace(EMA, epochs=2, memory_check=False)
        trainer = Trainer(_NormModel(), config, CPU, None, [probe], context, progress=False)
        trainer.fit(train_loader, val_loader)
        torch.save(probe.same, f"{out}/rank-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_every_process_scores_rank_0s_batch_norm_statistics(tmp_path: Path) -> None:
    """Each process updates its running statistics from its own shard: validation (and the
    saved average) must use rank 0's, the network that is saved."""
    import torch.multiprocessing as multiprocessing

    rendezvous = tmp_path / "rendezvous"
    context = multiprocessing.spawn(
        _buffers_worker, args=(str(rendezvous), str(tmp_path)), nprocs=2, join=False
    )
    for _ in range(120):  # Two minutes at most: a hung collective must not hang the suite.
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the two gloo processes did not finish")
    for rank in (0, 1):
        # Two epochs, each checking the model's buffers and the moving average's.
        assert torch.load(tmp_path / f"rank-{rank}.pt") == [True] * 4


def test_a_named_prediction_pass_shows_a_bar_counting_images(tiny_image_set, monkeypatch) -> None:
    """A run's final test of large photos takes minutes: the bar counts images, not batches."""
    import cnnkit.training.trainer as trainer_module

    bars: list[dict] = []

    class Bar:
        def __init__(self, **kwargs) -> None:
            self.n, self.desc, self.total = 0, kwargs.get("desc"), kwargs.get("total")
            bars.append(self)

        def update(self, count: int) -> None:
            self.n += count

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    def recording_tqdm(*args, **kwargs):
        return Bar(**kwargs)

    monkeypatch.setattr(trainer_module, "tqdm", recording_tqdm)
    _, val_loader = _loaders(tiny_image_set)
    trainer = Trainer(_model(), BASE, CPU, progress=True)
    quiet_logits, labels = trainer.predict(val_loader)
    logits, same_labels = trainer.predict(val_loader, desc="testing")
    torch.testing.assert_close(logits, quiet_logits)
    assert torch.equal(labels, same_labels)
    named = [bar for bar in bars if bar.desc == "testing"]
    assert len(named) == 1 and named[0].total == val_loader.num_samples == len(labels)
    assert named[0].n == len(labels)
