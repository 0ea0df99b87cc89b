"""A search's settings file ``RUN_DIR/search.yaml``, and the check that a continued search is
the same search as the one the folder holds."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit.config import RunConfig, config_to_dict
from cnnkit.errors import error_line
from cnnkit.paths import RUN_INFO, SEARCH_SETTINGS
from cnnkit.search.space import SearchSpace
from cnnkit.training.run_folder import refuse_run_dir_beside_data

if TYPE_CHECKING:
    from cnnkit.search.config import SearchConfig

# Base-config fields that say where a search runs, not what it compares: they may change.
WHERE_IT_RUNS = ("out", "train.device")


def check_same_search(
    run_dir: Path, base: RunConfig, space: SearchSpace, config: SearchConfig
) -> str | None:
    """Refuse to continue the search in ``run_dir`` with another space, sampler, pruner, base
    config, study name or storage: its trials would be ranked against trials of a different
    search, or a second study's trials would write over the first's trial folders.

    Returns:
        The study name ``RUN_DIR/search.yaml`` records (None for a new search), which a
        search continued without ``--study-name`` goes on with: also after the folder, whose
        name is the default, was renamed.

    Raises:
        ValueError: naming what differs from ``RUN_DIR/search.yaml``, or for a folder that
            looks like an image dataset or lies inside the folder dataset it searches on (its
            trials/ and tensorboard/ would become classes).
    """
    import yaml

    _check_folder(run_dir)
    refuse_run_dir_beside_data(run_dir, base)
    saved = _saved_settings(run_dir)
    if saved is None:
        return None
    # The settings this search would write, compared as written (tuples become lists).
    now = yaml.safe_load(yaml.safe_dump(search_settings(base, space, config)))
    saved_search = saved.get("search") or {}
    pairs = {
        "space": (now["space"], saved.get("space")),
        "sampler": (now["search"]["sampler"], saved_search.get("sampler")),
        "pruner": (now["search"]["pruner"], saved_search.get("pruner")),
        # None: the flag was left out, which continues with the recorded one.
        "study name": (config.study_name or saved.get("study_name"), saved.get("study_name")),
        "storage": (config.storage or saved.get("storage"), saved.get("storage")),
    }
    differs = [what for what, (current, before) in pairs.items() if current != before]
    if "pruner" not in differs:
        tuned = _changed_pruner_settings(now["search"], saved_search)
        differs += [f"pruner setting ({', '.join(tuned)})"] if tuned else []
    changed = _changed_keys(_compared(now["base_config"]), _compared(saved.get("base_config")))
    if changed:
        differs.append(f"base config ({', '.join(changed)})")
    if differs:
        raise ValueError(
            f"{run_dir} holds a search with another {' and '.join(differs)}; continue it with "
            "the same settings, or pass another --out"
        )
    return saved.get("study_name")


def _saved_settings(run_dir: Path) -> dict | None:
    """The settings ``RUN_DIR/search.yaml`` records, or None where the folder holds no search.

    Raises:
        ValueError: for a training run's folder, or a settings file that cannot be read.
    """
    import yaml

    path = run_dir / SEARCH_SETTINGS
    if not path.is_file():
        if (run_dir / RUN_INFO).is_file():
            raise ValueError(f"{run_dir} holds a training run, not a search: pass another --out")
        return None
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: unreadable ({error_line(error)})") from error
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: unreadable (not a mapping of settings)")
    return saved


# The settings each pruner reads (see build_pruner): a trial pruned under one warm-up would
# be ranked against trials that ran under another.
PRUNER_SETTINGS = {
    "halving": ("prune_warmup", "reduction_factor"),
    "median": ("prune_warmup", "median_startup_trials"),
    "none": (),
}


def _changed_pruner_settings(now: dict, saved: dict) -> list[str]:
    """The settings of the pruner ``now`` names that differ from ``saved`` (a setting the
    saved file lacks is taken as unchanged)."""
    names = PRUNER_SETTINGS.get(now.get("pruner"), ())
    return [
        f"{name} {saved[name]}, now {now.get(name)}"
        for name in names
        if name in saved and saved[name] != now.get(name)
    ]


def _check_folder(run_dir: Path) -> None:
    """Refuse a search folder that is a file, or lies inside one, before anything is made
    (``mkdir`` would say only "File exists").

    Raises:
        ValueError: naming the path.
    """
    existing = next((path for path in (run_dir, *run_dir.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        if existing == run_dir:
            raise ValueError(f"--out {run_dir} names a file, not a folder")
        raise ValueError(f"--out {run_dir}: {existing} is a file, not a folder")


def _compared(base_config: Any) -> dict:
    """A recorded base config without the fields of :data:`WHERE_IT_RUNS`."""
    compared = copy.deepcopy(base_config) if isinstance(base_config, dict) else {}
    for dotted in WHERE_IT_RUNS:
        *sections, name = dotted.split(".")
        node = compared
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return compared


def _changed_keys(now: Any, before: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested mappings."""
    if isinstance(now, dict) and isinstance(before, dict):
        changed = []
        for key in sorted(set(now) | set(before), key=str):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            changed += _changed_keys(now.get(key), before.get(key), dotted)
        return changed
    return [] if now == before else [prefix or "all of it"]


def search_settings(base: RunConfig, space: SearchSpace, config: SearchConfig) -> dict:
    """What ``RUN_DIR/search.yaml`` records of a search, besides its study's name and storage."""
    return {
        "search": dict(vars(config)),
        "space": space.to_dict(),
        "base_config": config_to_dict(base),
    }


def write_search_settings(
    run_dir: Path, base: RunConfig, space: SearchSpace, config: SearchConfig, name: str, url: str
) -> None:
    """``RUN_DIR/search.yaml``: the space, the search settings and the base config."""
    import yaml

    from cnnkit.atomic import write_atomically

    settings = {"study_name": name, "storage": url, **search_settings(base, space, config)}
    text = yaml.safe_dump(settings, sort_keys=False)
    write_atomically(run_dir / SEARCH_SETTINGS, lambda p: p.write_text(text, encoding="utf-8"))
