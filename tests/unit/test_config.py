"""Tests for cnnkit.config: frozen dataclasses, validation, presets, precedence and YAML."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    Preprocessing,
    RunConfig,
    TrainConfig,
    TransferConfig,
    build_run_config,
    config_to_dict,
    dump_config,
    load_config_file,
    merge_overrides,
)
from cnnkit.models.registry import model_options
from cnnkit.presets import PRESETS, preset_for


def test_defaults_build_and_are_frozen() -> None:
    config = RunConfig()
    assert config.data.dataset == "digits"
    assert config.model.name == "symbol_cnn"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data = DataConfig()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("section", "field_name", "value"),
    [
        (TrainConfig, "epochs", 0),
        (TrainConfig, "batch_size", -1),
        (TrainConfig, "learning_rate", 0.0),
        (TrainConfig, "weight_decay", -0.1),
        (TrainConfig, "optimizer", "rmsprop"),
        (TrainConfig, "schedule", "step"),
        (TrainConfig, "device", "tpu"),
        (TrainConfig, "label_smoothing", 1.0),
        (TrainConfig, "warmup_fraction", 1.5),
        (TrainConfig, "early_stopping_patience", 0),
        (DataConfig, "dataset", "imagenet"),
        (DataConfig, "on_bad_image", "ignore"),
        (DataConfig, "channels", 2),
        (DataConfig, "image_size", 0),
        (DataConfig, "fold", 11),
        (DataConfig, "val_fraction", 1.0),
        (DataConfig, "test_fraction", -0.1),
        (DataConfig, "max_classes", 0),
        (DataConfig, "max_per_class", 0),
        (AugmentConfig, "max_rotation", -1.0),
        (AugmentConfig, "max_shift", -0.1),
        (AugmentConfig, "scale_min", 0.0),
        (AugmentConfig, "crop_scale_min", 1.5),
        (AugmentConfig, "color_jitter", 1.0),  # A brightness factor of 0: a black image.
        (TransferConfig, "phases", ("warmup",)),
        (TransferConfig, "augmented_views", -1),
        (Preprocessing, "mode", "video"),
        (Preprocessing, "channels", 4),
        (Preprocessing, "image_size", 0),
    ],
)
def test_invalid_value_raises_value_error_naming_the_field(section, field_name, value) -> None:
    with pytest.raises(ValueError, match=field_name):
        section(**{field_name: value})


@pytest.mark.parametrize(
    ("field_name", "value"), [("max_steps_per_epoch", 0), ("eval_batch_size", 0)]
)
def test_train_config_rejects_non_positive_counts(field_name: str, value: int) -> None:
    # A zero cap silently trains nothing; a zero evaluation batch divides by zero in the loader.
    with pytest.raises(ValueError, match=field_name):
        TrainConfig(**{field_name: value})


def test_preprocessing_cross_field_checks() -> None:
    with pytest.raises(ValueError, match="stored_size"):
        Preprocessing(image_size=32, stored_size=28)
    with pytest.raises(ValueError, match="mean and std"):
        Preprocessing(channels=3, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="std"):
        Preprocessing(std=(0.0,))
    assert Preprocessing(mean=[0.5], std=[0.25]).mean == (0.5,)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_size": 24.5}, "image_size must be a whole number of pixels from 1 to 4096"),
        ({"stored_size": 1_000_000}, "stored_size must be a whole number of pixels"),
        ({"image_size": True}, "image_size must be a whole number"),
        ({"channels": True}, "channels must be 1 or 3; got True"),
        ({"channels": 1.0}, "channels must be 1 or 3; got 1.0"),
        ({"mean": (float("nan"),)}, "mean and std values must be finite"),
        ({"std": (float("inf"),)}, "mean and std values must be finite"),
    ],
)
def test_preprocessing_refuses_sizes_and_statistics_no_image_can_have(fields, message) -> None:
    # A model file's preprocessing decides how much memory an image takes and what the model
    # sees: a fraction, a huge size or a NaN mean there failed later, or printed NaN.
    with pytest.raises(ValueError, match=re.escape(message)):
        Preprocessing(**{"image_size": 32, "stored_size": 32, **fields})
    with pytest.raises(ValueError, match="at most 4096 pixels"):
        DataConfig(image_size=5000)


def test_data_requires_a_path_for_file_datasets() -> None:
    with pytest.raises(ValueError, match="--data"):
        DataConfig(dataset="hasy")
    assert DataConfig(dataset="folder", data="images").data == "images"


def test_empty_transfer_phases_rejected() -> None:
    with pytest.raises(ValueError, match="phases"):
        TransferConfig(phases=())
    assert TransferConfig(phases=["frozen"]).phases == ("frozen",)


def test_precedence_defaults_preset_file_flags() -> None:
    preset = preset_for("hasy")
    file_layer = {"train": {"epochs": 5, "batch_size": 16}, "augment": {"max_rotation": 3.0}}
    flags = {"train": {"epochs": 2, "learning_rate": None}, "data": {"seed": 7}}
    config = build_run_config(preset, file_layer, flags)
    assert config.train.epochs == 2  # flag beats file and preset
    assert config.train.batch_size == 16  # file beats preset
    assert config.train.learning_rate == PRESETS["hasy"]["train"]["learning_rate"]  # preset
    assert config.train.schedule == TrainConfig().schedule  # default
    assert config.augment.max_rotation == 3.0
    assert config.data.seed == 7


def test_none_values_never_override() -> None:
    merged = merge_overrides({"train": {"epochs": 4}}, {"train": {"epochs": None}, "out": None})
    assert merged == {"train": {"epochs": 4}}


def test_a_config_files_null_turns_an_optional_setting_off() -> None:
    preset = {**preset_for("cub"), "data": {**preset_for("cub")["data"], "stored_size": 320}}
    assert build_run_config(preset).train.early_stopping_patience == 3
    file_layer = {
        "train": {"early_stopping_patience": None},
        "data": {"dataset": "cub", "data": "cub.tgz", "stored_size": None},
        "augment": None,  # An empty section, as YAML reads "augment:" alone.
        "model": {"options": None},
    }
    config = build_run_config(preset, file_layer, apply_nulls=True)
    assert config.train.early_stopping_patience is None and config.data.stored_size is None
    assert config.model.options == preset["model"]["options"]
    # Without apply_nulls (a flags layer) None means unset, as before.
    unset = build_run_config(preset, file_layer)
    assert unset.train.early_stopping_patience == 3 and unset.data.stored_size == 320


def test_a_null_for_a_setting_that_cannot_be_off_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"^train\.epochs cannot be null"):
        build_run_config({"train": {"epochs": None}}, apply_nulls=True)


def test_none_values_are_dropped_in_sections_the_base_lacks() -> None:
    # The CLI passes every unset flag as None; the digits preset has no data/augment sections.
    assert merge_overrides({}, {"train": {"epochs": None, "seed": 3}}) == {"train": {"seed": 3}}
    flags = {
        "data": {"dataset": "digits", "on_bad_image": None, "fold": None},
        "augment": {"enabled": None, "max_rotation": None},
        "transfer": {"phases": None},
    }
    assert build_run_config(preset_for("digits"), flags) == build_run_config(preset_for("digits"))


def test_model_options_merge_across_layers() -> None:
    config = build_run_config(
        preset_for("digits"),
        {"model": {"options": {"dropout": 0.3}}},
        {"model": {"options": {"layers_per_stage": 1}}},
    )
    assert config.model.options == {"width": 32, "dropout": 0.3, "layers_per_stage": 1}


def test_unknown_section_and_field_are_named() -> None:
    with pytest.raises(ValueError, match="optimiser"):
        build_run_config({"optimiser": {"lr": 1}})
    with pytest.raises(ValueError, match="epoch_count"):
        build_run_config({"train": {"epoch_count": 3}})
    with pytest.raises(ValueError, match="batch_size"):
        build_run_config(preset_for("hasy"), {"train": {"batch_size": 0}})


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"train": 5}, "config section train must be a mapping of fields; got 5"),
        ({"train": {"bf16_cpu": "maybe"}}, "train.bf16_cpu must be true or false; got 'maybe'"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be a whole number; got 2.5"),
        ({"data": {"fold": "one"}}, "data.fold must be a whole number; got 'one'"),
        ({"transfer": {"phases": "frozen"}}, "transfer.phases must be a list of names"),
        ({"model": {"name": "symbol_cnn", "options": [1]}}, "model.options must be a mapping"),
    ],
)
def test_values_of_the_wrong_kind_are_named(layer: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_run_config(layer)


def test_number_like_text_is_a_number_for_float_fields() -> None:
    # PyYAML reads 1e-3 (no dot) as text; a learning rate written that way still works.
    config = build_run_config({"train": {"learning_rate": "1e-3", "ema_decay": "0"}})
    assert config.train.learning_rate == 0.001 and config.train.ema_decay == 0.0


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="imagenet"):
        preset_for("imagenet")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_names_a_model_that_accepts_its_options(name: str) -> None:
    config = build_run_config(
        preset_for(name), {"data": {"dataset": "folder", "data": "somewhere"}}
    )
    accepted = model_options(config.model.name)
    assert set(config.model.options) <= set(accepted)


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = build_run_config(
        preset_for("cub"), {"data": {"dataset": "cub", "data": "cub.tgz"}, "out": "runs/x"}
    )
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    assert build_run_config(load_config_file(path)) == config
    assert config_to_dict(config)["transfer"]["phases"] == ["frozen", "finetune"]


def test_load_config_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ValueError, match="missing.yaml"):
        load_config_file(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: [1, 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_config_file(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping"):
        load_config_file(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_config_file(empty) == {}


def test_run_dir_defaults_to_dataset_and_model() -> None:
    assert RunConfig().run_dir() == Path("runs") / "digits-symbol_cnn"
    assert RunConfig(out="elsewhere").run_dir() == Path("elsewhere")
    assert ModelConfig().options == {}


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63])
def test_seeds_out_of_range_are_named(seed: int) -> None:
    with pytest.raises(ValueError, match="seed must be between 0 and 4294967295"):
        build_run_config({"train": {"seed": seed}})
    with pytest.raises(ValueError, match="seed must be between"):
        build_run_config({"data": {"seed": seed}})


def test_the_largest_seed_drives_every_random_stream(tiny_image_set) -> None:
    """Every seed the config accepts runs each random stream derived from it (the shuffle,
    per-rank augmentation, per-epoch dropout and Mixup, augmented feature views), and each
    repeats for the same seed: a derivation that left torch's seed range would raise here."""
    from torch import nn

    from cnnkit.config import MAX_SEED
    from cnnkit.data.loader import BatchLoader, build_train_transform
    from cnnkit.training.features import (
        FeatureCache,
        FeatureSource,
        FeatureView,
        load_or_compute_features,
    )
    from cnnkit.training.trainer import Trainer

    cpu = torch.device("cpu")
    images = tiny_image_set(num_classes=4, per_class=4, size=8, seed=1)
    preprocessing = Preprocessing("symbol", 1, 8, 8)
    augment = AugmentConfig(enabled=True, max_rotation=30, max_shift=0.2)
    transform = build_train_transform(preprocessing, augment)

    def loader(seed: int, rank: int = 0, world_size: int = 1) -> BatchLoader:
        return BatchLoader(
            images, 4, transform, shuffle=True, seed=seed, rank=rank, world_size=world_size
        )

    def epoch(seed: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        batches = loader(seed, rank, world_size)
        batches.set_epoch(5)
        inputs, labels = zip(*batches, strict=True)
        return torch.cat(inputs), torch.cat(labels)

    # The shuffle and the augmentation of one process, and of rank 63 of 64.
    for rank, world_size in ((0, 1), (63, 64)):
        inputs, labels = epoch(MAX_SEED, rank, world_size)
        assert inputs.shape == (len(labels), 1, 8, 8) and torch.isfinite(inputs).all()
        again = epoch(MAX_SEED, rank, world_size)
        assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
    inputs, labels = epoch(MAX_SEED)
    assert sorted(labels.tolist()) == sorted(images.labels.tolist())
    assert not torch.equal(inputs, epoch(MAX_SEED - 1)[0])  # The seed decides them.

    # Training: dropout and Mixup draw from a per-epoch stream seeded from train.seed.
    def fit(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 4))
        config = TrainConfig(
            epochs=2, batch_size=4, channels_last=False, mixup_alpha=0.4, seed=seed
        )
        Trainer(model, config, cpu, progress=False).fit(loader(seed))
        return [weight.detach().clone() for weight in model.parameters()]

    trained = fit(MAX_SEED)
    assert all(torch.isfinite(weight).all() for weight in trained)
    assert all(map(torch.equal, trained, fit(MAX_SEED)))
    assert not all(map(torch.equal, trained, fit(MAX_SEED - 1)))

    # An augmented view of the images for a frozen backbone's features.
    class Flatten(nn.Module):
        def forward_features(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs.flatten(1)

    source = FeatureSource("flatten", "none", preprocessing)

    def features(seed: int) -> np.ndarray:
        view = FeatureView(index=2, seed=seed, augment=augment)
        return load_or_compute_features(
            Flatten(), images.images, source, view, FeatureCache(None), cpu
        )[0]

    viewed = features(MAX_SEED)
    assert viewed.shape == (16, 64) and np.isfinite(viewed).all()
    assert np.array_equal(viewed, features(MAX_SEED))
    assert not np.array_equal(viewed, features(MAX_SEED - 1))


def test_a_config_file_section_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: efficientnet_lite0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.yaml: section 'model' must be a mapping of fields"):
        load_config_file(path)


@pytest.mark.parametrize("value", ["5", "[1, 2]", "{a: 1}"])
def test_a_config_file_out_that_is_not_text_is_named(tmp_path: Path, value: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"out: {value}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.yaml: out must be text \(a folder path\); got "):
        load_config_file(path)
    path.write_text("out: runs/mine\n", encoding="utf-8")
    assert load_config_file(path) == {"out": "runs/mine"}


def test_a_key_given_twice_in_a_config_file_is_named_with_its_line(tmp_path: Path) -> None:
    """The later one would otherwise win in silence."""
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 8\n  epochs: 4\n", encoding="utf-8")
    message = r"twice.yaml: invalid YAML \(line 4, column 3: 'epochs' is given twice\)"
    with pytest.raises(ValueError, match=message):
        load_config_file(path)
    # The same key in two different mappings is no repeat.
    path.write_text("train: {epochs: 3}\nmodel: {options: {epochs: 1}}\n", encoding="utf-8")
    assert load_config_file(path)["train"] == {"epochs": 3}


def test_yaml_merge_keys_are_read_and_are_no_repeats(tmp_path: Path) -> None:
    """``<<: *defaults`` brings in keys that the mapping may then set again: no repeat."""
    path = tmp_path / "merge.yaml"
    path.write_text(
        "defaults: &defaults {epochs: 1, batch_size: 8}\ntrain:\n  <<: *defaults\n  epochs: 3\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="unknown section 'defaults'"):
        load_config_file(path)
    path.write_text("train:\n  <<: {epochs: 1, batch_size: 8}\n  epochs: 3\n", encoding="utf-8")
    assert load_config_file(path) == {"train": {"epochs": 3, "batch_size": 8}}
    # A key that the mapping itself gives twice is still refused, next to a merge.
    path.write_text("train:\n  <<: {epochs: 1}\n  lr: 1\n  lr: 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 4, column 3: 'lr' is given twice"):
        load_config_file(path)
