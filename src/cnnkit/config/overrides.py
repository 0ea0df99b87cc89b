"""Layered config overrides: deep-merging nested dicts (defaults < preset < file < flags) and
building a checked RunConfig from them."""

from __future__ import annotations

import difflib
import typing
from dataclasses import fields
from typing import Any

from cnnkit.config.sections import SECTIONS, RunConfig
from cnnkit.config.values import checked_value

# What a flag is called in a config file, where its name differs (``--lr``: learning_rate).
FLAG_FIELDS = {
    "lr": "learning_rate",
    "patience": "early_stopping_patience",
    "mixup": "mixup_alpha",
    "cutmix": "cutmix_alpha",
    "ema": "ema_decay",
    "bf16": "bf16_cpu",
    "micro_batch": "micro_batch_size",
    "rotation": "max_rotation",
}


def did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    """`` (did you mean X?)`` for a misspelt or flag-style ``name`` among ``known``, else ``""``."""
    known = list(known)
    spelt = str(name).replace("-", "_").lstrip("_")
    spelt = FLAG_FIELDS.get(spelt, spelt)
    if spelt in known:
        return f" (did you mean {spelt}?)"
    close = difflib.get_close_matches(spelt, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def merge_overrides(
    base: dict[str, Any], overrides: dict[str, Any], apply_nulls: bool = False
) -> dict[str, Any]:
    """Deep-merge ``overrides`` (sections of fields, and ``out``) into a copy of ``base``.

    ``None`` values are ignored (an unset flag), unless ``apply_nulls``: then a ``None`` field
    or ``out`` is set to ``None`` (a config file's ``null`` turns an optional setting off). A
    ``None`` section or ``options`` is always ignored (YAML reads an empty one as null).
    """
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            section = merged.get(key)
            merged[key] = _merge_fields(
                section if isinstance(section, dict) else {}, value, apply_nulls
            )
        elif value is not None or (apply_nulls and key not in SECTIONS):
            merged[key] = value
    return merged


def _merge_fields(base: dict[str, Any], fields: dict[str, Any], apply_nulls: bool) -> dict:
    """One section of :func:`merge_overrides`: model ``options`` merge key by key."""
    merged = dict(base)
    for key, value in fields.items():
        if key == "options" and isinstance(value, dict):
            merged[key] = {**(merged.get(key) or {}), **value}
        elif value is not None or (apply_nulls and key != "options"):
            merged[key] = value
    return merged


def build_run_config(*layers: dict[str, Any], apply_nulls: bool = False) -> RunConfig:
    """Build a RunConfig from nested dicts applied in order (later layers win).

    A ``None`` value leaves the setting as the earlier layers have it, unless ``apply_nulls``
    (layers read from config files, where ``null`` turns an optional setting off; a flags
    layer must then leave its unset flags out).

    Raises:
        ValueError: for an unknown section or field, or an invalid value.
    """
    kwargs: dict[str, Any] = {}
    for key, value in _merge_layers(layers, apply_nulls).items():
        kwargs[key] = value if key == "out" else _build_section(key, value)
    return RunConfig(**kwargs)


def _merge_layers(layers: tuple[dict[str, Any], ...], apply_nulls: bool) -> dict[str, Any]:
    """The layers of :func:`build_run_config` merged in order into one nested dict."""
    merged: dict[str, Any] = {}
    for layer in layers:
        name = (layer.get("model") or {}).get("name")
        model = merged.get("model", {})
        if name is not None and name != model.get("name"):
            # Options belong to the model they were written for; a new model starts afresh.
            merged = {**merged, "model": {k: v for k, v in model.items() if k != "options"}}
        merged = merge_overrides(merged, layer, apply_nulls)
    return merged


def _build_section(key: str, value: Any) -> Any:
    """The dataclass of section ``key`` built from its merged fields, each checked for kind.

    Raises:
        ValueError: for an unknown section or field, or an invalid value.
    """
    if key not in SECTIONS:
        raise ValueError(
            f"unknown config section {key!r}{did_you_mean(key, [*SECTIONS, 'out'])}; "
            f"expected one of {[*SECTIONS, 'out']}"
        )
    section = SECTIONS[key]
    if not isinstance(value, dict):
        raise ValueError(f"config section {key} must be a mapping of fields; got {value!r}")
    known = {f.name for f in fields(section)}
    unknown = set(value) - known
    if unknown:
        named = ", ".join(f"{name}{did_you_mean(name, known)}" for name in sorted(unknown))
        raise ValueError(f"unknown field(s) in {key}: {named}")
    hints = typing.get_type_hints(section)
    value = {name: checked_value(f"{key}.{name}", v, hints[name]) for name, v in value.items()}
    return section(**value)
