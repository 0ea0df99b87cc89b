"""Inference throughput (images/s) of eager torch, torch.compile and onnxruntime on the CPU.

Each backend runs the predictor's real path on prepared ``uint8`` batches (normalisation,
forward pass, softmax). Backends alternate within each round and the table shows the median of
the rounds, so load from other processes affects all of them alike.

    python benchmarks/inference.py                      # random-weight symbol_cnn and book_cnn
    python benchmarks/inference.py --model runs/hasy/model.safetensors --rounds 5
    python benchmarks/inference.py --bundled --no-compile --int8-dataset hasy \
        --int8-data ../shared/data/HASYv2-dev.tar.bz2 --int8-fold 1    # the 2x bar, int8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cnnkit.config import DataConfig
from cnnkit.data.sources import build_splits
from cnnkit.inference.artifact import ModelMetadata, save_model
from cnnkit.inference.bundled import bundled_model_path
from cnnkit.inference.onnx_backend import OnnxPredictor, available_cores
from cnnkit.inference.predictor import Predictor
from cnnkit.inference.quantize import calibration_inputs, quantize_onnx
from cnnkit.models.registry import create_model
from cnnkit.paths import default_cache_dir
from cnnkit.runtime import tune_allocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import record_result  # noqa: E402

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
    model_path: Path, compile_model: bool, threads: int | None, int8_path: Path | None = None
) -> dict[str, Predictor]:
    """Predictors by backend name (``onnx-int8`` when an int8 export is given)."""
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
    if int8_path is not None:
        backends["onnx-int8"] = OnnxPredictor.from_file(int8_path, threads=threads)
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
    int8_path: Path | None = None,
) -> Results:
    """Median (images/s, images per CPU-second) for each (batch size, backend).

    A backend that fails (torch.compile without a working toolchain) maps to its error text.
    """
    backends = build_backends(model_path, compile_model, threads, int8_path)
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
    print("{:>6}  {:<10} {:>9} {:>9} {:>10} {:>9}".format(*header))
    for (batch_size, backend), value in sorted(results.items(), key=lambda item: item[0][0]):
        eager = results.get((batch_size, "eager"))
        if isinstance(value, str):
            print(f"{batch_size:>6}  {backend:<10} {value}")
            continue
        ratios = [f"{v / e:.2f}x" for v, e in zip(value, eager, strict=True)]
        print(
            f"{batch_size:>6}  {backend:<10} {value[0]:>9.0f} {ratios[0]:>9} "
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
    parser.add_argument("--bundled", action="store_true", help="benchmark the bundled model")
    parser.add_argument(
        "--int8-dataset",
        help="also time an int8 export calibrated on this dataset's training images, and "
        "compare its test top-1 with eager torch (e.g. hasy with --int8-data and --int8-fold)",
    )
    parser.add_argument("--int8-data", help="dataset path for --int8-dataset")
    parser.add_argument("--int8-fold", type=int, help="HASYv2 fold for --int8-dataset")
    parser.add_argument("--name", default="inference", help="record as results/NAME.json")
    args = parser.parse_args()
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}: {torch.get_num_threads()} threads; onnxruntime: "
        f"{args.threads or available_cores()} threads; {args.rounds} rounds, medians"
    )
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(p) for p in args.model or []]
        if args.bundled:
            paths.append(bundled_model_path())
        paths = paths or [
            save_random_model(Path(folder), architecture, channels)
            for architecture, channels in DEFAULT_MODELS
        ]
        data = None
        if args.int8_dataset:
            data = DataConfig(dataset=args.int8_dataset, data=args.int8_data, fold=args.int8_fold)
        summary, figures = [], {}
        for path in paths:
            int8_path = None
            if data is not None:
                int8_path = Path(folder) / f"{path.stem}-int8.onnx"
                quantize_onnx(path, int8_path, calibration_inputs(path, data))
                figures[f"{path.name} test top-1"] = int8_accuracy(path, int8_path, data)
            results = benchmark_model(
                path,
                args.batch_sizes,
                args.rounds,
                args.seconds,
                not args.no_compile,
                args.threads,
                int8_path,
            )
            print_table(path.name, results)
            figures[f"{path.name} img/s"] = {
                f"{backend}@{batch_size}": round(value[0]) if isinstance(value, tuple) else value
                for (batch_size, backend), value in sorted(results.items())
            }
            largest = max(args.batch_sizes)
            eager = results.get((largest, "eager"))
            for backend in ("onnx", "onnx-int8"):
                value = results.get((largest, backend))
                if isinstance(eager, tuple) and isinstance(value, tuple):
                    ratios = (value[0] / eager[0], value[1] / eager[1])
                    summary.append((path.name, backend, largest, *ratios))
                    figures[f"{path.name} {backend}/eager@{largest}"] = round(ratios[0], 2)
    print()
    for name, backend, batch_size, ratio, cpu_ratio in summary:
        verdict = "meets" if ratio >= 2 else "misses"
        print(
            f"{name}: {backend} / eager at batch {batch_size} = {ratio:.2f}x wall clock "
            f"({verdict} the 2x bar), {cpu_ratio:.2f}x per CPU-second"
        )
    for name, value in figures.items():
        if name.endswith("test top-1"):
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in value.items()))
    record_result(args.name, {"threads": args.threads or available_cores(), **figures})


def int8_accuracy(model_path: Path, int8_path: Path, data: DataConfig) -> dict[str, float]:
    """Test top-1 of eager torch and of the int8 export, and how often their top-1 agree."""
    eager = Predictor.from_file(model_path)
    int8 = OnnxPredictor.from_file(int8_path)
    test = build_splits(data, eager.metadata.preprocessing, cache_dir=default_cache_dir()).splits
    test = test.test
    images, labels = np.asarray(test.images), np.asarray(test.labels)
    float_top1 = eager.probabilities(images).argmax(1)  # Both predict in bounded chunks.
    int8_top1 = int8.probabilities(images).argmax(1)
    return {
        "eager": float(np.mean(float_top1 == labels)),
        "int8": float(np.mean(int8_top1 == labels)),
        "agreement": float(np.mean(float_top1 == int8_top1)),
    }


if __name__ == "__main__":
    main()
