"""What scoring the test split in float32 instead of bf16 autocast costs a transfer run.

    python -m benchmarks.test_pass_precision     # the cub preset's model: trio, 320 px, TTA

A run scores its final test in float32 (as ``cnnkit evaluate`` and ``predict`` run the saved
model); before the fourteenth session it used the training autocast, bf16 on CPUs that have it.
This times the model's eval-mode forward pass (with its test-time views) on random images, in
alternating rounds, both ways, and scales the per-image time to the CUB dev test split's 801
photos: the figures are about compute, not data.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks.record import record_result
from cnnkit.models.registry import create_model
from cnnkit.runtime import cpu_supports_bf16, tune_allocator

CUB_DEV_TEST_IMAGES = 801


def seconds_per_image(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> float:
    """Wall seconds per image of one eval-mode pass over ``images``."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        model(images)
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite_trio")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--no-tta", action="store_true", help="one view instead of four")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="test_pass_precision", help="results/NAME.json")
    args = parser.parse_args()
    if not cpu_supports_bf16():
        raise SystemExit("skipped: this CPU has no native bf16, so runs never scored in bf16")
    tune_allocator()
    torch.manual_seed(0)
    options = {"image_size": args.image_size, "tta": not args.no_tta}
    model = create_model(args.model, 30, 3, pretrained=True, **options).eval()
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    images = images.contiguous(memory_format=torch.channels_last)
    for bf16 in (False, True):  # Warm-up: oneDNN builds its kernels for each precision.
        seconds_per_image(model, images, bf16)
    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    for _ in range(args.rounds):
        for label, bf16 in (("float32", False), ("bf16", True)):
            times[label].append(seconds_per_image(model, images, bf16))
    median = {label: statistics.median(values) for label, values in times.items()}
    figures = {
        "model": args.model,
        "options": options,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "ms_per_image": {label: round(value * 1000, 1) for label, value in median.items()},
        "cub_dev_test_seconds": {
            label: round(value * CUB_DEV_TEST_IMAGES, 1) for label, value in median.items()
        },
        "float32_over_bf16": round(median["float32"] / median["bf16"], 2),
    }
    for key, value in figures.items():
        print(f"{key:>22}: {value}")
    record_result(args.name, figures)


if __name__ == "__main__":
    main()
