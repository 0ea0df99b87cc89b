"""Search space files: the YAML format below, read into a :class:`SearchSpace`.

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

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from cnnkit.config import AugmentConfig, TrainConfig, yaml_error_text
from cnnkit.config.files import load_yaml
from cnnkit.search.space import SearchParameter, SearchSpace

_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "target"}


def default_target(name: str) -> str:
    """Where a parameter without a ``target`` goes: a train/augment field, else a model option."""
    for section, config_class in (("train", TrainConfig), ("augment", AugmentConfig)):
        if name in {f.name for f in fields(config_class)}:
            return f"{section}.{name}"
    return f"model.options.{name}"


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
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: {yaml_error_text(error)}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read search space: {error}") from error
    try:
        return parse_space(data, path.stem)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
