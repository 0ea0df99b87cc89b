"""Hyperparameter search spaces: named ones (``book``...) and YAML files, and their config targets.

A space file maps parameter names to distributions and to the config field each one sets::

    preset: book-hasy            # optional: named defaults for every trial
    parameters:                  # or put the parameters at the top level
      dense:
        type: categorical        # int | float | categorical
        choices: [128, 256, 512]
        target: model.options.dense
      learning_rate:
        type: float
        low: 1.0e-4
        high: 1.0e-2
        log: true                # sample on a log scale (int and float)
        target: train.learning_rate
      convs: {type: int, low: 1, high: 2, step: 1, target: model.options.convs}

``target`` is ``SECTION.FIELD`` (``train``, ``augment``, ``data``) or ``model.options.OPTION``.
Without a target, a name that is a ``train`` or ``augment`` field sets that field, and any
other name becomes a model option.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from cnnkit.config import (
    SECTIONS,
    AugmentConfig,
    RunConfig,
    TrainConfig,
    build_run_config,
    config_to_dict,
    is_number,
    yaml_error_text,
)

logger = logging.getLogger(__name__)

PARAMETER_TYPES = ("int", "float", "categorical")
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "target"}


@dataclass(frozen=True)
class SearchParameter:
    """One searched hyperparameter and the config field it sets."""

    name: str
    type: str
    target: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        where = f"search parameter {self.name!r}"
        if self.type not in PARAMETER_TYPES:
            raise ValueError(f"{where}: type must be one of {', '.join(PARAMETER_TYPES)}")
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.type == "categorical":
            if not self.choices:
                raise ValueError(f"{where}: categorical parameters need a non-empty 'choices'")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{where}: {self.type} parameters need 'low' and 'high'")
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and not is_number(value):
                    raise ValueError(f"{where}: {key} must be a number; got {value!r}")
            if self.low > self.high:
                raise ValueError(f"{where}: low ({self.low}) must be <= high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"{where}: log scale needs low > 0")
            if self.log and self.step is not None:
                raise ValueError(f"{where}: 'log' and 'step' cannot be combined")
            if self.step is not None and self.step <= 0:
                raise ValueError(f"{where}: step must be > 0; got {self.step}")
            if self.type == "int":
                for key in ("low", "high", "step"):
                    value = getattr(self, key)
                    if value is not None and value != int(value):
                        raise ValueError(f"{where}: int parameters need a whole {key}; got {value}")
        if self.target == "model.name" and self.type != "categorical":
            raise ValueError(f"{where}: model.name is chosen from a list: give it 'choices'")
        check_target(self.target, where)

    def grid_values(self) -> list[Any]:
        """Every value of this parameter, for the grid sampler.

        Raises:
            ValueError: for a continuous float range (give ``choices`` or a ``step``).
        """
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            raise ValueError(
                f"grid search needs finite values: give {self.name!r} choices or a step"
            )
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + index * step for index in range(count)]
        if self.type == "int":
            return [int(round(value)) for value in values]
        # 0.1 + 2 * 0.1 is 0.30000000000000004: round off the float sum's error.
        return [round(value, 12) for value in values]


@dataclass(frozen=True)
class SearchSpace:
    """A named set of hyperparameters, optionally with the preset its trials start from."""

    name: str
    parameters: tuple[SearchParameter, ...]
    preset: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", tuple(self.parameters))
        if not self.parameters:
            raise ValueError(f"search space {self.name!r} has no parameters")
        names = [parameter.name for parameter in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"search space {self.name!r} repeats a parameter name")
        seen: dict[str, str] = {}
        for parameter in self.parameters:
            if parameter.target in seen:
                # Which value a trial would train with would depend on the order of the file.
                raise ValueError(
                    f"search space {self.name!r}: parameters {seen[parameter.target]!r} and "
                    f"{parameter.name!r} both set {parameter.target}; keep one"
                )
            seen[parameter.target] = parameter.name

    def grid(self) -> dict[str, list[Any]]:
        """Parameter name -> every value (the grid sampler's search space)."""
        return {parameter.name: parameter.grid_values() for parameter in self.parameters}

    def grid_combinations(self) -> list[dict[str, Any]]:
        """Every combination of the grid, as parameter dicts."""
        grid = self.grid()
        return [
            dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the YAML file format."""
        parameters = {}
        for parameter in self.parameters:
            spec: dict[str, Any] = {"type": parameter.type, "target": parameter.target}
            if parameter.type == "categorical":
                spec["choices"] = list(parameter.choices)
            else:
                spec.update(low=parameter.low, high=parameter.high, log=parameter.log)
                if parameter.step is not None:
                    spec["step"] = parameter.step
            parameters[parameter.name] = spec
        return {"name": self.name, "preset": self.preset, "parameters": parameters}


def check_target(target: str, where: str = "search parameter") -> None:
    """Check that ``target`` names a config field (``train.learning_rate``) or a model option.

    Raises:
        ValueError: for an unknown section or field.
    """
    parts = target.split(".")
    if parts[:2] == ["model", "options"] and len(parts) == 3 and parts[2]:
        return
    if len(parts) == 2 and parts[0] in SECTIONS and parts[0] != "model":
        known = {f.name for f in fields(SECTIONS[parts[0]])}
        if parts[1] in known:
            return
        raise ValueError(f"{where}: {parts[0]} has no field {parts[1]!r}")
    if target == "model.name":
        return
    raise ValueError(
        f"{where}: target {target!r} must be SECTION.FIELD (train, augment, data) "
        "or model.options.OPTION"
    )


def default_target(name: str) -> str:
    """Where a parameter without a ``target`` goes: a train/augment field, else a model option."""
    for section, config_class in (("train", TrainConfig), ("augment", AugmentConfig)):
        if name in {f.name for f in fields(config_class)}:
            return f"{section}.{name}"
    return f"model.options.{name}"


def overrides_for(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """Nested config overrides (for :func:`cnnkit.config.build_run_config`) from trial params."""
    overrides: dict[str, Any] = {}
    for parameter in space.parameters:
        if parameter.name not in params:
            continue
        node = overrides
        *parents, leaf = parameter.target.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = params[parameter.name]
    return overrides


def build_trial_config(
    base: RunConfig, space: SearchSpace, params: dict[str, Any], out: Path
) -> RunConfig:
    """The base config with one trial's parameters applied and its own run folder.

    A trial that draws another model (a space that searches ``model.name``) keeps only the
    base's model options that model takes: the base's were set for its own model (a preset's
    ``dense`` for book_cnn means nothing to symbol_cnn), and a model sized by its input gets
    ``image_size`` from the data settings, as the training command gives it.
    """
    config = build_run_config(config_to_dict(base), overrides_for(space, params), {"out": str(out)})
    if config.model.name == base.model.name:
        return config
    from cnnkit.models.registry import model_options

    takes = model_options(config.model.name)
    options = {key: value for key, value in config.model.options.items() if key in takes}
    if "image_size" in takes:
        options["image_size"] = config.data.image_size
    dropped = sorted(set(config.model.options) - set(options))
    if dropped:
        logger.info("%s takes no %s: left out of its trial", config.model.name, ", ".join(dropped))
    return replace(config, model=replace(config.model, options=options))


def parse_space(data: dict[str, Any], name: str) -> SearchSpace:
    """Build a space from the YAML structure documented in this module.

    Raises:
        ValueError: naming the parameter and the problem.
    """
    if not isinstance(data, dict):
        raise ValueError(f"search space {name!r} must be a mapping of parameters")
    preset = None
    specs = data
    if isinstance(data.get("parameters"), dict):
        preset = data.get("preset")
        name = str(data.get("name") or name)
        extra = set(data) - {"parameters", "preset", "name"}
        if extra:
            raise ValueError(f"search space {name!r}: unknown key(s) {', '.join(sorted(extra))}")
        # The preset is looked up by name later, where a list would fail as "unhashable".
        if preset is not None and not isinstance(preset, str):
            raise ValueError(
                f"search space {name!r}: preset must be a preset name such as book-hasy; "
                f"got {preset!r}"
            )
        specs = data["parameters"]
    parameters = [
        _parse_parameter(str(parameter_name), spec) for parameter_name, spec in specs.items()
    ]
    return SearchSpace(name, tuple(parameters), preset)


def _parse_parameter(parameter_name: str, spec: Any) -> SearchParameter:
    """One parameter of a space file.

    Raises:
        ValueError: naming the parameter and the problem.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"search parameter {parameter_name!r} must be a mapping")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(
            f"search parameter {parameter_name!r}: unknown key(s) {', '.join(sorted(unknown))}"
        )
    choices = spec.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise ValueError(
            f"search parameter {parameter_name!r}: choices must be a list such as [16, 32]; "
            f"got {choices!r}"
        )
    log = spec.get("log", False)
    # bool("no") is True: only a YAML boolean says which scale was meant.
    if not isinstance(log, bool):
        raise ValueError(
            f"search parameter {parameter_name!r}: log must be true or false; got {log!r}"
        )
    return SearchParameter(
        name=parameter_name,
        type=str(spec.get("type", "categorical" if "choices" in spec else "float")),
        target=str(spec.get("target") or default_target(parameter_name)),
        low=spec.get("low"),
        high=spec.get("high"),
        log=log,
        step=spec.get("step"),
        choices=tuple(spec.get("choices") or ()),
    )


def load_space(path: str | Path) -> SearchSpace:
    """Read a search space YAML file.

    Raises:
        ValueError: if the file cannot be read or is malformed.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: {yaml_error_text(error)}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read search space: {error}") from error
    try:
        return parse_space(data, path.stem)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _categorical(name: str, target: str, choices: list[Any]) -> SearchParameter:
    return SearchParameter(name, "categorical", target, choices=tuple(choices))


# The book's grid search (step 15): 2 x 5 x 4 = 40 book_cnn models on the book-hasy preset.
BOOK_SPACE = SearchSpace(
    "book",
    (
        _categorical("convs", "model.options.convs", [1, 2]),
        _categorical("dense", "model.options.dense", [128, 256, 512, 1024, 2048]),
        _categorical("dropout", "model.options.dropout", [0.0, 0.25, 0.5, 0.75]),
    ),
    preset="book-hasy-search",
)

# The book's parameters plus the optimiser's, for TPE or random search.
BOOK_WIDE_SPACE = SearchSpace(
    "book-wide",
    (
        *BOOK_SPACE.parameters,
        SearchParameter("learning_rate", "float", "train.learning_rate", 1e-4, 1e-2, log=True),
        _categorical("batch_size", "train.batch_size", [32, 64, 128]),
    ),
    preset="book-hasy",
)

# Our symbol network: width, depth, regularisation and learning rate.
SYMBOL_SPACE = SearchSpace(
    "symbol",
    (
        _categorical("width", "model.options.width", [16, 32, 48, 64]),
        SearchParameter("layers_per_stage", "int", "model.options.layers_per_stage", 1, 3),
        SearchParameter("dropout", "float", "model.options.dropout", 0.0, 0.5),
        SearchParameter("learning_rate", "float", "train.learning_rate", 3e-4, 1e-2, log=True),
        SearchParameter("weight_decay", "float", "train.weight_decay", 1e-5, 1e-2, log=True),
        SearchParameter("label_smoothing", "float", "train.label_smoothing", 0.0, 0.2),
    ),
    preset=None,
)

SPACES = {space.name: space for space in (BOOK_SPACE, BOOK_WIDE_SPACE, SYMBOL_SPACE)}


def resolve_space(name_or_path: str) -> SearchSpace:
    """A named space (``book``, ``book-wide``, ``symbol``) or a YAML file.

    Raises:
        ValueError: if it is neither a known name nor a readable file.
    """
    if name_or_path in SPACES:
        return SPACES[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        return load_space(path)
    raise ValueError(
        f"unknown search space {name_or_path!r}; use one of {', '.join(SPACES)} or a YAML file"
    )
