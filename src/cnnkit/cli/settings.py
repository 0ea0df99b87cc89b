"""A training run's settings from the command line: preset < --config file < flags, with the
input size settled between the data and the model before any data loads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.overrides import overrides_from_args, parse_option
from cnnkit.paths import has_run_info, is_search_folder

logger = logging.getLogger(__name__)

PHOTO_MODELS_PRESET = {"book_bird_cnn": "book-cub", "book_cnn": "book-hasy"}


PHOTO_MODEL = "efficientnet_lite0"  # For a folder or CSV of photos when no model is named.


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` without its unset (``None``) settings, at every level."""
    return {
        key: _given(value) if isinstance(value, dict) else value
        for key, value in overrides.items()
        if value is not None
    }


def _file_text(file_layer: dict, dotted: str, path: str | None) -> str | None:
    """A text setting of the --config file (``model.name``) that picks the preset, checked
    before the preset is chosen with it: a list there would fail as "unhashable"."""
    section, key = dotted.split(".")
    value = (file_layer.get(section) or {}).get(key)
    if value is not None and not isinstance(value, str | os.PathLike):
        raise CommandError(f"{path}: {dotted} must be text; got {value!r}")
    return value


def resolve_run_config(args: argparse.Namespace, detect_photos: bool = True):
    """defaults < preset < --config file < flags.

    With ``detect_photos``, a folder or CSV dataset with no model, preset or model options
    given trains the photo recipe when its images are colour photos (see ``looks_like_photos``).
    """
    from cnnkit.config import build_run_config, load_config_file
    from cnnkit.presets import PRESETS, preset_for

    _refuse_flags_the_run_would_ignore(args)
    file_layer = {}
    if args.config:
        file_layer, args.beside = _without_own_folder(
            load_config_file(args.config), args.config, getattr(args, "resume", False)
        )
    dataset = args.dataset or _file_text(file_layer, "data.dataset", args.config)
    if dataset is None:
        raise CommandError("--dataset is required (or data.dataset in the --config file)")
    args.dataset = dataset  # Default folder names use it.
    model_name = args.model or _file_text(file_layer, "model.name", args.config)
    preset = args.preset
    data = args.data or _file_text(file_layer, "data.data", args.config)
    options_given = bool(
        _option_flags_given(args) or (file_layer.get("model") or {}).get("options")
    )
    unnamed = preset is None and model_name is None and not options_given
    not_photos = unseen = None
    if detect_photos and unnamed and dataset in ("folder", "csv") and data:
        from cnnkit.data.photos import looks_like_photos

        photos, seen = looks_like_photos(dataset, str(data))
        if photos:  # The symbol network's 32 px grayscale input would waste these photos.
            model_name = args.model = PHOTO_MODEL
            args.chosen_because = (
                f"Photos ({seen}): training {PHOTO_MODEL} with the cub transfer recipe "
                "(--model symbol_cnn trains the small symbol network instead)"
            )
        elif seen:  # Said too when the images are not photos (below): colour or size is lost.
            not_photos = seen
        elif getattr(args, "print_config", False) and not Path(data).exists():
            unseen = data  # A run would stop on it; a printed config says what it assumed.
    if preset is None and model_name in PHOTO_MODELS_PRESET:
        preset = PHOTO_MODELS_PRESET[model_name]
    if preset is None and model_name and model_name.startswith("efficientnet"):
        preset = "cub"
    if preset is None:
        preset = dataset if dataset in PRESETS else "hasy"
    overrides = _given(overrides_from_args(args))
    try:
        # A null in the file turns a setting off; unset flags were left out above.
        config = build_run_config(preset_for(preset), file_layer, overrides, apply_nulls=True)
    except ValueError as error:
        if _file_at_fault(preset_for(preset), file_layer, overrides):
            raise CommandError(f"{args.config}: {error}") from None
        raise
    try:
        if model_name is None and options_given:
            _check_the_presets_model_takes_them(config, preset)
        _warn_of_augment_flags_with_augmentation_off(config, args, preset)
        _warn_of_fine_tune_flags_without_a_fine_tune(config, args)
        config = _fit_to_model_input(config, args)
    except (CommandError, ValueError) as error:
        if _model_from_the_file(args, file_layer):  # A model name or option of the file's.
            raise CommandError(f"{args.config}: {error}") from None
        raise
    if unseen:
        args.chosen_because = (
            f"{unseen} does not exist yet, so its images were not looked at: training "
            f"{config.model.name}, as for symbols; a {dataset} of colour photos would train "
            f"{PHOTO_MODEL}"
        )
    if not_photos:
        size, channels = config.data.image_size, config.data.channels
        keeps = "colour" if channels == 3 else "grayscale (--channels 3 keeps colour)"
        args.chosen_because = (
            f"Not colour photos ({not_photos}): training {config.model.name} on {size}x{size} "
            f"{keeps}; --model {PHOTO_MODEL} trains the photo recipe"
        )
    return config


def _option_flags_given(args: argparse.Namespace) -> bool:
    """Whether flags give model options (--option, or the symbol networks' own flags). Every
    model takes a dropout, so --dropout alone says nothing about which network."""
    return bool(
        args.option
        or any(getattr(args, key, None) is not None for key in ("dense", "convs", "width"))
    )


def _model_from_the_file(args: argparse.Namespace, file_layer: dict) -> bool:
    """Whether the --config file sets the model's name or options, and no flag does."""
    model = file_layer.get("model") or {}
    flags = args.model or _option_flags_given(args)
    return not flags and bool(model.get("name") or model.get("options"))


def _without_own_folder(
    file_layer: dict[str, Any], config_path: str, resume: bool = False
) -> tuple[dict[str, Any], Path | None]:
    """A run's own ``config.yaml`` (given to train again with its settings) names that run's
    folder as ``out``: taken as it is, the new run would replace the one it copies. That
    ``out`` is left out, and the folder returned: the new run goes beside it, as a run without
    ``--out`` goes beside its default folder. A search trial's file returns no folder: its run
    goes where a run without ``--out`` goes, not among the search's trials. With ``resume``,
    ``out`` is that very folder: ``--resume`` continues the run the file came from.

    The file (or the file a link to it names) is the run's own where its ``out`` names the
    folder that holds it (absolute, as runs write it), or, for a run folder that was moved or
    a file written before runs made it absolute, a folder of the same name.
    """
    out = file_layer.get("out")
    if not isinstance(out, str):
        return file_layer, None
    given = Path(config_path).expanduser()
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        real = given.resolve()
        folder = real.parent
        same = Path(out).expanduser().resolve() == folder
        moved = real.name == "config.yaml" and Path(out).name == folder.name
        if same or (moved and has_run_info(folder)):
            # As the user named it, unless that is no name (`config.yaml` inside the run
            # folder, `../config.yaml`) or goes through a link to another folder.
            shown = given.parent
            if shown.name in ("", "..") or shown.resolve() != folder:
                shown = folder
            if resume:
                return {**file_layer, "out": str(shown)}, None
            rest = {key: value for key, value in file_layer.items() if key != "out"}
            if is_search_folder(folder.parent.parent):  # SEARCH/trials/trial-NNN
                return rest, None
            return rest, shown
    return file_layer, None


# Flags (argparse's names) that only the fine-tune reads: the frozen phase trains its head for
# transfer.head_epochs at transfer.head_learning_rate, whole batches, no average, no stopping.
_FINE_TUNE_FLAGS = {
    "epochs": "--epochs",
    "learning_rate": "--lr",
    "patience": "--patience",
    "max_steps_per_epoch": "--max-steps-per-epoch",
    "ema_decay": "--ema",
    "micro_batch_size": "--micro-batch",
}


def _warn_of_fine_tune_flags_without_a_fine_tune(config, args: argparse.Namespace) -> None:
    """``--phases frozen`` runs no fine-tune: name the flags given that only it would read."""
    if not config.model.name.startswith("efficientnet") or "finetune" in config.transfer.phases:
        return
    given = [flag for name, flag in _FINE_TUNE_FLAGS.items() if getattr(args, name, None)]
    if given:
        logger.warning(
            "%s %s nothing with --phases frozen, which runs no fine-tune: the frozen head "
            "trains %d epochs at learning rate %g (transfer.head_epochs and "
            "transfer.head_learning_rate in a --config file)",
            ", ".join(given),
            "does" if len(given) == 1 else "do",
            config.transfer.head_epochs,
            config.transfer.head_learning_rate,
        )


def _warn_of_augment_flags_with_augmentation_off(config, args: argparse.Namespace, preset) -> None:
    """A preset or ``--config`` file that turns augmentation off (``book-hasy``, the book's
    settings) makes ``--rotation`` and ``--train-size`` do nothing: say so rather than drop them
    without a word (with ``--no-augment`` as well they are refused before this)."""
    if config.augment.enabled or args.no_augment:
        return
    given = [
        f"{flag} {value:g}"
        for flag, value in (("--rotation", args.rotation), ("--train-size", args.train_size))
        if value
    ]
    if given:
        source = f"the {preset} preset" if args.config is None else "the --config file or preset"
        logger.warning(
            "%s does nothing: %s trains without augmentation (augment.enabled: true in a "
            "--config file turns it on)",
            " and ".join(given),
            source,
        )


def _refuse_flags_the_run_would_ignore(args: argparse.Namespace) -> None:
    """Refuse a flag that another flag given with it makes the run ignore: ``--no-augment``
    turns off the augmentation that ``--rotation`` and ``--train-size`` shape, and
    ``--train-on-all`` holds out none of the images ``--val-fraction`` would.

    Only two flags given together conflict: a preset's or ``--config`` file's setting is a base
    that flags change, not a choice of the user's to contradict (``--preset book-hasy
    --rotation 30`` trains without augmentation, as the preset does, with a warning). Nor does
    a value that asks for what the other flag does anyway (``--rotation 0``, ``--val-fraction
    0``).

    Raises:
        CommandError: naming both flags.
    """
    ignored: list[tuple[str, str]] = []
    if args.no_augment:
        if args.rotation:
            ignored.append((f"--rotation {args.rotation:g}", "--no-augment turns augmentation off"))
        if args.train_size is not None:
            ignored.append(
                (
                    f"--train-size {args.train_size}",
                    "--no-augment turns augmentation off, whose crops it sizes",
                )
            )
    # Search has no --train-on-all: its trials are compared on held-out images.
    if getattr(args, "train_on_all", None) and args.val_fraction:
        ignored.append(
            (
                f"--val-fraction {args.val_fraction:g}",
                "--train-on-all trains on every image and holds none out for validation",
            )
        )
    if ignored:
        flag, because = ignored[0]
        raise CommandError(f"{flag} would be ignored: {because}; give one of the two")


def _check_the_presets_model_takes_them(config, preset: str) -> None:
    """Model options given with no model go to the preset's model (and a folder of photos is
    then not detected as such); one that model lacks was meant for another: say so."""
    from cnnkit.models.registry import unknown_options

    unknown = unknown_options(config.model.name, config.model.options)
    if unknown:
        raise CommandError(
            f"model option(s) {', '.join(unknown)} given without a model (--model, or "
            f"model.name in a --config file) went to "
            f"{config.model.name}, the {preset} preset's model, which has no such option: "
            "name the model they are for with --model (`cnnkit models` lists each model's "
            "options)"
        )


def _fit_to_model_input(config, args: argparse.Namespace):
    """Settle the input size between the data settings and the model, before any data loads.

    A photo model takes photos at its own input size: ``--image-size`` is refused unless it
    agrees, and the data settings (so config.yaml) record the size used. A symbol model whose
    layers are sized for its input (book_cnn) gets ``data.image_size`` as its ``image_size``
    option, which its model file then records.
    """
    from cnnkit.models.registry import check_options, model_input, model_options

    name, data = config.model.name, config.data
    options = check_options(name, config.model.options)
    takes_size = "image_size" in model_options(name)
    preprocessing = model_input(name, data.channels, options)
    if preprocessing.mode == "photo":
        if args.image_size is not None and args.image_size != preprocessing.image_size:
            how = "--option image_size=N sets it" if takes_size else "it is fixed"
            raise CommandError(
                f"--image-size {args.image_size}: {name} takes photos at its own input size "
                f"({preprocessing.image_size} px; {how})"
            )
        data = dataclasses.replace(
            data, image_size=preprocessing.image_size, stored_size=preprocessing.stored_size
        )
    elif takes_size:
        given = options.get("image_size")
        from_flags = "image_size" in dict(parse_option(text) for text in args.option)
        if given not in (None, data.image_size) and (args.image_size is None or from_flags):
            raise CommandError(
                f"model option image_size={given} differs from the input size "
                f"({data.image_size} px): {name} is sized by --image-size (data.image_size)"
            )
        options = {**options, "image_size": data.image_size}
    model = dataclasses.replace(config.model, options=options)
    return dataclasses.replace(config, data=data, model=model)


def _file_at_fault(preset: dict, file_layer: dict, overrides: dict) -> bool:
    """Whether the settings build without the --config file's own (keeping the dataset, data
    and fold it names, which the flags' settings may need): the error is then the file's."""
    from cnnkit.config import build_run_config

    if not file_layer:
        return False
    data = file_layer.get("data") or {}
    where = {key: data[key] for key in ("dataset", "data", "fold") if key in data}
    for kept in ({}, {"data": where}):
        try:
            build_run_config(preset, kept, overrides, apply_nulls=True)
        except ValueError:
            continue
        return True
    return False


def print_config(config, because: str | None = None) -> int:
    """``--print-config``: the resolved settings as YAML that ``--config`` reads back, with all
    of the model's options (a preset chosen on reading cannot then add its own); ``because``
    (why the model was chosen) goes first as a YAML comment."""
    from cnnkit.config import dump_config
    from cnnkit.models.registry import check_options
    from cnnkit.training.run_folder import with_model_defaults

    check_options(config.model.name, config.model.options)  # What training would refuse.
    if because:
        print(f"# {because}")
    print(dump_config(with_model_defaults(config)), end="")
    return 0
