"""Frozen configuration dataclasses, building them from layered overrides, and YAML load/dump.

Precedence when resolving a run: dataclass defaults < named preset (:mod:`cnnkit.presets`) <
``--config`` file < flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

from cnnkit.errors import error_line

DATASETS = ("hasy", "cub", "folder", "csv", "digits")
BAD_IMAGE_POLICIES = ("error", "skip")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


# The largest image side a model takes or a stored image keeps: ample for any CNN here, and it
# keeps a tampered model file from asking for gigabytes per image.
MAX_IMAGE_SIDE = 4096


def _check_side(name: str, value: Any) -> None:
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or not 1 <= value <= MAX_IMAGE_SIDE:
        raise ValueError(
            f"{name} must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE}; got {value!r}"
        )


MAX_SEED = 2**32 - 1  # NumPy's range; the per-epoch seeds derived from it stay within torch's.


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}; got {seed}")


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes model input; stored in every model file.

    ``mode="symbol"`` composites onto white, converts to ``channels`` and resizes to
    ``stored_size`` squared. ``mode="photo"`` applies EXIF rotation, resizes the shorter side to
    ``stored_size`` and centre-crops a square. The model then sees a centre ``image_size`` crop,
    scaled to [0, 1] and normalised with ``mean`` and ``std``.
    """

    mode: str = "symbol"
    channels: int = 1
    image_size: int = 32
    stored_size: int = 32
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        _check_choice("preprocessing.mode", self.mode, ("symbol", "photo"))
        if isinstance(self.channels, bool) or not isinstance(self.channels, int):
            raise ValueError(f"preprocessing.channels must be 1 or 3; got {self.channels!r}")
        _check_choice("preprocessing.channels", self.channels, (1, 3))
        _check_side("preprocessing.image_size", self.image_size)
        _check_side("preprocessing.stored_size", self.stored_size)
        if self.stored_size < self.image_size:
            raise ValueError(
                f"preprocessing.stored_size ({self.stored_size}) must be >= image_size "
                f"({self.image_size})"
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("preprocessing.mean and std need one value per channel")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("preprocessing.mean and std values must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise ValueError("preprocessing.std values must be > 0")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split."""

    dataset: str = "digits"
    data: str | None = None
    fold: int | None = None
    channels: int = 1
    image_size: int = 32
    stored_size: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    on_bad_image: str = "error"
    cache_dir: str | None = None
    crop_to_bbox: bool = False
    max_classes: int | None = None
    max_per_class: int | None = None
    train_on_all: bool = False

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)
        _check_choice("channels", self.channels, (1, 3))
        _check_seed(self.seed)
        _check_positive("image_size", self.image_size)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels; got {self.image_size}")
        for name in ("image_size", "stored_size"):
            value = getattr(self, name)
            if value is not None and value > MAX_IMAGE_SIDE:
                raise ValueError(f"{name} must be at most {MAX_IMAGE_SIDE} pixels; got {value}")
        if self.dataset != "digits" and not self.data:
            raise ValueError(f"--data is required for --dataset {self.dataset}")
        if self.dataset == "digits" and self.data:
            raise ValueError(
                f"--dataset digits is built in (scikit-learn's handwritten digits) and reads no "
                f"--data; got {self.data} (for a folder of images use --dataset folder)"
            )
        if self.crop_to_bbox and self.dataset != "cub":
            raise ValueError(
                f"--crop-to-bbox uses CUB-200-2011's bounding boxes; --dataset {self.dataset} "
                "has none"
            )
        if self.fold is not None and not 1 <= self.fold <= 10:
            raise ValueError(f"fold must be between 1 and 10; got {self.fold}")
        if self.fold is not None and self.dataset != "hasy":
            raise ValueError(
                f"--fold selects a HASYv2 fold; --dataset {self.dataset} has no folds "
                "(it splits by --test-fraction and --val-fraction, or its official split)"
            )
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1); got {value}")
        for name in ("max_classes", "max_per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """A registry name plus the options passed to its constructor."""

    name: str = "symbol_cnn"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AugmentConfig:
    """Batched tensor augmentation applied to training batches only."""

    enabled: bool = True
    max_rotation: float = 10.0
    max_shift: float = 0.1
    scale_min: float = 0.9
    scale_max: float = 1.1
    max_shear: float = 0.1
    hflip: bool = False
    random_resized_crop: bool = False
    crop_scale_min: float = 0.35
    color_jitter: float = 0.0
    # Side of the training crops in pixels; None trains at the model's input size. With random
    # resized crops, objects look larger in training than in the centre crop at test time, so
    # training below the test size matches them again and costs less ("FixRes", Touvron et
    # al. 2019).
    train_size: int | None = None

    def __post_init__(self) -> None:
        if self.train_size is not None and self.train_size < 8:
            raise ValueError(f"train_size must be >= 8 pixels or None; got {self.train_size!r}")
        _check_positive("max_rotation", self.max_rotation, allow_zero=True)
        _check_positive("max_shift", self.max_shift, allow_zero=True)
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError("scale_min must be > 0 and <= scale_max")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError("crop_scale_min must be in (0, 1]")
        if not 0 <= self.color_jitter < 1:
            # Factors are drawn from 1 +- color_jitter: 1 or more can reach zero brightness.
            raise ValueError(f"color_jitter must be in [0, 1); got {self.color_jitter!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for the generic trainer."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_fraction: float = 0.15
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # Mixup and CutMix (training/mixing.py); 0 turns each off.
    cutmix_alpha: float = 0.0
    # A moving average of the weights (training/averaging.py) becomes the trained model; it
    # smooths about the last 1 / (1 - ema_decay) steps. 0 turns it off.
    ema_decay: float = 0.0
    early_stopping_patience: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    fast_path: bool = True
    bf16_cpu: bool = False  # Used only where the CPU has native bf16 (AVX512-BF16 or AMX).
    eval_batch_size: int = 512
    backbone_lr_scale: float = 0.1
    max_steps_per_epoch: int | None = None
    # Most samples per forward pass (per process under torchrun): each batch is split into the
    # fewest even chunks of at most this size, whose gradients add up to the batch's (the same
    # update in less memory). None: the whole batch, or, where the memory check finds it too
    # large, chunks that fit.
    micro_batch_size: int | None = None
    memory_check: bool = True  # Fit (or refuse) a batch that would not fit (training/memory.py).

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        _check_positive("epochs", self.epochs)
        _check_positive("batch_size", self.batch_size)
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_choice("optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        _check_choice("schedule", self.schedule, ("onecycle", "cosine", "constant"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda", "mps"))
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        _check_positive("mixup_alpha", self.mixup_alpha, allow_zero=True)
        _check_positive("cutmix_alpha", self.cutmix_alpha, allow_zero=True)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns it off); got {self.ema_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1); got {self.warmup_fraction}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError("early_stopping_patience must be >= 1")
        for name in ("eval_batch_size", "max_steps_per_epoch", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")


@dataclass(frozen=True)
class TransferConfig:
    """Two-phase transfer learning: frozen-feature head, then full fine-tune.

    The head trains ``head_epochs`` on cached features; the fine-tune runs ``train.epochs``.
    """

    phases: tuple[str, ...] = ("frozen", "finetune")
    augmented_views: int = 2
    head_epochs: int = 30
    head_learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(self.phases))
        for phase in self.phases:
            _check_choice("phases", phase, ("frozen", "finetune"))
        if not self.phases:
            raise ValueError("phases must name at least one of frozen, finetune")
        _check_positive("augmented_views", self.augmented_views, allow_zero=True)


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; written to ``RUN_DIR/config.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    out: str | None = None

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"{self.data.dataset}-{self.model.name}"


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
    "transfer": TransferConfig,
}


# What a flag is called in a config file, where its name differs (``--lr``: learning_rate).
FLAG_FIELDS = {
    "lr": "learning_rate",
    "patience": "early_stopping_patience",
    "mixup": "mixup_alpha",
    "cutmix": "cutmix_alpha",
    "ema": "ema_decay",
    "bf16": "bf16_cpu",
    "micro_batch": "micro_batch_size",
    "rotation": "max_rotation",
}


def did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    """`` (did you mean X?)`` for a misspelt or flag-style ``name`` among ``known``, else ``""``."""
    known = list(known)
    spelt = str(name).replace("-", "_").lstrip("_")
    spelt = FLAG_FIELDS.get(spelt, spelt)
    if spelt in known:
        return f" (did you mean {spelt}?)"
    close = difflib.get_close_matches(spelt, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def merge_overrides(
    base: dict[str, Any], overrides: dict[str, Any], apply_nulls: bool = False
) -> dict[str, Any]:
    """Deep-merge ``overrides`` (sections of fields, and ``out``) into a copy of ``base``.

    ``None`` values are ignored (an unset flag), unless ``apply_nulls``: then a ``None`` field
    or ``out`` is set to ``None`` (a config file's ``null`` turns an optional setting off). A
    ``None`` section or ``options`` is always ignored (YAML reads an empty one as null).
    """
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            section = merged.get(key)
            merged[key] = _merge_fields(
                section if isinstance(section, dict) else {}, value, apply_nulls
            )
        elif value is not None or (apply_nulls and key not in SECTIONS):
            merged[key] = value
    return merged


def _merge_fields(base: dict[str, Any], fields: dict[str, Any], apply_nulls: bool) -> dict:
    """One section of :func:`merge_overrides`: model ``options`` merge key by key."""
    merged = dict(base)
    for key, value in fields.items():
        if key == "options" and isinstance(value, dict):
            merged[key] = {**(merged.get(key) or {}), **value}
        elif value is not None or (apply_nulls and key != "options"):
            merged[key] = value
    return merged


def build_run_config(*layers: dict[str, Any], apply_nulls: bool = False) -> RunConfig:
    """Build a RunConfig from nested dicts applied in order (later layers win).

    A ``None`` value leaves the setting as the earlier layers have it, unless ``apply_nulls``
    (layers read from config files, where ``null`` turns an optional setting off; a flags
    layer must then leave its unset flags out).

    Raises:
        ValueError: for an unknown section or field, or an invalid value.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        name = (layer.get("model") or {}).get("name")
        model = merged.get("model", {})
        if name is not None and name != model.get("name"):
            # Options belong to the model they were written for; a new model starts afresh.
            merged = {**merged, "model": {k: v for k, v in model.items() if k != "options"}}
        merged = merge_overrides(merged, layer, apply_nulls)
    kwargs: dict[str, Any] = {}
    for key, value in merged.items():
        if key == "out":
            kwargs["out"] = value
            continue
        if key not in SECTIONS:
            raise ValueError(
                f"unknown config section {key!r}{did_you_mean(key, [*SECTIONS, 'out'])}; "
                f"expected one of {[*SECTIONS, 'out']}"
            )
        section = SECTIONS[key]
        if not isinstance(value, dict):
            raise ValueError(f"config section {key} must be a mapping of fields; got {value!r}")
        known = {f.name for f in fields(section)}
        unknown = set(value) - known
        if unknown:
            named = ", ".join(f"{name}{did_you_mean(name, known)}" for name in sorted(unknown))
            raise ValueError(f"unknown field(s) in {key}: {named}")
        hints = typing.get_type_hints(section)
        value = {name: _checked(f"{key}.{name}", v, hints[name]) for name, v in value.items()}
        kwargs[key] = section(**value)
    return RunConfig(**kwargs)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def number_from_text(value: Any) -> Any:
    """Number-like text as a float (YAML reads ``1e-3``, with no dot, as text); any other
    value unchanged."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


# The kinds a scalar field accepts (bool is an int to Python, so it is excluded from numbers).
_SCALAR_KINDS = {
    bool: ((bool,), "true or false"),
    int: ((int,), "a whole number"),
    float: ((int, float), "a number"),
    str: ((str,), "text"),
}


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it is of the field's kind, else one line naming the field (``epochs:
    three``, ``bf16_cpu: maybe``) before a dataclass or the trainer trips over it.

    YAML reads ``1e-3`` (no dot) as text, so number-like text becomes a number for float fields.
    """
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, UnionType) else ()
    if options:
        if value is None and type(None) in options:
            return value
        hint = next(option for option in options if option is not type(None))
    if value is None:
        raise ValueError(f"{name} cannot be null (it has no setting for off); leave it out")
    if hint is float:
        value = number_from_text(value)
    origin = typing.get_origin(hint) or hint
    if origin is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
        word = "a list of names"
    elif origin is dict:
        ok, word = isinstance(value, dict), "a mapping"
    elif origin in _SCALAR_KINDS:
        kinds, word = _SCALAR_KINDS[origin]
        ok = isinstance(value, kinds) and (origin is bool or not isinstance(value, bool))
    else:
        return value
    if not ok:
        raise ValueError(f"{name} must be {word}; got {value!r}")
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """Turn a (nested) config dataclass into plain YAML-safe data."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def yaml_error_text(error: yaml.YAMLError) -> str:
    """A YAML parse error on one line: ``invalid YAML (line 2, column 7: <problem>)``."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(error, "problem", None) or error_line(error)
    return f"invalid YAML ({where}{problem})"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into nested overrides.

    Raises:
        ValueError: if the file cannot be read or is not a mapping.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as error:
        raise ValueError(f"{path}: {yaml_error_text(error)}") from error
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read config: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config must be a mapping of sections")
    for section, value in data.items():
        if section != "out" and section not in SECTIONS:
            raise ValueError(
                f"{path}: unknown section {section!r}{did_you_mean(section, [*SECTIONS, 'out'])}"
                f"; expected one of {[*SECTIONS, 'out']}"
            )
        if section != "out" and value is not None and not isinstance(value, dict):
            raise ValueError(
                f"{path}: section {section!r} must be a mapping of fields; got {value!r}"
            )
    return data


def dump_config(config: RunConfig) -> str:
    """Serialise a RunConfig as YAML."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
