"""The kinds of value a config field accepts (numbers, text, true or false, lists of names),
checked field by field before a dataclass or the trainer trips over a wrong one."""

from __future__ import annotations

import contextlib
import typing
from types import UnionType
from typing import Any


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


def checked_value(name: str, value: Any, hint: Any) -> Any:
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
