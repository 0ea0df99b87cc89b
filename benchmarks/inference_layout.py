"""What channels-last memory saves when a saved model is scored or used on the CPU.

    python -m benchmarks.inference_layout        # the CUB preset's trio at 320 px, and symbol_cnn

``cnnkit evaluate``, ``predict`` and :class:`cnnkit.Predictor` load a model file and put it in
channels-last memory (:func:`cnnkit.runtime.for_inference`); before the fifteenth session they
ran it in PyTorch's default layout, while training (and the run's own test pass) used channels
last. This times each model's float32 eval-mode forward pass on random images in both layouts,
in alternating rounds, and prints the per-image times and their ratio. The commands also tune
glibc's allocator as training does (:func:`cnnkit.runtime.tune_allocator`; it cannot be undone
in a process): ``--default-allocator`` measures without it, for comparison.

    python -m benchmarks.inference_layout --default-allocator --name inference_layout_malloc
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.record import record_result
from cnnkit.models.registry import create_model
from cnnkit.runtime import tune_allocator

MODELS = {
    # name: (model, options, channels, image size, batch)
    "efficientnet_lite_trio 320": ("efficientnet_lite_trio", {"image_size": 320}, 3, 320, 16),
    "symbol_cnn w32": ("symbol_cnn", {"width": 32}, 1, 32, 256),
}


def seconds_per_image(model: torch.nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(images)
    return (time.perf_counter() - start) / len(images)


def compare(name: str, rounds: int) -> dict[str, float]:
    model_name, options, channels, size, batch = MODELS[name]
    model = create_model(model_name, 30, channels, **options).eval()
    images = torch.randn(batch, channels, size, size)
    layouts = {"default": torch.contiguous_format, "channels_last": torch.channels_last}
    times: dict[str, list[float]] = {label: [] for label in layouts}
    for round_number in range(rounds + 1):
        for label, layout in layouts.items():
            model = model.to(memory_format=layout)
            elapsed = seconds_per_image(model, images.contiguous(memory_format=layout))
            if round_number:  # Round 0 warms oneDNN's kernels up for each layout.
                times[label].append(elapsed)
    medians = {label: statistics.median(values) * 1e3 for label, values in times.items()}
    return {
        "default_ms_per_image": round(medians["default"], 3),
        "channels_last_ms_per_image": round(medians["channels_last"], 3),
        "speedup": round(medians["default"] / medians["channels_last"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--default-allocator", action="store_true", help="leave glibc as it is")
    parser.add_argument("--name", default="inference_layout", help="results/NAME.json")
    args = parser.parse_args()
    tuned = False if args.default_allocator else tune_allocator()
    torch.manual_seed(0)
    figures = {name: compare(name, args.rounds) for name in args.models}
    allocator = "tuned allocator" if tuned else "default allocator"
    print(f"float32 eval-mode forward pass, {torch.get_num_threads()} threads, {allocator}")
    print("ms an image:")
    for name, row in figures.items():
        print(
            f"  {name:28s} default {row['default_ms_per_image']:8.3f}  channels-last "
            f"{row['channels_last_ms_per_image']:8.3f}  ({row['speedup']:.2f}x)"
        )
    record_result(args.name, {"rounds": args.rounds, "allocator_tuned": tuned, "models": figures})


if __name__ == "__main__":
    main()
