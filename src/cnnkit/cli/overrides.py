"""The training flags read back as nested config overrides (unset flags are absent), and
``--option KEY=VALUE`` parsed as YAML."""

from __future__ import annotations

import argparse
from typing import Any

from cnnkit.cli.arguments import CommandError

# Flags that set a model option (--dense 64 is --option dense=64).
MODEL_OPTION_FLAGS = ("dense", "dropout", "convs", "width")


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as ``(key, value)``, the value read as YAML (``0.5`` a number, ``[1, 2]``
    a list); a text without ``=`` or a key is a :class:`CommandError`."""
    if "=" not in text:
        raise CommandError(f"--option needs KEY=VALUE; got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise CommandError(f"--option needs KEY=VALUE; got {text!r} (no key)")
    import yaml

    from cnnkit.config import number_from_text

    return key.strip(), number_from_text(yaml.safe_load(raw))


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit flags as nested config overrides (unset flags are absent)."""
    options = dict(parse_option(text) for text in args.option)
    for key in MODEL_OPTION_FLAGS:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    seed = args.seed
    return {
        "data": {
            "dataset": args.dataset,
            "data": args.data,
            "fold": args.fold,
            "channels": args.channels,
            "image_size": args.image_size,
            "val_fraction": args.val_fraction,
            "test_fraction": args.test_fraction,
            "on_bad_image": args.on_bad_image,
            "crop_to_bbox": args.crop_to_bbox,
            "max_classes": args.max_classes,
            "max_per_class": args.max_per_class,
            "train_on_all": getattr(args, "train_on_all", None),
            "seed": seed,
        },
        "model": {"name": args.model, "options": options or None},
        "augment": {
            "enabled": False if args.no_augment else None,
            "max_rotation": args.rotation,
            "train_size": args.train_size,
        },
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": args.optimizer,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "schedule": args.schedule,
            "label_smoothing": args.label_smoothing,
            "mixup_alpha": args.mixup_alpha,
            "cutmix_alpha": args.cutmix_alpha,
            "ema_decay": args.ema_decay,
            "early_stopping_patience": args.patience,
            "seed": seed,
            "device": args.device,
            "amp": False if args.no_amp else None,
            "bf16_cpu": args.bf16,
            "fast_path": False if args.no_fast_path else None,
            "max_steps_per_epoch": args.max_steps_per_epoch,
            "micro_batch_size": args.micro_batch_size,
        },
        "transfer": {"phases": args.phases.split(",") if args.phases else None},
        "out": args.out,
    }
