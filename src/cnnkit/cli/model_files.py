"""The model a command reads: a file, a training run's folder or the bundled model, with the
mistakes (a search folder, an architecture name) refused in a line that says what to pass.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from cnnkit.cli.arguments import DATASETS, CommandError
from cnnkit.paths import is_search_folder, read_run_info


def resolve_model_argument(path: str | None) -> Path:
    """The model file a command means: a file, a training run's folder (its
    model.safetensors), or with none the bundled model; a search folder is refused."""
    from cnnkit.inference.predictor import resolve_model_path

    if path:
        refuse_what_is_no_model(path)
    return resolve_model_path(path or None)


def refuse_what_is_no_model(path: str) -> None:
    """Refuse, with what to give instead, a model argument that names a search folder, a run
    with no model yet, or an architecture."""
    refuse_search_folder(Path(path))
    refuse_a_run_without_a_model(Path(path))
    refuse_an_architecture_name(path)


def refuse_a_run_without_a_model(folder: Path) -> None:
    """A training run's folder with no model.safetensors yet: say why, from its run.json
    (written when a run starts), and what to do."""
    if not folder.is_dir() or (folder / "model.safetensors").is_file():
        return
    info = read_run_info(folder)
    if info is None:
        return
    status = info.get("status")
    if status in ("diverged", "failed"):
        # The run's own error says what to change (a diverged run's: a lower learning rate).
        why = f"the run {status}: {info.get('error') or 'see its run.json'}"
    elif status == "pruned":
        why = "a search pruned this trial before it finished, so it saved no model"
    elif status == "finished":
        why = "the run finished, but its model file has since been removed"
    else:
        why = (
            "the run has not finished: `cnnkit train ... --resume` with the same --out continues it"
        )
    raise CommandError(f"{folder}: a training run's folder without a model.safetensors ({why})")


def refuse_an_architecture_name(path: str) -> None:
    """``--model symbol_cnn`` means an architecture to train, not a file to read: say so."""
    from cnnkit.models.registry import list_models

    if path in list_models() and not Path(path).exists():
        raise CommandError(
            f"{path}: an architecture name, not a trained model: give a model file "
            f"(.safetensors or .onnx) or a training run's folder (`cnnkit train --model {path}` "
            "trains one)"
        )


def refuse_search_folder(folder: Path) -> None:
    """A search folder holds one model per trial: say which to pass instead."""
    if not is_search_folder(folder):
        return
    best = folder / "best" / "model.safetensors"
    hint = (
        str(best)
        if best.is_file()
        else f"{folder / 'trials' / 'trial-NNN' / 'model.safetensors'} (the best trial is "
        f"ranked first in {folder / 'results.md'}), or rerun the search with --retrain-best"
    )
    raise CommandError(f"{folder} is a search folder, not a model: pass {hint}")


def use_recorded_data(args: argparse.Namespace, model_path: Path) -> None:
    """Without ``--dataset``, evaluate on the data the model file records it trained on (its
    dataset, data path and fold; the split settings follow in evaluate), and say so."""
    if model_path.suffix.lower() == ".onnx":  # An export keeps its model file's metadata.
        from cnnkit.inference.onnx_backend import OnnxPredictor

        training = OnnxPredictor.from_file(model_path, threads=1).metadata.training
    else:
        from cnnkit.inference.artifact import ModelMetadata, read_metadata

        training = ModelMetadata.from_dict(read_metadata(model_path), str(model_path)).training
    dataset = training.get("dataset")
    if dataset not in DATASETS:
        raise CommandError(
            f"--dataset is required: {model_path} does not record the data it was trained on"
        )
    data = args.data or training.get("data")
    if data is None and dataset != "digits":
        raise CommandError(
            f"--data is required: {model_path} was trained on {dataset} but does not record "
            "where that data is"
        )
    options = (("data", args.data), ("fold", args.fold))
    given = [f"--{name} {value}" for name, value in options if value is not None]
    args.dataset, args.data = dataset, data
    if args.fold is None:
        args.fold = training.get("fold")
    fold = f" fold {args.fold}" if args.fold is not None else ""
    where = f" ({data})" if data else ""
    source = (
        "as the model file records"
        if not given
        else (f"the dataset as the model file records, {' and '.join(given)} as given")
    )
    print(f"Data: {dataset}{fold}{where}, {source}", file=sys.stderr)


def path_test(text: str, test: Callable[[Path], bool]) -> bool:
    """``test(Path(text).expanduser())``, or False for a name the system cannot look up."""
    try:
        return test(Path(text).expanduser())
    except (OSError, ValueError, RuntimeError):
        return False


def holds_a_model(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file()


def resolved_model_file(text: str) -> Path:
    """The file a model argument names (a run folder: its model.safetensors), resolved, so
    that two spellings of one model compare equal."""
    from cnnkit.inference.artifact import resolve_model_file

    path = Path(text).expanduser()
    # A name the system cannot look up is compared as given.
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        path = resolve_model_file(path).resolve()
    return path
