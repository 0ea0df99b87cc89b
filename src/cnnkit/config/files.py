"""Config files and plain data: reading a YAML file into overrides, and writing a RunConfig back
as YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from cnnkit.config.overrides import did_you_mean
from cnnkit.config.sections import SECTIONS, RunConfig
from cnnkit.errors import error_line


def config_to_dict(config: Any) -> dict[str, Any]:
    """Turn a (nested) config dataclass into plain YAML-safe data."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def yaml_error_text(error: yaml.YAMLError) -> str:
    """A YAML parse error on one line: ``invalid YAML (line 2, column 7: <problem>)``."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(error, "problem", None) or error_line(error)
    return f"invalid YAML ({where}{problem})"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into nested overrides.

    Raises:
        ValueError: if the file cannot be read or is not a mapping.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as error:
        raise ValueError(f"{path}: {yaml_error_text(error)}") from error
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read config: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config must be a mapping of sections")
    for section, value in data.items():
        if section != "out" and section not in SECTIONS:
            raise ValueError(
                f"{path}: unknown section {section!r}{did_you_mean(section, [*SECTIONS, 'out'])}"
                f"; expected one of {[*SECTIONS, 'out']}"
            )
        if section == "out" and value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: out must be text (a folder path); got {value!r}")
        if section != "out" and value is not None and not isinstance(value, dict):
            raise ValueError(
                f"{path}: section {section!r} must be a mapping of fields; got {value!r}"
            )
    return data


def dump_config(config: RunConfig) -> str:
    """Serialise a RunConfig as YAML."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
