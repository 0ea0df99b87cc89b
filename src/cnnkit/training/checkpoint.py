"""Resumable training checkpoints, written atomically and read without unpickling code, and
the checks that a checkpoint matches the run resuming it (its data, its optimizer settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cnnkit.atomic import write_atomically
from cnnkit.config import TrainConfig
from cnnkit.errors import error_line
from cnnkit.paths import CHECKPOINT_NAME


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


# Warm-up then cosine or constant: a LambdaLR whose factor each run rebuilds from its own
# config, so switching between the two is honoured on resume; the one-cycle schedule is not.
_REBUILT_SCHEDULES = ("cosine", "constant")
# Keys of a saved optimizer's parameter groups that tell its kind and schedule apart (SGD,
# Adam or AdamW; one-cycle or not), for checkpoints older than the recorded settings.
_GROUP_MARKERS = ("momentum", "betas", "max_lr")


def optimization_settings(config: TrainConfig, grouped: bool) -> dict[str, Any]:
    """The settings a checkpoint's optimizer and scheduler state holds: resuming loads that
    state, whose values would win over this run's, so a resume must ask for the same ones.

    The schedule's length (epochs, steps per epoch) and warm-up are not among them: a resumed
    run rebuilds them from its own config, so ``--resume --epochs N`` trains on to epoch N.

    Args:
        config: the run's training settings.
        grouped: whether the model has parameter groups (only then does
            ``backbone_lr_scale`` set a learning rate).
    """
    settings = {
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "schedule": config.schedule,
    }
    if grouped:
        settings["backbone_lr_scale"] = config.backbone_lr_scale
    return settings


def _same_kind(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> bool:
    """Whether saved parameter groups come from the same kind of optimizer and schedule as
    ``current`` (a different count of groups is the model's mismatch, reported elsewhere)."""
    for old, new in zip(saved, current, strict=False):
        if any((key in old) != (key in new) for key in _GROUP_MARKERS):
            return False
        # AdamW's flag, where this and the checkpoint's torch both record it.
        key = "decoupled_weight_decay"
        if key in old and key in new and old[key] != new[key]:
            return False
    return True


def _short(value: Any) -> str:
    """A value for an error message: lists show their first items and length."""
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"{', '.join(map(str, value[:3]))}, ... ({len(value)} in all)"
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _changed(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys of ``current`` whose value differs from ``saved``'s; a key an older checkpoint
    did not record is taken to match."""
    return [key for key, value in current.items() if key in saved and saved[key] != value]


# Identity keys (see cnnkit.training.identity.run_identity): a digest of which images each split
# holds, and how many images a seeded split kept with an identical one.
SPLIT_KEY = "split"
COPIES_KEY = "copies_kept_together"
# The settings that draw a seeded split: recorded to name what changed when the split did,
# not compared themselves (where a split column or fold decides, they change nothing).
SPLIT_SETTINGS_KEY = "split_settings"


def check_identity(path: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint whose run trained on other data.

    Args:
        path: the checkpoint, named in the error.
        saved: the checkpoint's identity (its class names and what drew its splits).
        current: this run's identity.

    Raises:
        CheckpointError: naming each setting that differs, with both values.
    """
    advice = "resume with the same data, or train into a new --out"
    if SPLIT_KEY not in saved and current.get(COPIES_KEY):
        # Before splits kept copies of an image together, these copies were split apart: this
        # run's split cannot be the one the checkpoint trained on.
        raise CheckpointError(
            f"{path}: its run split the data before copies of an image were kept together, "
            f"and this data holds {current[COPIES_KEY]} copies, so its split has changed (the "
            "new test images would include images it trained on); train into a new --out"
        )
    changed = [
        key for key in _changed(saved, current) if key not in (COPIES_KEY, SPLIT_SETTINGS_KEY)
    ]
    if changed:
        details = ", ".join(
            "another split of the images (its training, validation or test images differ: "
            + _split_change(saved.get(SPLIT_SETTINGS_KEY), current.get(SPLIT_SETTINGS_KEY))
            + ")"
            if key == SPLIT_KEY
            else f"other {key} (the checkpoint's: {_short(saved[key])}; "
            f"this run's: {_short(current[key])})"
            for key in changed
        )
        raise CheckpointError(f"{path}: its run trained on {details}; {advice}")


def _split_change(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> str:
    """Which of the settings that draw a split differ, or the possible causes where none (or
    an older checkpoint that did not record them) says."""
    differing = [
        f"{key.replace('_', ' ')} {saved[key]} in the checkpoint, {current[key]} now"
        for key in _changed(saved or {}, current or {})
    ]
    if differing:
        return "; ".join(differing)
    return "another seed or split share, or the images themselves changed"


def check_epochs(path: str | Path, epochs_done: int, epochs: int) -> None:
    """Refuse to resume into fewer epochs than the checkpoint's run trained: the run's record
    would say fewer than its model had."""
    if epochs_done > epochs:
        raise CheckpointError(
            f"{path}: its run trained {epochs_done} epochs, more than this run's {epochs}; "
            f"resume with --epochs {epochs_done} or more, or train into a new --out"
        )


def check_optimization(
    path: str | Path,
    state: dict[str, Any],
    current: dict[str, Any],
    groups: list[dict[str, Any]],
) -> None:
    """Refuse to resume a checkpoint whose optimizer and scheduler state holds other settings
    than this run's: loading that state would silently keep the checkpoint's values.

    Args:
        path: the checkpoint, named in the error.
        state: the checkpoint's contents.
        current: this run's :func:`optimization_settings`.
        groups: this run's optimizer's parameter groups, its scheduler built.

    Raises:
        CheckpointError: naming each setting that differs, with both values; for a checkpoint
            from before the settings were recorded, when its optimizer or schedule is of
            another kind (SGD, Adam, AdamW; one-cycle or not).
    """
    check_optimization_settings(path, state, current)
    # Another optimizer used to fail mid-epoch (SGD: KeyError 'momentum') or go unnoticed.
    if not _same_kind(state["optimizer"].get("param_groups", []), groups):
        raise CheckpointError(
            f"{path}: its optimizer state comes from another --optimizer or --schedule than "
            f"this run's ({current['optimizer']}, {current['schedule']}); resume with the ones "
            "it was trained with, or start a fresh run (without --resume, or into a new --out)"
        )


def check_optimization_settings(
    path: str | Path, state: dict[str, Any], current: dict[str, Any]
) -> None:
    """The first part of :func:`check_optimization`, which needs no optimizer built: the
    recorded settings against this run's :func:`optimization_settings`."""
    saved = dict(state.get("optimization") or {})
    if saved.get("schedule") in _REBUILT_SCHEDULES and current["schedule"] in _REBUILT_SCHEDULES:
        saved["schedule"] = current["schedule"]
    changed = _changed(saved, current)
    if changed:
        kept = ", ".join(f"{key} {_short(saved[key])}" for key in changed)
        asked = ", ".join(f"{key} {_short(current[key])}" for key in changed)
        raise CheckpointError(
            f"{path}: its run trained with {kept}, which its optimizer state would keep, but "
            f"this run asks for {asked}; resume with the checkpoint's settings, or start a "
            "fresh run (without --resume, or into a new --out)"
        )
