"""The shape of a hyperparameter search space: :class:`SearchParameter` (a distribution and the
config field it sets) and :class:`SearchSpace` (a named set of them), each checked when built.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import Any

from cnnkit.config import SECTIONS, is_number

PARAMETER_TYPES = ("int", "float", "categorical")


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
