"""The options the commands share (data, model, training) and the argparse types that check
them; :mod:`cnnkit.cli.overrides` reads the flags back as config overrides.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from cnnkit.choices import DATASETS, DEVICES
from cnnkit.paths import default_cache_dir


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def home_path(text: str) -> str:
    """A path argument with a leading ``~`` expanded: the shell leaves ``--data=~/x`` as it is,
    and a config file's paths get the same (see :mod:`cnnkit.config.files`)."""
    return os.path.expanduser(text)


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[minimum, maximum]``, so a bad value is refused
    before any work, in a line that names the flag (``argument --patience: ...``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}; got {value}")
        return value

    return parse


def share(text: str) -> float:
    """An argparse type: a share of the images, in ``[0, 1)``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1; got {text}")
    return value


VERBOSE_HELP = "log debug details, and show the whole traceback of an error"


def add_data_arguments(
    parser: argparse.ArgumentParser, required: bool = True, model_input: bool = True
) -> None:
    """The data options; ``model_input=False`` leaves out those a saved model decides itself
    (its channels and input size) and the validation share (evaluate holds none out)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        required=required,
        help="data source: HASYv2, CUB-200-2011, a folder per class, a path,label CSV, "
        "or scikit-learn's digits"
        + (
            ""
            if model_input
            else " (default: the data the model file records, with its --data and --fold)"
        ),
    )
    group.add_argument("--data", type=home_path, help="archive, folder or CSV file of the dataset")
    group.add_argument(
        "--fold", type=whole(1, 10), help="HASYv2 fold K (1-10): train/test from fold-K"
    )
    if model_input:
        group.add_argument(
            "--channels",
            type=int,
            choices=[1, 3],
            help="1 (symbols) or 3 (photos, the book's CNN)",
        )
        group.add_argument("--image-size", type=int, help="model input size for symbols (pixels)")
        group.add_argument(
            "--val-fraction",
            type=share,
            help="share of the training images held out for validation",
        )
    group.add_argument("--test-fraction", type=share, help="test share without an official split")
    group.add_argument(
        "--on-bad-image",
        choices=["error", "skip"],
        help="stop on a missing/corrupt image (default) or skip it with a warning",
    )
    group.add_argument(
        "--cache-dir", type=home_path, help=f"decoded-image cache (default {default_cache_dir()})"
    )
    group.add_argument(
        "--crop-to-bbox",
        action="store_true",
        default=None,
        help="CUB: crop each photo to its bird's bounding box (bounding_boxes.txt)",
    )
    group.add_argument("--max-classes", type=whole(1), help="use only the first N classes")
    group.add_argument(
        "--max-per-class",
        type=whole(1),
        help="use at most N images per class, before the split is drawn; where the data comes "
        "split (a HASYv2 fold, CUB's official split, a CSV's split column), at most N of each "
        "class in each of its splits",
    )


def add_train_arguments(parser: argparse.ArgumentParser, search: bool = False) -> None:
    """The options of `train` (and, with ``search``, of `search`): data, settings, model and
    training."""
    add_data_arguments(parser, required=False)  # --config may name the dataset instead.
    parser.add_argument(
        "--preset",
        help="named defaults: digits, hasy, book-hasy, book-hasy-search, cub, book-cub",
    )
    parser.add_argument(
        "--config", type=home_path, help="YAML file with data/model/augment/train sections"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings (preset < --config < flags) as YAML and exit",
    )
    if search:
        parser.add_argument(
            "--out", type=home_path, help="search folder (default runs/search-<dataset>-<space>)"
        )
    else:
        parser.add_argument(
            "--out", type=home_path, help="run folder (default runs/<dataset>-<model>)"
        )
    add_quiet_argument(parser, "; the study's result is printed at the end" if search else None)
    if not search:  # A search ranks its trials on held-out images.
        parser.add_argument(
            "--train-on-all", action="store_true", default=None, help="fit on train+test (final)"
        )
    _add_model_options(parser.add_argument_group("model"))
    train = parser.add_argument_group(
        "training",
        "Unset options come from the preset and --config (--print-config shows them all).",
    )
    train.add_argument(
        "--epochs",
        type=whole(1),
        help="passes over the training images (transfer models: the fine-tune's; the frozen "
        "phase's head uses transfer.head_epochs)",
    )
    train.add_argument(
        "--batch-size", type=whole(1), help="images per optimiser step (all processes)"
    )
    train.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="the optimiser")
    train.add_argument(
        "--lr", "--learning-rate", dest="learning_rate", type=float, help="peak learning rate"
    )
    train.add_argument(
        "--weight-decay", type=float, help="weight decay (decoupled for AdamW, L2 otherwise)"
    )
    train.add_argument(
        "--schedule",
        choices=["onecycle", "cosine", "constant"],
        help="learning-rate schedule, after a warm-up of train.warmup_fraction of the steps",
    )
    _add_regularisation_options(train)
    _add_run_options(train)


def _add_model_options(model: argparse._ArgumentGroup) -> None:
    """Which network to train, and its options."""
    model.add_argument("--model", help="registry name (`cnnkit models` lists them)")
    model.add_argument("--dense", type=int, help="book_cnn: dense units (128; 1024 variant)")
    model.add_argument("--dropout", type=float, help="dropout before the classifier")
    model.add_argument("--convs", type=int, help="book_cnn: number of conv layers (1 or 2)")
    model.add_argument("--width", type=int, help="symbol_cnn: channels of the first stage")
    model.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="any model option"
    )


def _add_regularisation_options(train: argparse._ArgumentGroup) -> None:
    """Label smoothing, Mixup, CutMix, the weight average and micro-batches."""
    train.add_argument(
        "--label-smoothing", type=float, help="share of each target spread over all classes"
    )
    train.add_argument(
        "--mixup",
        dest="mixup_alpha",
        type=float,
        metavar="ALPHA",
        help="Mixup: train on blends of image pairs (0 off; 0.2-0.4 typical)",
    )
    train.add_argument(
        "--cutmix",
        dest="cutmix_alpha",
        type=float,
        metavar="ALPHA",
        help="CutMix: paste a box of another image (0 off; 1.0 typical)",
    )
    train.add_argument(
        "--ema",
        dest="ema_decay",
        type=float,
        metavar="DECAY",
        help="keep a moving average of the weights and save it as the model "
        "(0 off; 0.99-0.9999, longer runs higher)",
    )
    train.add_argument(
        "--micro-batch",
        dest="micro_batch_size",
        type=whole(1),
        metavar="N",
        help="at most N samples per forward pass (per process under torchrun); gradients add "
        "up over the batch (default: the whole batch, split when it would not fit in memory)",
    )


def _add_run_options(train: argparse._ArgumentGroup) -> None:
    """Stopping, seeding, the device and its speed-ups, augmentation and transfer phases."""
    train.add_argument(
        "--patience", type=whole(1), help="early stopping after N epochs without gain"
    )
    train.add_argument("--seed", type=int, help="seed for splits, init, shuffling, augmentation")
    add_device_argument(train, None, "where to train (auto: cuda, then mps, then cpu)")
    train.add_argument("--no-amp", action="store_true", default=None, help="disable CUDA AMP")
    train.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast on CPU")
    train.add_argument(
        "--no-fast-path", action="store_true", default=None, help="no CPU allocator/layout tuning"
    )
    train.add_argument(
        "--max-steps-per-epoch", type=whole(1), help="cap batches per epoch (quick runs)"
    )
    train.add_argument("--no-augment", action="store_true", default=None, help="no augmentation")
    train.add_argument("--rotation", type=float, help="max rotation in degrees (augmentation)")
    train.add_argument(
        "--train-size",
        type=int,
        metavar="PX",
        help="side of the augmented training crops, for models that take any size (default: "
        "the model's input size; smaller trains faster and, with random resized crops, "
        "shows objects at their test-time size)",
    )
    train.add_argument(
        "--phases",
        help="transfer models: frozen,finetune (default both) or frozen",
    )


def add_quiet_argument(
    parser: argparse.ArgumentParser,
    after: str | None = None,
) -> None:
    """``--quiet`` for the commands that train (train, search, demo); ``after`` says what is
    printed once training ends."""
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="nothing while training (no progress bars or per-epoch lines)"
        + ("; the epochs are listed once at the end" if after is None else after),
    )


def add_device_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None, help: str
) -> None:
    """``--device``: where a command runs its model (each command says why its default)."""
    parser.add_argument("--device", choices=DEVICES, default=default, help=help)


def add_model_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The model a command reads, as its first word or, as predict takes it, ``--model``."""
    parser.add_argument("model", nargs="?", help=help)
    parser.add_argument(
        "--model",
        dest="model_flag",
        metavar="MODEL",
        type=home_path,
        help="the same as MODEL (as predict takes it)",
    )
