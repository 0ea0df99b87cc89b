"""Fine-tuned vs frozen-phase weights on a held-out split: interpolating the two (WiSE-FT,
Wortsman et al., "Robust fine-tuning of zero-shot models", 2022) and averaging their outputs.

The frozen-phase model (the pretrained backbone with the phase-1 head) is refitted from the
run's cached features, which takes seconds and gives the same head: training is seeded. Each
weight mix ``alpha`` is ``(1 - alpha) * frozen + alpha * fine-tuned``; 1 is the run's model.
Choose on a validation split, never on the test split the bars are measured on:

    python -m benchmarks.cub_transfer --set data.val_fraction=0.3333333 \\
        --set 'model.options={image_size: 320, tta: false}' --out runs/cub-val
    python -m benchmarks.cub_wise_ft runs/cub-val --split val
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.cub_tta_views import held_out, view_probabilities
from benchmarks.record import record_result
from cnnkit.config import build_run_config
from cnnkit.data.sources import build_splits
from cnnkit.inference.artifact import load_model
from cnnkit.models.registry import create_model
from cnnkit.models.transfer_classifier import TTA_SCALE
from cnnkit.runtime import seed_everything
from cnnkit.training.frozen_phase import FEATURES_FOLDER, fit_frozen_head
from cnnkit.training.run import feature_cache_dir

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CPU = torch.device("cpu")


def frozen_phase_model(run_dir: Path, cache_dir: str | None):
    """The run's phase-1 model, refitted from its cached features, and the data splits."""
    config = build_run_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    fine_tuned = load_model(run_dir / "model.safetensors", CPU)
    preprocessing = fine_tuned.metadata.preprocessing
    splits = build_splits(config.data, preprocessing, cache_dir).splits
    options = {**config.model.options, "tta": False}
    seed_everything(config.train.seed)  # The new head starts as the run's did (train_run).
    model = create_model(config.model.name, len(splits.class_names), 3, True, **options)
    with tempfile.TemporaryDirectory() as scratch:
        fit_frozen_head(
            model,
            config,
            splits,
            preprocessing,
            CPU,
            Path(scratch),
            progress=False,
            # Where train_run cached the run's features (an older run: its own folder).
            feature_cache_dir=feature_cache_dir(cache_dir) or run_dir / FEATURES_FOLDER,
        )
    model.unfreeze_backbone()
    fine_tuned.tta = False
    return model.eval(), fine_tuned.eval(), splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished transfer run's folder")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--cache-dir", help="decoded-image cache")
    parser.add_argument("--name", default="cub_wise_ft", help="results file name")
    args = parser.parse_args()

    frozen, fine_tuned, splits = frozen_phase_model(args.run_dir, args.cache_dir)
    images, labels = held_out(
        splits, args.split, fine_tuned.metadata.class_names, str(args.run_dir)
    )
    preprocessing = fine_tuned.metadata.preprocessing
    start_state = {k: v.clone() for k, v in frozen.state_dict().items()}
    end_state = fine_tuned.state_dict()
    probabilities = {}
    rows = {}
    start = time.perf_counter()
    for alpha in ALPHAS:
        mixed = {
            key: torch.lerp(value.float(), end_state[key].float(), alpha).to(value.dtype)
            if value.is_floating_point()
            else end_state[key]
            for key, value in start_state.items()
        }
        frozen.load_state_dict(mixed)
        # The shipped views: the image and the image enlarged by TTA_SCALE, each mirrored.
        views = view_probabilities(frozen, images, preprocessing, (1.0, TTA_SCALE))
        probabilities[alpha] = views
        for label, chosen in (("1 view", views[:, 0]), ("4 views", views.mean(1))):
            correct = int((chosen.argmax(1) == labels).sum())
            rows[f"alpha {alpha:g}, {label}"] = correct
            print(f"alpha {alpha:<5g} {label}: {correct} / {len(images)}", flush=True)
    for label, index in (("1 view", slice(0, 1)), ("4 views", slice(0, 4))):
        both = (probabilities[0.0][:, index].mean(1) + probabilities[1.0][:, index].mean(1)) / 2
        correct = int((both.argmax(1) == labels).sum())
        rows[f"outputs of alpha 0 and 1 averaged, {label}"] = correct
        print(f"frozen + fine-tuned outputs averaged, {label}: {correct} / {len(images)}")
    seconds = time.perf_counter() - start
    print(f"{len(images)} {args.split} images, {seconds:.0f} s")
    path = record_result(
        args.name,
        {"run_dir": str(args.run_dir), "split": args.split, "images": len(images), "correct": rows},
    )
    print(f"recorded: {path}")


if __name__ == "__main__":
    main()
