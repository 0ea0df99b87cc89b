"""``cnnkit export``: a model file to ONNX, optionally int8-quantized on training images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.model_files import resolve_model_argument, use_recorded_data
from cnnkit.paths import default_cache_dir

CALIBRATION_IMAGES = 512  # Training images that calibrate --quantize int8 by default.
# The options only --quantize int8 reads: without it they would be ignored without a word.
CALIBRATION_OPTIONS = ("dataset", "data", "fold", "calibration_images", "cache_dir")


def command_export(args: argparse.Namespace) -> int:
    from cnnkit.inference.export import DEFAULT_OPSET, export_onnx

    model_path = resolve_model_argument(args.model)
    if model_path.suffix.lower() == ".onnx":
        raise CommandError(
            f"{model_path}: is an ONNX export already; export reads the .safetensors model "
            "file (or the training run's folder) it came from"
        )
    from cnnkit.inference.bundled import is_bundled

    # The bundled model's export goes to the current folder, not into the installed package.
    named = Path(model_path.name) if is_bundled(model_path) else model_path
    opset = args.opset or DEFAULT_OPSET
    if args.out and Path(args.out).suffix.lower() != ".onnx":
        raise CommandError(f"--out {args.out}: an ONNX file's name ends in .onnx")
    if args.quantize is None:
        _refuse_calibration_options(args)
        out = Path(args.out) if args.out else named.with_suffix(".onnx")
        _refuse_unusable_out(model_path, out)
        print(export_onnx(model_path, out, opset=opset))
        return 0
    from cnnkit.config import DataConfig
    from cnnkit.inference.quantize import calibration_inputs, quantize_onnx

    if args.dataset is None:
        try:
            use_recorded_data(args, model_path)
        except CommandError as error:
            raise CommandError(
                f"--quantize int8 calibrates on training images: {error}{_shipped_int8(args)}"
            ) from None
    out = Path(args.out) if args.out else named.with_name(f"{named.stem}-int8.onnx")
    _refuse_unusable_out(model_path, out)  # Before the calibration images are decoded.
    data = DataConfig(dataset=args.dataset, data=args.data, fold=args.fold)
    count = args.calibration_images or CALIBRATION_IMAGES
    inputs = calibration_inputs(
        model_path, data, count, cache_dir=args.cache_dir or default_cache_dir()
    )
    source = args.data or args.dataset
    print(f"Calibrating int8 ranges on {len(inputs)} training images of {source}", file=sys.stderr)
    print(quantize_onnx(model_path, out, inputs, opset=opset))
    return 0


def _shipped_int8(args: argparse.Namespace) -> str:
    """Where the bundled model's int8 export already is, for ``export --quantize int8``
    without a model (or ``""``)."""
    from cnnkit.inference.bundled import bundled_int8_path

    shipped = bundled_int8_path() if args.model is None else None
    return f" (the bundled model's int8 export ships with cnnkit: {shipped})" if shipped else ""


def _refuse_unusable_out(model_path: Path, out: Path) -> None:
    """Refuse an ``out`` the export could not be written to, before the export's work: the
    model file itself, a folder, or a place where no file can be made."""
    from cnnkit.paths import refuse_unusable_folder

    if out.exists() and out.resolve() == model_path.resolve():
        raise CommandError(f"{out}: is the model file itself; give another --out")
    if out.is_dir():
        raise CommandError(f"{out}: is a folder; give the export's file name (ending in .onnx)")
    refuse_unusable_folder(out.parent, str(out.parent), needs=f"the export {out.name}")


def _refuse_calibration_options(args: argparse.Namespace) -> None:
    given = [
        "--" + name.replace("_", "-")
        for name in CALIBRATION_OPTIONS
        if getattr(args, name) is not None
    ]
    if given:
        raise CommandError(
            f"{', '.join(given)}: only --quantize int8 reads them (its calibration images); "
            "add --quantize int8, or leave them out"
        )
