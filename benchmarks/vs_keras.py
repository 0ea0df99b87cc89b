"""cnnkit against Keras 3 (TensorFlow) training the book's HASY CNN on the CPU, in images/s.

Both sides train the same network (``book_cnn`` with ``dense=1024``: 1,569,041 parameters,
Adam 1e-3) on the same images: real HASYv2 fold-1 training images when
``../shared/data/HASYv2-dev.tar.bz2`` is present, else random images of the same shape. Each
measurement is a fresh process; cnnkit goes through its real training path (``Trainer`` and
``BatchLoader``, allocator tuning on) and Keras runs ``benchmarks/keras_book_cnn.py`` in
``.bench-venv`` (``make bench-venv``). The two alternate for ``--rounds`` rounds; both skip their
warm-up steps and time the same number of images.

    make bench-venv && python benchmarks/vs_keras.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_levers import Levers, WorkerJob, measure_in_subprocess  # noqa: E402
from record import record_result  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
HASY_ARCHIVE = REPOSITORY.parent / "shared" / "data" / "HASYv2-dev.tar.bz2"
KERAS_SCRIPT = Path(__file__).resolve().parent / "keras_book_cnn.py"
BARS = {32: 1.3, 256: 1.1}
BOOK_1024_PARAMETERS = 1_569_041
# batch size -> (warm-up steps, measured steps); about 6,400-7,700 measured images each.
STEPS = {32: (10, 200), 256: (3, 30)}


def load_sample(archive: Path, count: int, cache_dir: Path) -> tuple[dict, str]:
    """``count`` 32x32x3 uint8 images with labels, and a description of where they came from."""
    generator = np.random.default_rng(0)
    if archive.is_file():
        from cnnkit.config import DataConfig, Preprocessing
        from cnnkit.data.sources import build_splits

        config = DataConfig(dataset="hasy", data=str(archive), fold=1, channels=3)
        preprocessing = Preprocessing("symbol", 3, 32, 32, (0.0,) * 3, (1.0,) * 3)
        train = build_splits(config, preprocessing, cache_dir).splits.train
        chosen = np.sort(generator.choice(len(train), min(count, len(train)), replace=False))
        arrays = {
            "images": np.ascontiguousarray(train.images[chosen]),
            "labels": train.labels[chosen],
            "num_classes": np.int64(train.num_classes),
        }
        return arrays, f"real HASYv2 fold-1 training images ({archive.name}), {len(chosen)} drawn"
    arrays = {
        "images": generator.integers(0, 256, (count, 32, 32, 3), np.uint8),
        "labels": generator.integers(0, 369, count),
        "num_classes": np.int64(369),
    }
    return arrays, f"SYNTHETIC random images ({archive} not found), {count}"


# The cnnkit variants measured against Keras. "cnnkit" is the training path as it ships with the
# book-hasy preset (allocator tuning, channels_last, fused Adam in the Trainer, bf16 autocast on
# CPUs with native bf16); the bars apply to it. The others vary one setting for reference.
CNNKIT_SIDES = {
    "cnnkit": Levers(tune_allocator=True, channels_last=True, bf16=True),
    "cnnkit-fp32": Levers(tune_allocator=True, channels_last=True),
    "cnnkit-1thread": Levers(tune_allocator=True, channels_last=True, bf16=True, threads=1),
    "cnnkit-passive": Levers(tune_allocator=True, channels_last=True, bf16=True, passive_wait=True),
}


def measure_cnnkit(data: Path, batch_size: int, levers: Levers) -> dict[str, float]:
    """cnnkit's training path (``Trainer`` + ``BatchLoader``) in a fresh process."""
    warmup, steps = STEPS[batch_size]
    job = WorkerJob(
        "book_cnn",
        {"dense": 1024},
        3,
        batch_size,
        "adam",
        levers,
        warmup_steps=warmup,
        steps=steps,
        data=str(data),
    )
    result = measure_in_subprocess([job])[0]
    if result["parameters"] != BOOK_1024_PARAMETERS:
        raise SystemExit(f"cnnkit's book_cnn has {result['parameters']} parameters")
    return result


def measure_keras(
    python: Path, data: Path, batch_size: int, threads: int | None
) -> dict[str, float]:
    warmup, steps = STEPS[batch_size]
    command = [str(python), str(KERAS_SCRIPT), "--data", str(data)]
    command += ["--batch-size", str(batch_size), "--warmup-steps", str(warmup)]
    command += ["--steps", str(steps)] + (["--threads", str(threads)] if threads else [])
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if completed.returncode != 0:
        raise RuntimeError(f"keras run failed: {completed.stderr.strip()[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["parameters"] != BOOK_1024_PARAMETERS:
        raise SystemExit(f"the Keras model has {result['parameters']} parameters")
    return result


def print_results(
    samples: dict[tuple[str, int], list[dict]], sides: list[str], metric: str, title: str
) -> None:
    print(f"\n{title}")
    print(f"{'batch':>5}  {'side':<26} {'median':>7}  {'vs keras':>8}  {'bar':>5}  by round")
    for batch_size in sorted({batch for _, batch in samples}):
        keras = statistics.median(row[metric] for row in samples[("keras", batch_size)])
        for side in sides:
            values = [row[metric] for row in samples[(side, batch_size)]]
            median = statistics.median(values)
            bar, verdict = BARS.get(batch_size), ""
            if side == "cnnkit" and bar is not None:
                verdict = f"{bar:.1f}x " + ("met" if median / keras >= bar else "MISSED")
            rounds = ", ".join(f"{value:.0f}" for value in values)
            print(
                f"{batch_size:>5}  {side:<26} {median:>7.0f}  {median / keras:>7.2f}x  "
                f"{verdict:<11} [{rounds}]"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--threads", type=int, help="threads for both sides (default: their own)")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also measure the cnnkit variants (fp32, 1 thread, passive OpenMP wait)",
    )
    parser.add_argument("--sample", type=int, default=20_000, help="images saved for both sides")
    parser.add_argument("--archive", type=Path, default=HASY_ARCHIVE)
    parser.add_argument("--bench-python", type=Path, default=REPOSITORY / ".bench-venv/bin/python")
    parser.add_argument("--cache-dir", type=Path, help="decoded-image cache (cnnkit's default)")
    parser.add_argument("--name", default="vs_keras", help="results file name")
    args = parser.parse_args()
    if not args.bench_python.is_file():
        raise SystemExit(f"{args.bench_python} not found: run `make bench-venv` first")
    from cnnkit.paths import default_cache_dir

    arrays, description = load_sample(
        args.archive, args.sample, args.cache_dir or default_cache_dir()
    )
    print(f"Data: {description}; threads: {args.threads or 'default'}", flush=True)
    sides = ["keras", *CNNKIT_SIDES] if args.variants else ["keras", "cnnkit"]
    samples: dict[tuple[str, int], list[dict]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "sample.npz"
        np.savez(data, **arrays)
        for round_number in range(args.rounds):
            for batch_size in args.batch_sizes:
                # Rotate the order every round, so drifting load favours no side.
                shift = round_number % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    if side == "keras":
                        result = measure_keras(args.bench_python, data, batch_size, args.threads)
                    else:
                        levers = CNNKIT_SIDES[side]
                        if args.threads:
                            levers = dataclasses.replace(levers, threads=args.threads)
                        result = measure_cnnkit(data, batch_size, levers)
                    samples.setdefault((side, batch_size), []).append(result)
            elapsed = time.perf_counter() - start
            print(f"round {round_number + 1}/{args.rounds} done after {elapsed:.0f} s", flush=True)
    print_results(samples, sides, "images_per_second", "Training images/s (wall clock; the bars)")
    print_results(
        samples,
        sides,
        "images_per_cpu_second",
        "Images per CPU-second of the process (less sensitive to other load)",
    )
    medians = {
        f"{side}@{batch}": statistics.median(row["images_per_second"] for row in rows)
        for (side, batch), rows in samples.items()
    }
    ratios = {
        f"cnnkit/keras@{batch}": medians[f"cnnkit@{batch}"] / medians[f"keras@{batch}"]
        for batch in args.batch_sizes
    }
    record_result(
        args.name,
        {"data": description, "rounds": args.rounds, "images_per_second": medians, **ratios},
    )


if __name__ == "__main__":
    main()
