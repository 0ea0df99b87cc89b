"""Checks of a search space before any trial runs: against the base config (its data split and
model options), the results tables' columns, and the sampler (the grid needs finite values)."""

from __future__ import annotations

from pathlib import Path

from cnnkit.config import RunConfig
from cnnkit.search.space import SearchSpace
from cnnkit.search.spaces import SPACES
from cnnkit.search.trial_config import build_trial_config

# Data settings that decide which images are in which split, or which images there are: trials
# that differed in one would be trained, ranked and tested on different images (data.seed draws
# other splits; train_on_all trains on the test images). Preprocessing (channels, image_size,
# stored_size, crop_to_bbox) and the cache folder only change how the same images are read.
SPLIT_SETTINGS = (
    "dataset",
    "data",
    "fold",
    "val_fraction",
    "test_fraction",
    "seed",
    "on_bad_image",
    "max_classes",
    "max_per_class",
    "train_on_all",
)


def space_label(space: SearchSpace, space_file: str | Path | None = None) -> str:
    """What an error about ``space`` names: its file, else the space's name."""
    return str(space_file) if space_file is not None else f"search space {space.name!r}"


def check_space(
    space: SearchSpace,
    base: RunConfig,
    sampler: str,
    space_file: str | Path | None = None,
) -> None:
    """Every check of a space against the base config and the sampler, before any data loads
    and before the search's folder or study is created.

    Raises:
        ValueError: one line naming the space file (or the space) and the parameter.
    """
    check_parameter_names(space, space_file)
    check_data_targets(space, space_file)
    check_model_options(space, base, space_file)
    check_parameter_values(space, base, space_file)
    if sampler == "grid":
        try:
            space.grid()
        except ValueError as error:
            if SPACES.get(space.name) is not space:
                raise ValueError(f"{space_label(space, space_file)}: {error}") from error
            # A built-in space cannot be edited: say what can be done instead.
            continuous = [p.name for p in space.parameters if p.type == "float" and not p.step]
            ranges = "is a continuous range" if len(continuous) == 1 else "are continuous ranges"
            raise ValueError(
                f"{space_label(space)}: grid search needs finite values, and its "
                f"{', '.join(map(repr, continuous))} {ranges}: use --sampler tpe or random, or "
                "a YAML space that lists their values (the built-in 'book' space lists all of "
                "its own)"
            ) from error


def check_parameter_names(space: SearchSpace, space_file: str | Path | None = None) -> None:
    """Refuse a parameter named as a column of the results tables (``seconds``, ``state``):
    its values and the trials' results would share one column.

    Raises:
        ValueError: naming the space file and the parameter.
    """
    from cnnkit.evaluation.search_table import RESULT_COLUMNS

    for parameter in space.parameters:
        if parameter.name in RESULT_COLUMNS:
            raise ValueError(
                f"{space_label(space, space_file)}: parameter {parameter.name!r} has the name of "
                f"a column of the results table; rename it (its target {parameter.target} stays)"
            )


def check_data_targets(space: SearchSpace, space_file: str | Path | None = None) -> None:
    """Refuse a parameter that sets one of :data:`SPLIT_SETTINGS`: trials are compared on
    one split of the same images, which the command's own options set.

    Raises:
        ValueError: naming the space file, the parameter and its target.
    """
    for parameter in space.parameters:
        section, _, name = parameter.target.partition(".")
        if section != "data" or name not in SPLIT_SETTINGS:
            continue
        advice = (
            "search compares trials on held-out images: drop it"
            if name == "train_on_all"
            else "set it with the command's own options instead"
        )
        raise ValueError(
            f"{space_label(space, space_file)}: parameter {parameter.name!r} targets "
            f"{parameter.target}, which changes the images trials are compared on; {advice}"
        )


def check_model_options(
    space: SearchSpace, base: RunConfig, space_file: str | Path | None = None
) -> None:
    """Refuse a space parameter that sets a model option no model of the search takes (a
    typo such as ``widht``), before any data loads or any trial is recorded.

    Raises:
        ValueError: naming the space file, the parameter, the option and the options the
            model takes.
    """
    from cnnkit.models.registry import model_options

    names = {base.model.name}
    for parameter in space.parameters:
        if parameter.target == "model.name":
            names = {str(choice) for choice in parameter.choices or ()}
    accepted = {option for name in names for option in model_options(name)}
    where = space_label(space, space_file)
    targets = {parameter.target for parameter in space.parameters}
    if base.model.options.get("members", 1) != 1 or "model.options.members" in targets:
        # From the space or from the base config (--option members=N).
        prefix = f"{where}: " if "model.options.members" in targets else ""
        raise ValueError(
            f"{prefix}search trains one model a trial, not ensembles: drop members from the "
            "search, then train the best trial's settings with --option members=N"
        )
    for parameter in space.parameters:
        prefix, _, option = parameter.target.rpartition(".")
        if prefix == "model.options" and option not in accepted:
            models = ", ".join(sorted(names))
            raise ValueError(
                f"{where}: search parameter {parameter.name!r} sets model option {option!r}, "
                f"which {models} does not take (options: {', '.join(sorted(accepted))})"
            )
        # Each trial trains one of the models: one that lacks the option would fail its trial
        # and end the search, so such a space is refused before anything runs.
        lacking = sorted(name for name in names if option not in model_options(name))
        if prefix == "model.options" and lacking:
            raise ValueError(
                f"{where}: search parameter {parameter.name!r} sets model option {option!r}, "
                f"which {', '.join(lacking)} (a choice of model.name) does not take; search "
                "each model in a space of its own"
            )


def check_parameter_values(
    space: SearchSpace, base: RunConfig, space_file: str | Path | None = None
) -> None:
    """Refuse a parameter value the run settings would refuse (``width: [abc]``, a learning
    rate below 0), one parameter at a time, before any trial starts: a trial would fail on it.

    Raises:
        ValueError: naming the space file, the parameter, the value and the problem.
    """
    from cnnkit.models.registry import check_options

    models = [parameter for parameter in space.parameters if parameter.target == "model.name"]
    # A value is valid when some model of the search takes it.
    with_models = [{}] if not models else [{models[0].name: name} for name in models[0].choices]
    for parameter in space.parameters:
        values = parameter.choices if parameter.type == "categorical" else (parameter.low,)
        values = (*values, parameter.high) if parameter.type != "categorical" else values
        for value in values:
            errors = []
            for model in with_models:
                params = {**model, parameter.name: value}
                try:
                    config = build_trial_config(base, space, params, base.run_dir())
                    check_options(config.model.name, config.model.options)
                except ValueError as error:
                    errors.append(error)
            if len(errors) == len(with_models):
                raise ValueError(
                    f"{space_label(space, space_file)}: search parameter {parameter.name!r}: "
                    f"{value!r} for {parameter.target} is not a valid setting ({errors[0]})"
                )
