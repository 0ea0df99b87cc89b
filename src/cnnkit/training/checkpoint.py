"""Resumable training checkpoints, written atomically and read without unpickling code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cnnkit.atomic import write_atomically
from cnnkit.errors import error_line

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the run."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    write_atomically(Path(path), lambda temporary: torch.save(state, temporary))


def remove_checkpoints(run_dir: str | Path) -> None:
    """Delete every ``checkpoint.pt`` under ``run_dir``: the run's own and its phases' (a
    transfer run keeps the fine-tune's in ``RUN_DIR/finetune``)."""
    for path in Path(run_dir).rglob(CHECKPOINT_NAME):
        path.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; there is no pickle fallback.

    Raises:
        CheckpointError: if the file is unreadable.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty checkpoint file; delete it to start afresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files.
        detail = error_line(error)
        if detail.startswith("Weights only load failed"):
            # torch's advice (load with weights_only=False) would run code from the file.
            detail = "corrupt, or holds objects other than tensors; cnnkit never unpickles those"
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({detail}); delete it to start afresh"
        ) from error
