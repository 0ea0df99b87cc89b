"""Ship a fold-1 HASYv2 model as the package's bundled symbol model (float16).

Measures the float16 copy on the fold's test split and records the figures, with the recipe
that trained it, in the model file's ``training`` metadata (``cnnkit serve`` and ``predict``
use the bundled model when given none).

    python -m benchmarks.hasy_recipe default --keep-model runs/fold1.safetensors
    python -m benchmarks.bundle_symbol_model runs/fold1.safetensors \\
        --recipe "cnnkit train --dataset hasy --data ../shared/data/HASYv2-dev.tar.bz2 --fold 1"
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from benchmarks.hasy_agreement import fold_splits
from benchmarks.record import record_result, shared_dataset
from cnnkit.evaluation.evaluate import align_labels, predict_logits
from cnnkit.evaluation.metrics import topk_accuracy
from cnnkit.inference.artifact import load_model, save_model
from cnnkit.inference.bundled import bundled_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a fold-K model file from the default recipe")
    parser.add_argument("--recipe", required=True, help="the command that trained it")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--out", default=str(bundled_model_path()), help="where to write it")
    args = parser.parse_args()
    archive = shared_dataset("HASYv2-dev.tar.bz2")
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
    record_result("bundled_symbol_model", {"source": args.model, "size_mb": size, **training})


if __name__ == "__main__":
    main()
