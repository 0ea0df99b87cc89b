"""Config files and plain data: reading a YAML file into overrides, and writing a RunConfig back
as YAML."""

from __future__ import annotations

import dataclasses
import os
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


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_repeated_keys(loader: yaml.SafeLoader, root: yaml.Node) -> None:
    """Raise where one mapping of the parsed tree gives a key twice, where the later one would
    win in silence (``epochs: 3`` and, further down, ``epochs: 4``).

    It reads the node tree before anything is built, so merge keys (``<<: *defaults``), which
    PyYAML folds into their mapping while building it, are neither keys here nor repeats of
    the keys they bring in."""
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in visited:  # An alias: the same node again (it may even contain itself).
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in node.value:
                stack.append(value_node)
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue  # A merge, or a key that is itself a collection (rare, unhashable).
                # A scalar, as YAML reads it: 4 and 0x4 are one key, 4 and "4" two.
                key = loader.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)


def load_yaml(text: str) -> Any:
    """Parse a settings file's YAML safely, refusing a key given twice in one mapping.

    Raises:
        yaml.YAMLError: for text that is not YAML, or a repeated key (with its line).
    """
    loader = yaml.SafeLoader(text)  # It builds no objects, only YAML's own types.
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _refuse_repeated_keys(loader, root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


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
        data = load_yaml(path.read_text(encoding="utf-8"))
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
    return _home_expanded(data)


def _home_expanded(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``~`` expanded in its paths (out, data.data, data.cache_dir), as a shell
    expands it on the command line: nothing expands it in a file."""
    expanded = dict(data)
    if isinstance(data.get("out"), str):
        expanded["out"] = os.path.expanduser(data["out"])
    if isinstance(data.get("data"), dict):
        expanded["data"] = {
            key: os.path.expanduser(value)
            if key in ("data", "cache_dir") and isinstance(value, str)
            else value
            for key, value in data["data"].items()
        }
    return expanded


def dump_config(config: RunConfig) -> str:
    """Serialise a RunConfig as YAML."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
