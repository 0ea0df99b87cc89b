"""The frozen dataclasses of a training run's config: one per section (data, model, augment,
train, transfer) and the RunConfig that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.choices import DATASETS, DEVICES
from cnnkit.config.checks import MAX_IMAGE_SIDE, check_choice, check_positive, check_seed

BAD_IMAGE_POLICIES = ("error", "skip")


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
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)
        check_choice("channels", self.channels, (1, 3))
        check_seed(self.seed)
        check_positive("image_size", self.image_size)
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
        check_positive("max_rotation", self.max_rotation, allow_zero=True)
        check_positive("max_shift", self.max_shift, allow_zero=True)
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
        check_seed(self.seed)
        check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        check_positive("learning_rate", self.learning_rate)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_choice("optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        check_choice("schedule", self.schedule, ("onecycle", "cosine", "constant"))
        check_choice("device", self.device, DEVICES)
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        check_positive("mixup_alpha", self.mixup_alpha, allow_zero=True)
        check_positive("cutmix_alpha", self.cutmix_alpha, allow_zero=True)
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
            check_choice("phases", phase, ("frozen", "finetune"))
        if not self.phases:
            raise ValueError("phases must name at least one of frozen, finetune")
        check_positive("augmented_views", self.augmented_views, allow_zero=True)


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
