"""Which test-time views help a trained photo model: accuracy of each view and of view sets.

Every view is computed from the model's centre crop, as ``TransferClassifier.forward_tta``
does: the crop enlarged by a scale factor (the network then sees a larger input), and its
mirror image. The class probabilities of a set of views are averaged. Choose a set on a
validation split, never on the test split the bars are measured on:

    python -m benchmarks.cub_transfer --set data.val_fraction=0.3333333 \\
        --set 'model.options={image_size: 320, tta: false}' --out runs/cub-val
    python -m benchmarks.cub_tta_views runs/cub-val/model.safetensors \\
        --config runs/cub-val/config.yaml --split val
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from benchmarks.record import record_result
from cnnkit.config import Preprocessing, build_run_config
from cnnkit.data.dataset import DataSplits, ImageSet
from cnnkit.data.sources import build_splits
from cnnkit.evaluation.evaluate import align_labels, predict_logits
from cnnkit.inference.artifact import load_model
from cnnkit.runtime import cpu_supports_bf16

SCALES = (1.0, 1.1, 1.2, 1.3)


class ViewProbabilities(torch.nn.Module):
    """Class probabilities ``[B, V * K]`` of every (scale, mirrored) view of a batch."""

    def __init__(self, model: torch.nn.Module, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.model, self.scales = model, scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for scale in self.scales:
            view = x
            if scale != 1.0:
                view = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            for image in (view, view.flip(-1)):
                outputs.append(self.model(image).float().softmax(1))
        return torch.cat(outputs, dim=1)


def view_probabilities(
    model: torch.nn.Module, images: ImageSet, preprocessing: Preprocessing, scales: tuple
) -> torch.Tensor:
    """``[N, V, K]`` class probabilities of each (scale, mirrored) view, in bf16 where the CPU
    has it, as the shipped model infers."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_supports_bf16()):
        flat = predict_logits(
            ViewProbabilities(model, scales), images, preprocessing, torch.device("cpu"), 32
        )
    return flat.view(len(images), 2 * len(scales), -1)


def held_out(
    splits: DataSplits, split: str, class_names: tuple[str, ...], source: str
) -> tuple[ImageSet, torch.Tensor]:
    """The ``val`` or ``test`` images of ``splits`` and their labels in the model's order."""
    images = splits.val if split == "val" else splits.test
    if images is None:
        raise SystemExit(f"{source}: the run has no validation split")
    return images, torch.from_numpy(align_labels(images, class_names, source))


def view_names(scales: tuple[float, ...]) -> list[str]:
    return [f"{scale:g}{'m' if mirrored else ''}" for scale in scales for mirrored in (0, 1)]


def view_sets(names: list[str]) -> dict[str, list[int]]:
    """Each view alone, each scale with its mirror, and every run of consecutive scales."""
    sets = {name: [i] for i, name in enumerate(names)}
    pairs = len(names) // 2
    for start, stop in itertools.combinations(range(pairs + 1), 2):
        members = list(range(2 * start, 2 * stop))
        sets[" + ".join(names[i] for i in members)] = members
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a photo model file (model.safetensors)")
    parser.add_argument("--config", required=True, help="the run's config.yaml (for the data)")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--cache-dir", help="decoded-image cache")
    parser.add_argument("--name", default="cub_tta_views", help="results file name")
    args = parser.parse_args()

    model = load_model(args.model, "cpu")
    model.tta = False
    preprocessing = model.metadata.preprocessing
    config = build_run_config(yaml.safe_load(Path(args.config).read_text(encoding="utf-8")))
    splits = build_splits(config.data, preprocessing, args.cache_dir).splits
    images, labels = held_out(splits, args.split, model.metadata.class_names, args.config)
    start = time.perf_counter()
    per_view = view_probabilities(model, images, preprocessing, SCALES)
    seconds = time.perf_counter() - start
    names = view_names(SCALES)
    rows = {}
    for label, members in view_sets(names).items():
        predicted = per_view[:, members].mean(1).argmax(1)
        correct = int((predicted == labels).sum())
        rows[label] = {"correct": correct, "accuracy": correct / len(images)}
        print(f"{label:<40} {correct:>4} / {len(images)}  {correct / len(images):.2%}")
    print(f"{len(images)} {args.split} images, {len(names)} views, {seconds:.0f} s")
    path = record_result(
        args.name,
        {"model": args.model, "split": args.split, "images": len(images), "views": rows},
    )
    print(f"recorded: {path}")
    print(json.dumps(max(rows.items(), key=lambda item: item[1]["correct"])))


if __name__ == "__main__":
    main()
