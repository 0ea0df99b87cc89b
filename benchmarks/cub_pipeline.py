"""CUB input pipeline: decode once into a uint8 cache, then extract features and fine-tune from it,
each against the plain approach (PIL open + resize + crop of every JPEG, every epoch).

    python -m benchmarks.cub_pipeline                  # all stages, fp32 and bf16
    python -m benchmarks.cub_pipeline --images 64 --steps 2

Stages, all in one run on ``../shared/data/CUB_200_2011-dev.tgz``:
  1. first decode of every photo into the cache (parallel, streamed from the archive);
  2. a cached load (memory-mapped, every pixel touched);
  3. the plain per-epoch decode: PIL open + EXIF + resize + centre crop of each JPEG, one process;
  4. frozen-feature extraction img/s from cached uint8 versus from JPEGs decoded per batch;
  5. fine-tune img/s (forward + backward + AdamW, batch-norm statistics kept as in the recipe)
     with batched tensor augmentation on cached uint8 versus per-image PIL random-resized-crop
     + flip of decoded JPEGs.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from benchmarks.record import record_result, shared_dataset
from cnnkit.config import AugmentConfig, Preprocessing
from cnnkit.data.cache import load_images
from cnnkit.data.cub import CubSource
from cnnkit.data.loader import build_eval_transform, build_train_transform
from cnnkit.data.normalize import normalize
from cnnkit.data.prepare import prepare_bytes
from cnnkit.models.registry import create_model
from cnnkit.presets import preset_for
from cnnkit.runtime import cpu_supports_bf16, tune_allocator
from cnnkit.training.features import compute_features
from cnnkit.training.finetune import FrozenBatchNorm

ARCHIVE = "CUB_200_2011-dev.tgz"


def timed(function: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def plain_train_image(data: bytes, size: int, rng: random.Random) -> np.ndarray:
    """What a per-sample Dataset does each epoch: decode, random-resized-crop, flip (PIL)."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    width, height = image.size
    area = width * height * rng.uniform(0.35, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_width = min(width, round(math.sqrt(area * ratio)))
    crop_height = min(height, round(math.sqrt(area / ratio)))
    left, top = rng.randint(0, width - crop_width), rng.randint(0, height - crop_height)
    image = image.resize(
        (size, size),
        Image.Resampling.BILINEAR,
        box=(left, top, left + crop_width, top + crop_height),
    )
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8)


def to_input(arrays: list[np.ndarray], preprocessing: Preprocessing) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    return normalize(batch, preprocessing).contiguous(memory_format=torch.channels_last)


def train_steps(model, batches: Callable[[int], torch.Tensor], labels, steps: int, bf16: bool):
    """Run ``steps`` optimiser steps (after one warm-up step); return images per second."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        inputs = batches(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            seconds += time.perf_counter() - start
    return steps * len(labels) / seconds


def measure_features(
    model: torch.nn.Module, images: np.ndarray, payloads: list[bytes], bf16: bool
) -> tuple[float, float]:
    """Feature-extraction img/s from cached uint8 and from JPEGs decoded batch by batch."""
    model.eval()
    preprocessing = model.default_preprocessing
    device = torch.device("cpu")
    transform = build_eval_transform(preprocessing)
    _, seconds = timed(lambda: compute_features(model, images, transform, device, 0, bf16))
    cached_rate = len(images) / seconds
    offset = (preprocessing.stored_size - preprocessing.image_size) // 2
    crop = slice(offset, offset + preprocessing.image_size)

    def plain() -> None:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for start in range(0, len(images), 64):
                chunk = payloads[start : start + 64]
                arrays = [prepare_bytes(data, "x", preprocessing)[crop, crop] for data in chunk]
                model.forward_features(to_input(arrays, preprocessing))

    _, seconds = timed(plain)
    return cached_rate, len(images) / seconds


def measure_finetune(
    model: torch.nn.Module,
    images: np.ndarray,
    payloads: list[bytes],
    size: int,
    bf16: bool,
    steps: int,
) -> tuple[float, float]:
    """Fine-tune img/s at ``size`` px: batched augmentation of cached uint8 versus PIL.

    The network trains as the recipe's fine-tune does: every layer, batch-norm statistics kept.
    """
    stored = model.default_preprocessing
    model = FrozenBatchNorm(model)
    sized = Preprocessing("photo", 3, size, stored.stored_size, stored.mean, stored.std)
    transform = build_train_transform(sized, AugmentConfig(**preset_for("cub")["augment"]))
    labels = torch.randint(0, 30, (len(images),))
    generator = torch.Generator().manual_seed(0)
    batch = torch.from_numpy(images)
    cached_rate = train_steps(model, lambda step: transform(batch, generator), labels, steps, bf16)
    rng = random.Random(0)

    def plain_batch(step: int) -> torch.Tensor:
        return to_input([plain_train_image(data, size, rng) for data in payloads], sized)

    return cached_rate, train_steps(model, plain_batch, labels, steps, bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="images for feature extraction")
    parser.add_argument("--steps", type=int, default=3, help="fine-tune steps per variant")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", default="224,160", help="fine-tune input sizes to measure")
    parser.add_argument("--name", default="cub_pipeline", help="results file name")
    args = parser.parse_args()
    archive = shared_dataset(ARCHIVE)
    tune_allocator()
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 30, 3, pretrained=True)
    model = model.to(memory_format=torch.channels_last)
    preprocessing = model.default_preprocessing
    source = CubSource(archive)
    listing = source.list_samples()
    count = len(listing.records)
    results: dict[str, float] = {}
    precisions = [False, True] if cpu_supports_bf16() else [False]

    with tempfile.TemporaryDirectory(prefix="cnnkit-cub-pipeline-") as cache_dir:
        _, seconds = timed(lambda: load_images(source, listing, preprocessing, cache_dir))
        results["first_decode_img_s"] = count / seconds
        print(
            f"1. first decode ({os.cpu_count()} workers, from the .tgz): "
            f"{count} images in {seconds:.1f} s = {count / seconds:.0f} img/s"
        )
        cached, seconds = timed(lambda: load_images(source, listing, preprocessing, cache_dir))
        _, touch = timed(lambda: int(np.asarray(cached.images).sum(dtype=np.int64)))
        seconds += touch
        results["cached_load_img_s"] = count / seconds
        print(
            f"2. cached load (memory-mapped, all pixels read): {seconds:.2f} s = "
            f"{count / seconds:.0f} img/s ({count / seconds / results['first_decode_img_s']:.0f}x)"
        )
        images = np.ascontiguousarray(cached.images[: args.images])

    keys = [record.key for record in listing.records[: max(args.images, args.batch_size)]]
    jpeg = dict(source.iter_bytes(keys))
    payloads = [jpeg[key] for key in keys]
    _, seconds = timed(
        lambda: [prepare_bytes(data, "x", preprocessing) for data in payloads[: args.images]]
    )
    results["plain_decode_img_s"] = args.images / seconds
    print(
        f"3. plain per-epoch decode (PIL open + resize + crop of in-memory JPEGs, 1 process): "
        f"{args.images / seconds:.0f} img/s; cached epoch is "
        f"{results['cached_load_img_s'] / results['plain_decode_img_s']:.0f}x faster"
    )

    for bf16 in precisions:
        tag = "bf16" if bf16 else "fp32"
        cached_rate, plain_rate = measure_features(model, images, payloads, bf16)
        results[f"features_{tag}_cached_img_s"] = cached_rate
        results[f"features_{tag}_plain_img_s"] = plain_rate
        print(
            f"4. frozen features {tag}: cached uint8 {cached_rate:.1f} img/s, "
            f"JPEG decoded per batch {plain_rate:.1f} img/s"
        )

    for size in (int(text) for text in args.sizes.split(",")):
        for bf16 in precisions:
            tag = f"{size}px_{'bf16' if bf16 else 'fp32'}"
            cached_rate, plain_rate = measure_finetune(
                model,
                images[: args.batch_size],
                payloads[: args.batch_size],
                size,
                bf16,
                args.steps,
            )
            results[f"finetune_{tag}_cached_img_s"] = cached_rate
            results[f"finetune_{tag}_plain_img_s"] = plain_rate
            print(
                f"5. fine-tune {tag}: cached uint8 + batched augmentation {cached_rate:.1f} "
                f"img/s, PIL per image {plain_rate:.1f} img/s"
            )
    path = record_result(args.name, {"images": count, "results": results})
    print(f"recorded: {path}")


if __name__ == "__main__":
    main()
