"""``cnnkit predict``: classify image files and folders, printed in the book's format, and the
book's ``Enter filename:`` loop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
from pathlib import Path

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.model_files import (
    holds_a_model,
    path_test,
    refuse_a_run_without_a_model,
    refuse_search_folder,
    refuse_what_is_no_model,
)
from cnnkit.errors import error_line
from cnnkit.paths import has_run_info

# Files of PyTorch's own format, as cnnkit's checkpoints are (never a cnnkit model file).
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def expand_images(paths: list[str], errors: list[str] | None = None) -> list[Path]:
    """Files as given, folders expanded to the image files inside them (sorted; hidden ones
    left out).

    Raises:
        CommandError: for a folder with no image files in it, unless ``errors`` is given: then
            the message is appended to it and the other paths are still expanded.
    """
    from cnnkit.data.folder import walk_images
    from cnnkit.data.image import IMAGE_SUFFIXES

    expanded: list[Path] = []
    for text in paths:
        message = None
        try:
            path = Path(text).expanduser()
            if path.is_dir():
                # As a folder dataset reads one: hidden files and folders are left out.
                found = [path / name for name in walk_images(str(path), [])]
                if not found:
                    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                    message = f"{path}: no image files found (looked for {suffixes})"
                expanded.extend(found)
            else:
                expanded.append(path)
        # A name the system cannot look up (~nosuchuser/a.png, one too long, a NUL in it).
        except (OSError, ValueError, RuntimeError) as error:
            reason = error_line(error)
            if isinstance(error, OSError) and error.strerror:
                reason = error.strerror
            message = f"{text}: cannot read ({reason})"
        if message is not None:
            if errors is None:
                raise CommandError(message)
            errors.append(message)
    return expanded


def format_prediction(prediction, kind: str) -> str:
    """The book's formats: symbols with a 0-1 confidence, photos with a percentage."""
    if kind == "photos":
        return f"Prediction: {prediction.label} ({prediction.confidence * 100:.2f}%)"
    return f"Prediction: {prediction.label}, confidence: {prediction.confidence:.2f}"


def command_predict(args: argparse.Namespace) -> int:
    from cnnkit.runtime import tune_allocator

    tune_allocator()
    inputs = list(args.inputs)
    model = args.model
    if model is None and inputs and inputs[0].lower().endswith((".safetensors", ".onnx")):
        model = inputs.pop(0)
    elif model is None and inputs and path_test(inputs[0], holds_a_model):
        model = inputs.pop(0)  # A training run's folder: open_predictor finds its model.
    elif model is None and inputs:
        # A name the system cannot look up is an image that cannot be read, reported below.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            _refuse_model_less_first_input(Path(inputs[0]).expanduser())
    if model:
        refuse_what_is_no_model(model)
    for given in inputs:
        _refuse_a_model_among_images(given, model)
    empty_folders: list[str] = []
    images = expand_images(inputs, empty_folders)
    if not images and empty_folders:
        raise CommandError(empty_folders[0])
    if not images and not args.interactive:
        raise CommandError("no images given (pass files or folders, or use --interactive)")
    from cnnkit.inference.predictor import open_predictor

    predictor = open_predictor(model, args.backend, device=args.device)
    if model is None:
        _warn_of_photos_for_the_symbol_model(images)
    for message in empty_folders:  # Reported like a missing file; the other images go on.
        print(f"error: {message}", file=sys.stderr)
    failures = len(empty_folders)
    if images:
        named = _names_its_images(inputs, images)
        failures += _predict_and_print(predictor, images, args.top_k, args.json, names=named)
    if args.interactive:
        failures += _interactive(predictor, args.top_k, args.json, model)
    return 1 if failures else 0


def _warn_of_photos_for_the_symbol_model(images: list[str], looked_at: int = 8) -> None:
    """The bundled model answers with a symbol for anything: say once when an input looks like
    a colour photo rather than a symbol drawn dark on light. Of the large colour images, the
    first ``looked_at`` are decoded to tell a photo from a drawing saved in colour."""
    from PIL import Image

    from cnnkit.data.image import accepted_formats
    from cnnkit.data.photos import PHOTO_MIN_SIDE

    for path in images:
        if looked_at <= 0:
            return
        if not Path(path).is_file():
            continue  # A FIFO would block the open; predicting reports what it is.
        try:
            with Image.open(path, formats=accepted_formats()) as image:
                if image.mode not in ("RGB", "RGBA", "CMYK", "YCbCr"):
                    continue
                if min(image.size) < PHOTO_MIN_SIDE:
                    continue
                looked_at -= 1
                size, drawing = image.size, _looks_drawn(image)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # Reported when it is predicted.
        if not drawing:
            print(
                f"warning: {path} is a {size[0]}x{size[1]} colour image; the bundled model "
                "recognises handwritten maths symbols (black on white), so its answer for a "
                "photo means little: pass a model trained on photos",
                file=sys.stderr,
            )
            return


def _looks_drawn(image) -> bool:
    """Whether ``image`` (RGB, with or without alpha) is a drawing saved in colour, as paint
    programs save one: nearly grey everywhere, and mostly light (transparent counts as white,
    as it is predicted)."""
    import numpy as np
    from PIL import Image

    image.draft("RGB", (128, 128))  # A JPEG decodes at a fraction of its size.
    small = image.convert("RGBA" if image.mode == "RGBA" else "RGB").convert("RGBA")
    small.thumbnail((128, 128))
    white = Image.new("RGBA", small.size, (255, 255, 255, 255))
    pixels = np.asarray(Image.alpha_composite(white, small).convert("RGB"), dtype=np.int16)
    colour = (pixels.max(axis=2) - pixels.min(axis=2)).mean()
    light = (pixels.mean(axis=2) > 200).mean()
    return bool(colour < 16 and light > 0.5)


def _refuse_model_less_first_input(path: Path) -> None:
    """Without ``--model`` the first input is an image (the bundled model answers), so refuse
    one that was meant as a model: predictions from the bundled model would pass for its."""
    refuse_search_folder(path)  # Not a folder of images to classify.
    refuse_a_run_without_a_model(path)
    from cnnkit.data.image import IMAGE_SUFFIXES

    suffix = path.suffix.lower()
    if not path.exists() and suffix not in IMAGE_SUFFIXES:
        raise CommandError(
            f"{path}: no such model file, run folder or image (a model ends in .safetensors "
            "or .onnx; a run folder holds model.safetensors)"
        )
    if path.is_file() and suffix in CHECKPOINT_SUFFIXES:
        model = path.parent / "model.safetensors"
        use = f"{model} (or {path.parent})" if model.is_file() else "a run's model.safetensors"
        raise CommandError(f"{path}: a checkpoint (training state), not a model file: give {use}")
    if path.is_file() and suffix not in IMAGE_SUFFIXES and not _opens_as_image(path):
        # A model of another tool (Keras' .h5) would otherwise be an unreadable image, and
        # the bundled model would answer for the images after it.
        raise CommandError(
            f"{path}: neither a cnnkit model nor an image (a model file ends in .safetensors "
            "or .onnx; a run folder holds model.safetensors)"
        )


def _opens_as_image(path: Path) -> bool:
    """Whether Pillow reads ``path``'s header as an image of a format cnnkit accepts."""
    from PIL import Image

    from cnnkit.data.image import accepted_formats

    try:
        with Image.open(path, formats=accepted_formats()):
            return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _refuse_a_model_among_images(path: str, model: str | None) -> None:
    """A model file, checkpoint or run folder among the images is a mistake (arguments swapped,
    or a second model): reading it as an image, or its pictures, would answer with another
    model's predictions."""
    chosen = f"the model is {model}" if model else "no model was given, so the bundled one answers"
    first = "the model goes first (cnnkit predict MODEL IMAGE...) or after --model"
    suffix = Path(path).suffix.lower()
    if suffix in (".safetensors", ".onnx") or path_test(path, _holds_a_run):
        kind = "a training run's folder" if path_test(path, Path.is_dir) else "a model file"
        raise CommandError(f"{path}: {kind}, not an image ({chosen}): {first}")
    if suffix in CHECKPOINT_SUFFIXES:
        raise CommandError(
            f"{path}: a checkpoint, not an image ({chosen}); a run's model is its "
            f"model.safetensors, and {first}"
        )


def _holds_a_run(folder: Path) -> bool:
    """A finished run's folder (its model), or one of a run that has not finished (its
    run.json, written when it started)."""
    return holds_a_model(folder) or has_run_info(folder)


def _names_its_images(given: list[str], images: list[Path]) -> bool:
    """Whether each text line names its image: unless exactly one image file was named, since
    with several names, or a folder, a line without one cannot be told apart. ``images`` are
    what ``given`` expanded to (so ``given[0]`` expands where ``images`` is not empty)."""
    return len(given) > 1 or (bool(images) and images != [Path(given[0]).expanduser()])


# Files predicted in one call: a folder's images go through in batches (as fast as the Python
# API), and each batch's lines are printed as it ends.
PREDICT_CHUNK = 64


def _ranked_or_errors(predictor, images: list[Path], top_k: int):
    """``(path, ranked predictions or an error line)`` for each image, in order: a batch at a
    time, and image by image in a batch with a file that cannot be read."""
    for start in range(0, len(images), PREDICT_CHUNK):
        chunk = images[start : start + PREDICT_CHUNK]
        batch = None
        if len(chunk) > 1:
            with contextlib.suppress(Exception):  # Each file again, for its own error line.
                batch = predictor.predict(chunk, top_k=top_k)
        for index, path in enumerate(chunk):
            ranked = batch[index] if batch is not None else _ranked_or_error(predictor, path, top_k)
            if not isinstance(ranked, str) and not all(
                math.isfinite(prediction.confidence) for prediction in ranked
            ):
                ranked = (
                    f"error: {path}: the model gives no finite probabilities (NaN): its "
                    "weights or preprocessing are broken"
                )
            yield path, ranked


def _ranked_or_error(predictor, path: Path, top_k: int):
    """One image's ranked predictions, or the error line for a file that cannot be read."""
    from cnnkit.data.image import BadImageError

    try:
        return predictor.predict([path], top_k=top_k)[0]
    except BadImageError as error:
        return f"error: {error}"
    except (OSError, ValueError) as error:  # A name the system cannot open (a NUL in it).
        return f"error: {path}: cannot read ({error_line(error)})"


def _predict_and_print(
    predictor,
    images: list[Path],
    top_k: int,
    as_json: bool,
    errors=None,
    one_line=False,
    *,
    names: bool,
) -> int:
    """Print the predictions for ``images`` and an error line for each bad file (to ``errors``,
    stderr by default); return the number of bad files. ``one_line`` prints the JSON document
    on one line (the interactive loop: one line of JSON per answer, as JSON Lines). ``names``
    starts each text line with its image's path (see :func:`_names_its_images`). Text lines
    are printed as each batch ends; the JSON document once every image is done."""
    errors = errors or sys.stderr
    kind = predictor.metadata.kind
    results, failures = [], 0
    for index, (path, ranked) in enumerate(_ranked_or_errors(predictor, images, top_k)):
        if isinstance(ranked, str):
            failures += 1
            print(ranked, file=errors)
        elif as_json:
            results.append((path, ranked))
        else:
            prefix = f"{path}: " if names else ""
            print(prefix + format_prediction(ranked[0], kind))
            for rank, prediction in enumerate(ranked[1:], start=2):
                line = format_prediction(prediction, kind).removeprefix("Prediction: ")
                print(f"  {rank}. {line}")
        if (index + 1) % PREDICT_CHUNK == 0:
            sys.stdout.flush()
    if as_json:
        # Always one JSON document (``[]`` when every file was bad), so stdout always parses.
        payload = [
            {"image": str(path), "predictions": [p.to_dict() for p in ranked]}
            for path, ranked in results
        ]
        indent = None if one_line else 2
        print(json.dumps(payload, indent=indent, ensure_ascii=False, allow_nan=False))
    return failures


def _ask(prompt: str, to_stderr: bool) -> str:
    """``input(prompt)``, or with the prompt on stderr so that stdout stays pure JSON."""
    if not to_stderr:
        return input(prompt)
    print(prompt, end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def _interactive(predictor, top_k: int, as_json: bool, model: str | None = None) -> int:
    """The book's ``Enter filename:`` loop; an empty line or end of input ends it.

    A bad name prints an error in the conversation and the loop goes on (with ``--json`` the
    prompts and errors go to stderr, and stdout holds one line of JSON per name: ``[]`` for a
    name that gave no predictions). Quotes or backslashes around a name (a file dragged into a
    terminal) and ``~`` are understood, and a folder gives every image in it; a model file or a
    run's folder is refused, as among the images on the command line. Returns the number
    of names and files that failed, so that names piped in end with the same exit status as
    files given on the command line.
    """
    print("Enter image files or folders, one per line; an empty line ends.", file=sys.stderr)
    errors = sys.stderr if as_json else sys.stdout
    failures = 0
    while True:
        try:
            name = _ask("Enter filename: ", to_stderr=as_json)
        except EOFError:
            break
        name = _typed_name(name)
        if not name:
            break
        try:  # A model file or run folder typed in is refused, as on the command line.
            _refuse_a_model_among_images(name, model)
        except CommandError as error:
            print(f"error: {error}", file=errors)
            failures += 1
            if as_json:
                print("[]")
            continue
        problems: list[str] = []
        images = expand_images([name], problems)
        for problem in problems:
            print(f"error: {problem}", file=errors)
        failures += len(problems)
        if images or as_json:  # With --json, one line per name.
            named = _names_its_images([name], images)
            failures += _predict_and_print(
                predictor, images, top_k, as_json, errors, one_line=True, names=named
            )
    return failures


def _typed_name(line: str) -> str:
    """The file a typed line names: without surrounding quotes, or as the shell reads it where
    only that exists (macOS Terminal escapes a dragged file's spaces: ``my\\ sym.png``)."""
    name = line.strip().strip("'\"").strip()
    if not name or path_test(name, Path.exists):
        return name
    try:
        words = shlex.split(line)
    except ValueError:  # An unclosed quote.
        return name
    if len(words) == 1 and path_test(words[0], Path.exists):
        return words[0]
    return name
