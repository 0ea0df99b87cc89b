"""Inference throughput (images/s) of eager torch, torch.compile and onnxruntime on the CPU.

Each backend runs the predictor's real path on prepared ``uint8`` batches (normalisation,
forward pass, softmax). Backends alternate within each round and the table shows the median of
the rounds, so load from other processes affects all of them alike.

    python benchmarks/inference.py                      # random-weight symbol_cnn and book_cnn
    python benchmarks/inference.py --model runs/hasy/model.safetensors --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cnnkit.inference.artifact import ModelMetadata, save_model
from cnnkit.inference.onnx_backend import OnnxPredictor, available_cores
from cnnkit.inference.predictor import Predictor
from cnnkit.models.registry import create_model
from cnnkit.runtime import tune_allocator

DEFAULT_MODELS = (("symbol_cnn", 1), ("book_cnn", 3))
NUM_CLASSES = 369


def save_random_model(folder: Path, architecture: str, channels: int) -> Path:
    """A random-weight model file with ``NUM_CLASSES`` classes (speed does not need training)."""
    torch.manual_seed(0)
    model = create_model(architecture, NUM_CLASSES, channels)
    class_names = tuple(f"class_{index}" for index in range(NUM_CLASSES))
    metadata = ModelMetadata(architecture, class_names, model.default_preprocessing)
    return save_model(folder / f"{architecture}.safetensors", model, metadata)


def build_backends(
    model_path: Path, compile_model: bool, threads: int | None
) -> dict[str, Predictor]:
    """Predictors by backend name."""
    backends: dict[str, Predictor] = {"eager": Predictor.from_file(model_path)}
    # For reference only: the ratio bar compares ONNX with eager as the predictor ships.
    channels_last = Predictor.from_file(model_path)
    channels_last.model = channels_last.model.to(memory_format=torch.channels_last)
    backends["eager-cl"] = channels_last
    if compile_model:
        compiled = Predictor.from_file(model_path)
        compiled.model = torch.compile(compiled.model)
        backends["compile"] = compiled
    backends["onnx"] = OnnxPredictor.from_file(model_path, cache=False, threads=threads)
    return backends


def time_calls(
    function: Callable[[], object], min_seconds: float, min_calls: int
) -> tuple[float, float]:
    """Wall and process-CPU seconds per call, over at least ``min_calls`` and ``min_seconds``."""
    calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        function()
        calls += 1
    return (time.perf_counter() - start) / calls, (time.process_time() - cpu_start) / calls


Results = dict[tuple[int, str], tuple[float, float] | str]


def benchmark_model(
    model_path: Path,
    batch_sizes: list[int],
    rounds: int,
    min_seconds: float,
    compile_model: bool,
    threads: int | None,
) -> Results:
    """Median (images/s, images per CPU-second) for each (batch size, backend).

    A backend that fails (torch.compile without a working toolchain) maps to its error text.
    """
    backends = build_backends(model_path, compile_model, threads)
    preprocessing = backends["eager"].metadata.preprocessing
    shape = (preprocessing.stored_size, preprocessing.stored_size, preprocessing.channels)
    results: Results = {}
    for batch_size in batch_sizes:
        prepared = np.random.default_rng(0).integers(0, 256, (batch_size, *shape), np.uint8)
        samples: dict[str, list[tuple[float, float]]] = {}
        for name, predictor in backends.items():
            try:
                for _ in range(2):  # Warm-up: allocation, compilation, thread-pool start.
                    predictor.probabilities(prepared)
                samples[name] = []
            except Exception as error:  # torch.compile fails in many ways.
                results[(batch_size, name)] = f"failed: {type(error).__name__}: {error}"[:160]
        for _ in range(rounds):
            for name in samples:
                wall, cpu = time_calls(
                    lambda p=backends[name], x=prepared: p.probabilities(x),
                    min_seconds,
                    min_calls=3,
                )
                samples[name].append((batch_size / wall, batch_size / max(cpu, 1e-9)))
        for name, values in samples.items():
            results[(batch_size, name)] = (
                statistics.median(wall for wall, _ in values),
                statistics.median(cpu for _, cpu in values),
            )
    return results


def print_table(name: str, results: Results) -> None:
    print(f"\n{name}")
    header = ("batch", "backend", "img/s", "vs eager", "img/CPU-s", "vs eager")
    print("{:>6}  {:<9} {:>9} {:>9} {:>10} {:>9}".format(*header))
    for (batch_size, backend), value in sorted(results.items(), key=lambda item: item[0][0]):
        eager = results.get((batch_size, "eager"))
        if isinstance(value, str):
            print(f"{batch_size:>6}  {backend:<9} {value}")
            continue
        ratios = [f"{v / e:.2f}x" for v, e in zip(value, eager, strict=True)]
        print(
            f"{batch_size:>6}  {backend:<9} {value[0]:>9.0f} {ratios[0]:>9} "
            f"{value[1]:>10.0f} {ratios[1]:>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model file(s); default: random ones")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--threads", type=int, help="torch and onnxruntime threads")
    args = parser.parse_args()
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}: {torch.get_num_threads()} threads; onnxruntime: "
        f"{args.threads or available_cores()} threads; {args.rounds} rounds, medians"
    )
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(p) for p in args.model or []] or [
            save_random_model(Path(folder), architecture, channels)
            for architecture, channels in DEFAULT_MODELS
        ]
        summary = []
        for path in paths:
            results = benchmark_model(
                path,
                args.batch_sizes,
                args.rounds,
                args.seconds,
                not args.no_compile,
                args.threads,
            )
            print_table(path.name, results)
            largest = max(args.batch_sizes)
            eager, onnx = results.get((largest, "eager")), results.get((largest, "onnx"))
            if isinstance(eager, tuple) and isinstance(onnx, tuple):
                summary.append((path.name, largest, onnx[0] / eager[0], onnx[1] / eager[1]))
    print()
    for name, batch_size, ratio, cpu_ratio in summary:
        verdict = "meets" if ratio >= 2 else "misses"
        print(
            f"{name}: ONNX / eager at batch {batch_size} = {ratio:.2f}x wall clock "
            f"({verdict} the 2x bar), {cpu_ratio:.2f}x per CPU-second"
        )


if __name__ == "__main__":
    main()
