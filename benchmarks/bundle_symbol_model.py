"""Ship a fold-1 HASYv2 model as the package's bundled symbol model (float16), and its int8
ONNX export.

Measures the float16 copy on the fold's test split and records the figures, with the recipe
that trained it, in the model file's ``training`` metadata (``cnnkit predict`` uses the bundled
model when given none). Then quantizes that file to int8, calibrated on 512 of the fold's
training images, and scores the export on the same test split (``cnnkit serve`` runs it when
given no model and onnxruntime is installed).

    python -m benchmarks.hasy_recipe default --keep-model runs/fold1.safetensors
    python -m benchmarks.bundle_symbol_model runs/fold1.safetensors \\
        --recipe "cnnkit train --dataset hasy --data ../shared/data/HASYv2-dev.tar.bz2 --fold 1"
    python -m benchmarks.bundle_symbol_model --int8-only   # re-export the shipped model only
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from benchmarks.hasy_agreement import fold_splits
from benchmarks.record import record_result, shared_dataset
from cnnkit.config import DataConfig
from cnnkit.evaluation.evaluate import align_labels, predict_logits
from cnnkit.evaluation.metrics import topk_accuracy
from cnnkit.inference.artifact import load_model, save_model
from cnnkit.inference.bundled import BUNDLED_INT8_MODEL, bundled_model_path
from cnnkit.inference.onnx_backend import OnnxModule, OnnxPredictor
from cnnkit.inference.quantize import calibration_inputs, quantize_onnx


def write_int8_copy(model_path: Path, archive: Path, fold: int, out: Path) -> dict:
    """Quantize ``model_path`` to ``out``, calibrated on the fold's training images, and
    return the export's fold test scores."""
    data = DataConfig(dataset="hasy", data=str(archive), fold=fold)
    quantize_onnx(model_path, out, calibration_inputs(model_path, data, count=512))
    module = OnnxModule(OnnxPredictor.from_file(out))
    preprocessing = module.metadata.preprocessing
    splits = fold_splits(archive, preprocessing, fold)
    labels = torch.from_numpy(align_labels(splits.test, module.metadata.class_names, str(archive)))
    logits = predict_logits(module, splits.test, preprocessing, torch.device("cpu"))
    scores = {
        "int8_test_top1": topk_accuracy(logits, labels, 1),
        "int8_test_top5": topk_accuracy(logits, labels, 5),
        "int8_size_mb": out.stat().st_size / 1e6,
    }
    print(
        f"wrote {out} ({scores['int8_size_mb']:.1f} MB): fold {fold} top-1 "
        f"{scores['int8_test_top1']:.4f}, top-5 {scores['int8_test_top5']:.4f}"
    )
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a fold-K model file from the default recipe")
    parser.add_argument("--recipe", help="the command that trained it")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--out", default=str(bundled_model_path()), help="where to write it")
    parser.add_argument(
        "--int8-only",
        action="store_true",
        help="only export --out (the shipped model by default) to int8 beside it",
    )
    parser.add_argument(
        "--name",
        default="bundled_symbol_model",
        help="results file name (the int8 copy's: NAME_int8)",
    )
    args = parser.parse_args()
    archive = shared_dataset("HASYv2-dev.tar.bz2")
    int8_out = Path(args.out).with_name(BUNDLED_INT8_MODEL)
    if args.int8_only:
        scores = write_int8_copy(Path(args.out), archive, args.fold, int8_out)
        record_result(f"{args.name}_int8", {"source": args.out, **scores})
        return
    if not args.model or not args.recipe:
        parser.error("give the model file and --recipe (or --int8-only)")
    source = load_model(args.model)
    metadata = source.metadata
    with tempfile.TemporaryDirectory() as folder:
        half_path = save_model(Path(folder) / "half.safetensors", source, metadata, half=True)
        half = load_model(half_path).eval()
    splits = fold_splits(archive, metadata.preprocessing, args.fold)
    labels = torch.from_numpy(align_labels(splits.test, metadata.class_names, str(archive)))
    logits = predict_logits(half, splits.test, metadata.preprocessing, torch.device("cpu"))
    top1, top5 = topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)
    training = {
        "dataset": "hasy",
        "fold": args.fold,
        "epochs_run": metadata.training.get("epochs_run"),
        "test_top1": top1,
        "test_top5": top5,
        "recipe": args.recipe,
        "note": f"fold-{args.fold} model of the recipe, stored as float16",
    }
    bundled = dataclasses.replace(metadata, training=training)
    save_model(args.out, source, bundled, half=True)
    size = Path(args.out).stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB): fold {args.fold} top-1 {top1:.4f}, top-5 {top5:.4f}")
    scores = write_int8_copy(Path(args.out), archive, args.fold, int8_out)
    record = {"source": args.model, "size_mb": size, **training, **scores}
    record_result(args.name, record)


if __name__ == "__main__":
    main()
