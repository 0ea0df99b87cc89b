"""Where cnnkit keeps what it can recompute: decoded images, features, ONNX exports."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
    """``$CNNKIT_CACHE``, else ``$XDG_CACHE_HOME/cnnkit``, else ``~/.cache/cnnkit``."""
    if os.environ.get("CNNKIT_CACHE"):
        return Path(os.environ["CNNKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnkit"


# A search folder's settings file: its presence is what marks a folder as a search's.
SEARCH_SETTINGS = "search.yaml"
# A training run's record (status, data, timings, test figures), written when the run starts.
RUN_INFO = "run.json"
# The checkpoint a training run writes every epoch (cnnkit.training.checkpoint).
CHECKPOINT_NAME = "checkpoint.pt"
# The images a run left out under --on-bad-image skip, one a line (training.run_status).
SKIPPED_LIST = "skipped.txt"


def read_run_info(folder: str | Path) -> dict | None:
    """``folder``'s cnnkit ``run.json`` (one that names a cnnkit version: another tool's
    ``run.json`` is not a run's), or None."""
    try:
        info = json.loads((Path(folder) / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "cnnkit_version" in info else None


def has_run_info(folder: str | Path) -> bool:
    """Whether ``folder`` holds a cnnkit training run's ``run.json``."""
    return read_run_info(folder) is not None


def is_search_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a hyperparameter search (its ``search.yaml``)."""
    return (Path(folder) / SEARCH_SETTINGS).is_file()


def finetune_folder(member: int) -> str:
    """The run-folder subfolder of a transfer model's fine-tune: ``finetune`` for the first or
    only model, then ``finetune-2``, ``finetune-3``... for an ensemble's further members."""
    return "finetune" if member == 0 else f"finetune-{member + 1}"


def member_folders(run_dir: str | Path) -> list[Path]:
    """The fine-tune folders of an ensemble's further members in ``run_dir``, in order: only
    names :func:`finetune_folder` writes (``finetune-2`` on; not ``finetune-02`` or ``-1``)."""
    found = {}
    for path in Path(run_dir).glob("finetune-*"):
        suffix = path.name[len("finetune-") :]
        if suffix.isascii() and suffix.isdigit() and finetune_folder(int(suffix) - 1) == path.name:
            found[int(suffix)] = path
    return [found[number] for number in sorted(found) if number >= 2]


def refuse_unusable_folder(folder: Path, named: str | None = None, needs: str = "it") -> None:
    """Refuse ``folder`` before any work where it cannot be made or written: it, or a folder it
    would be made in, is a file, or the nearest existing folder takes no new entries (probed by
    making and removing an empty folder there). Otherwise the work would fail only at its end.

    Args:
        folder: the folder to be written.
        named: how the error names it (default: its path).
        needs: what needs the folder, for the message ("the report", "a run").

    Raises:
        ValueError: naming the file in the way or the folder that cannot be written.
    """
    named = named or str(folder)
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        problem = "is a file" if existing == folder else f"{existing} is a file"
        raise ValueError(f"{named}: {problem}; {needs} needs a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cnnkit-probe-", dir=existing))
    except OSError as error:
        raise ValueError(
            f"{named}: cannot write in {existing} ({error.strerror or error})"
        ) from None
