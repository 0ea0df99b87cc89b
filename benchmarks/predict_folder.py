"""What ``cnnkit predict MODEL FOLDER`` costs a folder of images: a batch of files at a time
(``PREDICT_CHUNK``, since the twenty-fifth session) against one file a call (before).

    python -m benchmarks.predict_folder

Both ways run in this process on the same folder of drawn symbols (random strokes, 32x32 PNG),
with the bundled float model in PyTorch (``--model`` for another), in alternating rounds after
a warm-up; their printed lines must be equal. The figures are the median seconds of each way
and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.record import record_result
from cnnkit.cli import predict as cli_predict
from cnnkit.inference.bundled import bundled_model_path
from cnnkit.inference.predictor import open_predictor


def write_symbols(folder: Path, count: int) -> list[Path]:
    """``count`` 32x32 PNGs of a random three-point stroke, black on white."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        image = Image.new("L", (32, 32), 255)
        points = [tuple(int(v) for v in rng.integers(2, 30, 2)) for _ in range(3)]
        ImageDraw.Draw(image).line(points, fill=0, width=2)
        path = folder / f"{index:04d}.png"
        image.save(path)
        paths.append(path)
    return paths


def timed_lines(predictor, paths: list[Path], chunk: int) -> tuple[float, str]:
    """Seconds to predict and print ``paths`` as the command does, ``chunk`` files a call,
    and the lines printed."""
    cli_predict.PREDICT_CHUNK = chunk
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        cli_predict._predict_and_print(predictor, paths, 1, False, names=True)
    return time.perf_counter() - start, out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model file (default: the bundled float model)")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="predict_folder", help="results file name")
    args = parser.parse_args()
    predictor = open_predictor(args.model or bundled_model_path(), "torch")
    batched = cli_predict.PREDICT_CHUNK
    ways = {"batched": batched, "one_file_a_call": 1}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_symbols(Path(folder), args.images)
        printed = {
            name: timed_lines(predictor, paths[:32], chunk)[1] for name, chunk in ways.items()
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, chunk in ways.items():
                elapsed, printed[name] = timed_lines(predictor, paths, chunk)
                times[name].append(elapsed)
    cli_predict.PREDICT_CHUNK = batched
    if printed["batched"] != printed["one_file_a_call"]:
        raise SystemExit("the two ways printed different lines")
    median = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        "images": args.images,
        "rounds": args.rounds,
        "chunk": batched,
        **{f"{name}_s": round(value, 3) for name, value in median.items()},
        "speed_up": round(median["one_file_a_call"] / median["batched"], 2),
        "images_per_s_batched": round(args.images / median["batched"], 1),
    }
    for key, value in figures.items():
        print(f"{key:>22}: {value}")
    record_result(args.name, figures)


if __name__ == "__main__":
    main()
