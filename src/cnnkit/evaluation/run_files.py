"""Tolerant readers of a run folder's CSV, JSON, YAML and text files, for the HTML report.

A file that is absent reads as empty; one that cannot be read is named in a warning and its
section of the report is left out, so one bad file never costs the whole page.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def warn_unreadable(path: Path, error: Exception) -> None:
    """A file that is there but cannot be read: say so, as its section is left out."""
    if path.exists():
        logger.warning("%s: cannot be read (%s); the report leaves it out", path, error)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts; [] when it is absent or unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, ValueError, csv.Error) as error:
        warn_unreadable(path, error)
        return []
    # DictReader puts the fields past the header's under the key None, which no column shows.
    extra = [number for number, row in enumerate(rows, start=2) if None in row]
    if extra:
        logger.warning(
            "%s: line %d has more fields than the header; the report leaves them out",
            path,
            extra[0],
        )
    return [{key: value for key, value in row.items() if key is not None} for row in rows]


def as_mapping(value: Any, where: str) -> dict[str, Any]:
    """``value`` when it is a mapping, else {} with a warning: a well-formed file may still
    hold a list where a section of settings belongs, and its section is then left out."""
    if isinstance(value, dict):
        return value
    if value is not None:
        logger.warning("%s is not a mapping; the report leaves it out", where)
    return {}


def read_text(path: Path) -> str | None:
    """The file's UTF-8 text; None when it is absent or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        warn_unreadable(path, error)
        return None


def read_mapping(path: Path, text: str | None = None) -> dict[str, Any]:
    """A JSON file (``.json``) or YAML file (a run's ``config.yaml``, a search's settings) as a
    mapping, from ``text`` when it was read already; {} when it is absent, and {} with a
    warning when it is unreadable or not a mapping."""
    import yaml

    text = read_text(path) if text is None else text
    if not text:
        return {}
    try:
        mapping = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        warn_unreadable(path, error)
        return {}
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        warn_unreadable(path, ValueError("not a mapping"))
        return {}
    return mapping


def retrained_from(best_dir: Path, trial_dir: Path) -> bool | None:
    """Whether the run in ``best_dir`` (a search's ``best/``) retrained the configuration of
    the trial in ``trial_dir``: their ``config.yaml`` agree but for the run folder and the
    validation share. None where either file is absent or unreadable.

    A continued search may find a better trial after an earlier one was retrained.
    """
    configs = []
    for folder in (best_dir, trial_dir):
        if not (folder / "config.yaml").is_file():
            return None
        config = read_mapping(folder / "config.yaml")
        if not config:
            return None
        data = dict(config.get("data") or {})
        data.pop("val_fraction", None)
        configs.append({**config, "out": None, "data": data})
    return configs[0] == configs[1]
