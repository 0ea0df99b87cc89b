"""What a training run's folder holds: its outputs, config.yaml and run.json, the checkpoint
``--resume`` continues, and clearing an earlier run's outputs before a fresh run writes its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnnkit import __version__
from cnnkit.atomic import write_atomically
from cnnkit.config import RunConfig, dump_config
from cnnkit.data.folder import SPLIT_FOLDERS, is_image_name
from cnnkit.evaluation.report import resolved
from cnnkit.models.registry import is_transfer_model, model_options
from cnnkit.paths import RUN_INFO, SKIPPED_LIST, has_run_info, is_search_folder, member_folders
from cnnkit.training.checkpoint import CHECKPOINT_NAME, CheckpointError

logger = logging.getLogger(__name__)

MODEL_NAME = "model.safetensors"


# What cnnkit writes into a run folder: train (and a transfer run's phases), evaluate's default
# report, report, export's default file names, and the demo's samples. The feature cache
# (``features/``) is kept: its entries are keyed by their inputs.
RUN_OUTPUTS = (
    CHECKPOINT_NAME,
    "config.yaml",
    "evaluation",
    # evaluate's reports on the run's exports (below), which go with them.
    "evaluation-model.onnx",
    "evaluation-model-int8.onnx",
    "finetune",
    "frozen",
    "metrics.csv",
    MODEL_NAME,
    "model.onnx",
    "model-int8.onnx",
    "phases.json",
    "report",
    "report.html",
    RUN_INFO,
    "samples",
    SKIPPED_LIST,
    "tensorboard",
)


# What export, evaluate and report make from the run's model file: stale once a resumed run
# saves a new one.
MODEL_EXPORTS = (
    "evaluation",
    "evaluation-model.onnx",
    "evaluation-model-int8.onnx",
    "model.onnx",
    "model-int8.onnx",
    "report.html",  # `cnnkit report`'s page, of the replaced model's test report.
)


# The files cnnkit writes in the folders of a run (temporaries of atomic writes included).
_OUTPUT_FILE = re.compile(
    r"(events\.out\.tfevents\..*"  # TensorBoard, in tensorboard/ and its phase folders
    r"|metrics\.(json|csv)|per_class\.csv|confused_pairs\.csv|confusion\.png"
    r"|misclassified\.png|checkpoint\.pt|test-.*\.png|\..*\.tmp)"
)


def git_revision() -> str:
    """The git commit of the cnnkit source tree, or ``unknown`` outside a checkout of it (an
    install inside another project's repository, whose commit is not cnnkit's)."""
    here = Path(__file__).resolve()

    def git(*arguments: str) -> str | None:
        try:
            output = subprocess.run(
                ["git", *arguments], cwd=here.parent, capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return output.stdout.strip() if output.returncode == 0 else None

    if git("ls-files", "--error-unmatch", here.name) is None:
        return "unknown"  # This file is not tracked: not cnnkit's own checkout.
    return git("rev-parse", "HEAD") or "unknown"


def with_model_defaults(config: RunConfig) -> RunConfig:
    """``config`` with every option of its model, the defaults included: read back with
    ``--config``, it builds the same network whatever preset the reading picks (a preset
    would otherwise fill the options left out with its own)."""
    options = {**model_options(config.model.name), **config.model.options}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, options=options))


def recorded_config(config: RunConfig) -> RunConfig:
    """``config`` as a run records it (``config.yaml``, ``run.json``): with every option of its
    model (:func:`with_model_defaults`), and its data, cache and run folder as absolute paths,
    so that ``--config`` reads back the same run from any folder."""
    config = with_model_defaults(config)
    data = dataclasses.replace(
        config.data, data=resolved(config.data.data), cache_dir=resolved(config.data.cache_dir)
    )
    return dataclasses.replace(config, data=data, out=resolved(config.out))


def write_run_info(run_dir: Path, config: RunConfig, extra: dict[str, Any]) -> None:
    """Write ``config.yaml`` (the resolved settings, see :func:`recorded_config`) and
    ``run.json`` (version, git revision, timings, metrics)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = dump_config(recorded_config(config))
    write_atomically(
        run_dir / "config.yaml", lambda path: path.write_text(config_text, encoding="utf-8")
    )
    info = {
        "cnnkit_version": __version__,
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
        **extra,
    }
    text = json.dumps(info, indent=2, default=str) + "\n"
    write_atomically(run_dir / RUN_INFO, lambda path: path.write_text(text, encoding="utf-8"))


def data_roots(config: RunConfig) -> list[Path]:
    """Where the training data lives: a CSV's folder (its paths are relative to it), or the
    archive or folder itself."""
    if not config.data.data:
        return []
    data = Path(config.data.data)
    return [data.parent if data.suffix.lower() == ".csv" else data]


def refuse_run_dir_inside_folder_data(run_dir: Path, config: RunConfig) -> None:
    """A folder dataset is every image under its folder, so a run folder inside it would add
    the run's report images to the next run's data (as a class named ``report``)."""
    refuse_inside_folder_data(
        run_dir,
        config.data.dataset,
        config.data.data,
        f"--out {run_dir} is inside the training data folder {config.data.data}: its report "
        "images would become training images; write the run elsewhere",
    )


def refuse_inside_folder_data(
    folder: Path, dataset: str | None, data: str | None, message: str
) -> None:
    """Raise ValueError(``message``) where ``folder`` is a folder dataset's folder (``data``)
    or lies inside it: every image written there becomes an image of the dataset."""
    if dataset != "folder" or not data:
        return
    root, out = Path(data).resolve(), folder.resolve()
    if out == root or root in out.parents:
        raise ValueError(message)


def refuse_run_dir_beside_data(run_dir: Path, config: RunConfig) -> None:
    """Refuse a run or search folder whose files would become images of a dataset: one inside
    the folder dataset it trains on, or one that looks like an image dataset itself.

    Raises:
        ValueError: naming the folder and why.
    """
    refuse_run_dir_inside_folder_data(run_dir, config)
    refuse_image_dataset_as_run_dir(run_dir, data_roots(config))


def refuse_image_dataset_as_run_dir(run_dir: Path, data: Sequence[Path] = ()) -> None:
    """Refuse a run folder that holds no cnnkit run or search but looks like a folder-per-class
    image dataset (a subfolder that directly holds images): the run's ``report/`` and
    ``tensorboard/`` would become classes of that dataset, and its next training would fail on
    them or learn them. A folder that holds the run's own training data (``data``: a CSV beside
    its ``samples/``, say) is the user's working folder, not a dataset to keep apart.

    Raises:
        ValueError: naming the folder and a class folder found in it.
    """
    if holds_a_run(run_dir) or is_search_folder(run_dir):
        return
    out = run_dir.resolve()
    roots = [Path(root).resolve() for root in data]
    if any(out == root or out in root.parents for root in roots):
        return
    class_folder = _first_image_folder(run_dir) or _first_split_class_folder(run_dir)
    if class_folder is not None:
        raise ValueError(
            f"--out {run_dir} looks like an image dataset (its class folder {class_folder}/ holds "
            "images): cnnkit's report/ and tensorboard/ folders would become classes of that "
            "dataset; write the run elsewhere"
        )


def _first_image_folder(folder: Path) -> str | None:
    """The first subfolder of ``folder``, by name, that directly holds an image file (hidden
    ones skipped, as a folder dataset skips them), or None; also for a missing or unreadable
    folder, which other checks name. Cheap on a huge dataset: it reads the subfolders' own
    entries only, and stops at the first image."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return None
    return next((name for name in names if _holds_an_image(folder / name)), None)


def _first_split_class_folder(folder: Path) -> str | None:
    """For a dataset split into folders (``train/<class>/``, ``test/<class>/``...), the first
    class folder of a split folder that holds images, as ``train/cat``; else None."""
    try:
        with os.scandir(folder) as entries:
            splits = sorted(
                e.name for e in entries if e.name.lower() in SPLIT_FOLDERS and e.is_dir()
            )
    except OSError:
        return None
    for name in splits:
        inner = _first_image_folder(folder / name)
        if inner is not None:
            return f"{name}/{inner}"
    return None


def _holds_an_image(folder: Path) -> bool:
    """Whether ``folder`` itself (not its subfolders) holds a file named like an image."""
    try:
        with os.scandir(folder) as entries:
            return any(
                is_image_name(e.name) and not e.name.startswith(".") and not e.is_dir()
                for e in entries
            )
    except OSError:
        return False


def find_checkpoint(run_dir: Path, transfer: bool | None = None) -> Path | None:
    """The checkpoint ``--resume`` continues from: the run's, or a transfer run's fine-tune's
    (an ensemble's: the latest member's). ``transfer``: look only for a model trained from
    scratch's (False) or only for a transfer model's (True); None: for either."""
    own = [run_dir / CHECKPOINT_NAME]
    folders = [*reversed(member_folders(run_dir)), run_dir / "finetune"]
    phases = [folder / CHECKPOINT_NAME for folder in folders]
    candidates = {None: own + phases, False: own, True: phases}[transfer]
    return next((path for path in candidates if path.is_file()), None)


def checkpoint_to_resume(config: RunConfig) -> Path | None:
    """The checkpoint ``--resume`` continues for a run of ``config`` in its run folder, if any.

    Raises:
        CheckpointError: if the folder holds only the other kind of model's checkpoint (a
            transfer run's fine-tune, for a model trained from scratch, or the reverse), or a
            fine-tune's for a transfer run without a fine-tune phase: the run would start
            from scratch beside the other run's files, as if it were resumed.
    """
    run_dir, name = config.run_dir(), config.model.name
    transfer = is_transfer_model(name)
    found = find_checkpoint(run_dir, transfer)
    other = find_checkpoint(run_dir, not transfer)
    if found is None and other is not None:
        kinds = ("a model trained from scratch", "a pretrained (transfer) model")
        raise CheckpointError(
            f"{other}: the checkpoint of {kinds[not transfer]}, and {name} is "
            f"{kinds[transfer]}; resume with the model it trained (in {run_dir / 'config.yaml'}), "
            "or train into a new --out"
        )
    if found is not None and transfer and "finetune" not in config.transfer.phases:
        raise CheckpointError(
            f"{found}: a fine-tune's checkpoint, and this run has no fine-tune phase "
            f"(phases: {', '.join(config.transfer.phases)}); resume with the phases it was "
            "trained with, or train into a new --out"
        )
    return found


def _only_cnnkit_files(folder: Path) -> bool:
    """Whether every file under ``folder`` is named like one cnnkit writes there."""
    return all(
        _OUTPUT_FILE.fullmatch(path.name)
        for path in folder.rglob("*")
        if path.is_file() or path.is_symlink()
    )


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a cnnkit training run: its run.json, model or checkpoint."""
    if (run_dir / MODEL_NAME).is_file() or (run_dir / CHECKPOINT_NAME).is_file():
        return True
    return has_run_info(run_dir)


def clear_run_outputs(run_dir: Path, keep: Sequence[str | Path] = ()) -> list[str]:
    """Remove an earlier cnnkit run's outputs from ``run_dir`` before a fresh run writes its
    own, so that no old report, TensorBoard curve, export or sample sits beside the new model.

    Nothing is removed from a folder that holds no cnnkit run (``--out .`` in a folder of
    one's own), no folder that holds a path of ``keep`` or lies inside one (the training
    data's folder), and nothing not named like one of cnnkit's outputs. A link is removed,
    never what it points to.

    Returns:
        The names removed.
    """
    if not holds_a_run(run_dir):
        return []
    names = (*RUN_OUTPUTS, *(folder.name for folder in member_folders(run_dir)))
    return _remove_outputs(run_dir, names, keep, "the earlier run's")


def clear_model_exports(run_dir: Path, keep: Sequence[str | Path] = ()) -> list[str]:
    """Remove the exports and evaluation reports of the run's model file before a new one is
    saved (a resumed run's), so that ``model.onnx`` never stands for older weights than
    ``model.safetensors`` beside it. ``keep`` as for :func:`clear_run_outputs`.

    Returns:
        The names removed.
    """
    # A warning: nothing else tells the user that a resume removed files they made.
    return _remove_outputs(run_dir, MODEL_EXPORTS, keep, "the older model's", logging.WARNING)


def _remove_outputs(
    run_dir: Path,
    names: Sequence[str],
    keep: Sequence[str | Path],
    whose: str,
    level: int = logging.INFO,
) -> list[str]:
    """Remove ``names`` from ``run_dir`` as :func:`clear_run_outputs` says; ``whose`` names
    them in the log ("the earlier run's"), whose line about the removed ones has ``level``."""
    kept = [Path(path).resolve() for path in keep]
    removed, left = [], []
    for name in names:
        path = run_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()  # A file of cnnkit's own (none is an image), or a link to anything.
        elif path.is_dir():
            resolved = path.resolve()
            holds_data = any(
                k == resolved or resolved in k.parents or k in resolved.parents for k in kept
            )
            if holds_data or not _only_cnnkit_files(path):
                left.append(name)
                continue
            shutil.rmtree(path)
        else:
            continue
        removed.append(name)
    if left:
        logger.warning(
            "%s: left %s %s as they are: they hold the training data or files cnnkit did not write",
            run_dir,
            whose,
            ", ".join(left),
        )
    if removed:
        logger.log(level, "removed %s %s from %s", whose, ", ".join(removed), run_dir)
    return removed
