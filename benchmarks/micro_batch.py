"""Memory and speed of a fine-tune step computed in micro-batches (gradient accumulation).

    python -m benchmarks.micro_batch                       # the CUB recipe: trio, 320 px, batch 32
    python -m benchmarks.micro_batch --micro 32 8 --steps 2

Each setting trains a few steps of the CUB fine-tune as the recipe runs it (the
``efficientnet_lite_trio`` at 320 px, batch 32, bf16, batch-norm statistics kept, the preset's
augmentation) on random photos, in a fresh process, and reports that process's peak resident
memory and its seconds per step after a warm-up step. The first setting is the whole batch: the
baseline of the same run. A micro-batch size that equals the batch size is the whole batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.record import record_result
from cnnkit.config import build_run_config
from cnnkit.data.dataset import ImageSet
from cnnkit.data.loader import BatchLoader, build_train_transform
from cnnkit.models.registry import create_model
from cnnkit.presets import preset_for
from cnnkit.runtime import tune_allocator
from cnnkit.training.finetune import FrozenBatchNorm
from cnnkit.training.memory import GIB
from cnnkit.training.trainer import Trainer


def measure(micro: int, batch_size: int, steps: int, image_size: int) -> dict:
    """Train ``steps + 1`` steps in micro-batches of ``micro``; peak RSS and seconds a step."""
    recipe = build_run_config(preset_for("cub"), {"data": {"dataset": "cub", "data": "-"}})
    model = create_model(
        recipe.model.name, 30, 3, pretrained=True, image_size=image_size, tta=False
    )
    preprocessing = model.default_preprocessing
    model.unfreeze_backbone()
    side = preprocessing.stored_size
    rng = np.random.default_rng(0)
    count = batch_size * (steps + 1)
    images = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    labels = rng.integers(0, 30, count).astype(np.int64)
    data = ImageSet(images, labels, [str(i) for i in range(30)])
    transform = build_train_transform(preprocessing, recipe.augment)
    loader = BatchLoader(data, batch_size, transform, shuffle=True)
    config = dataclasses.replace(
        recipe.train, epochs=1, batch_size=batch_size, micro_batch_size=micro, memory_check=False
    )
    trainer = Trainer(FrozenBatchNorm(model), config, torch.device("cpu"), progress=False)
    ends = [time.perf_counter()]
    step = trainer.train_step

    def timed_step(batch):  # the trainer's own step, timed
        result = step(batch)
        ends.append(time.perf_counter())
        return result

    trainer.train_step = timed_step
    trainer.fit(loader)
    times = np.diff(ends)[1:]  # after the warm-up step
    return {
        "micro_batch": micro,
        "bf16": trainer.autocast_dtype == torch.bfloat16,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "seconds_per_step": float(np.median(times)),
        "steps": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, nargs="+", default=[32, 16, 8])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up step")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="micro_batch")
    args = parser.parse_args()
    if args.child is not None:
        tune_allocator()
        print(json.dumps(measure(args.child, args.batch_size, args.steps, args.image_size)))
        return
    rows = []
    for micro in args.micro:
        command = [
            sys.executable,
            "-m",
            "benchmarks.micro_batch",
            "--child",
            str(micro),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--image-size",
            str(args.image_size),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"micro-batch {micro} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"micro-batch {row['micro_batch']:>3}: peak {row['peak_rss_gib']:.1f} GiB, "
            f"{row['seconds_per_step']:.2f} s a step",
            flush=True,
        )
    base = rows[0]
    for row in rows:
        row["memory_ratio"] = row["peak_rss_gib"] / base["peak_rss_gib"]
        row["time_ratio"] = row["seconds_per_step"] / base["seconds_per_step"]
        print(
            f"micro-batch {row['micro_batch']:>3} against {base['micro_batch']}: "
            f"memory {row['memory_ratio']:.2f}x, time {row['time_ratio']:.2f}x"
        )
    record_result(
        args.name,
        {"batch_size": args.batch_size, "image_size": args.image_size, "settings": rows},
    )


if __name__ == "__main__":
    main()
