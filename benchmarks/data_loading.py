"""Time loading HASYv2 through the image cache: first decode, cached load, naive baseline.

Usage: ``python -m benchmarks.data_loading [--archive PATH] [--name NAME]``. The first load
streams the whole archive into a fresh temporary cache with the default preprocessing (1
channel, 32x32); the cached load repeats it. The baseline opens extracted PNGs one by one with
PIL in a single process, on a sample, and is scaled to the whole dataset.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.record import record_result
from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.hasy import HasySource
from cnnkit.data.sources import build_splits
from cnnkit.data.tar_reader import iter_archive

DEFAULT_ARCHIVE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "HASYv2-dev.tar.bz2"
)
FIRST_LOAD_BAR_S = 30.0
CACHED_LOAD_BAR_S = 2.0


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decoding pool)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def time_build_splits(config: DataConfig, cache_dir: Path) -> tuple[float, float, bool, int]:
    """Return the wall and CPU seconds, whether the cache answered, and the image count."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    loaded = build_splits(config, Preprocessing(), cache_dir=cache_dir)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    splits = loaded.splits
    count = len(splits.train) + len(splits.test) + (len(splits.val) if splits.val else 0)
    return seconds, cpu, loaded.from_cache, count


def time_naive_baseline(archive: Path, sample_size: int, folder: Path) -> float:
    """Seconds per image to open, convert and resize extracted PNGs in one process."""
    paths = []
    for _, data in iter_archive(archive, lambda name: name.endswith(".png")):
        if data is None:
            continue
        path = folder / f"{len(paths)}.png"
        path.write_bytes(data)
        paths.append(path)
        if len(paths) >= sample_size:
            break
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BILINEAR))
    return (time.perf_counter() - start) / len(paths)


def run(archive: Path, sample_size: int, fold: int | None) -> dict:
    config = DataConfig(dataset="hasy", data=str(archive), fold=fold)
    load_before = os.getloadavg()[0]
    start, start_cpu = time.perf_counter(), cpu_seconds()
    HasySource(archive, fold=fold).list_samples()
    listing_s, listing_cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    with tempfile.TemporaryDirectory(prefix="cnnkit-bench-") as scratch:
        cache_dir = Path(scratch) / "cache"
        first_s, first_cpu, first_cached, count = time_build_splits(config, cache_dir)
        cached_s, cached_cpu, cached, _ = time_build_splits(config, cache_dir)
        baseline_dir = Path(scratch) / "baseline"
        baseline_dir.mkdir()
        naive_per_image = time_naive_baseline(archive, sample_size, baseline_dir)
    naive_s = naive_per_image * count
    return {
        "archive": str(archive),
        "images": count,
        "cpu_count": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "listing_s": round(listing_s, 2),
        "listing_cpu_s": round(listing_cpu, 2),
        "first_load_s": round(first_s, 2),
        "first_load_cpu_s": round(first_cpu, 2),
        "first_load_from_cache": first_cached,
        "cached_load_s": round(cached_s, 2),
        "cached_load_cpu_s": round(cached_cpu, 2),
        "cached_load_from_cache": cached,
        "naive_sample_size": sample_size,
        "naive_per_image_us": round(naive_per_image * 1e6, 1),
        "naive_estimate_s": round(naive_s, 2),
        "speedup_first_vs_naive": round(naive_s / first_s, 2),
        "speedup_cached_vs_naive": round(naive_s / cached_s, 2),
        "first_load_bar_met": first_s <= FIRST_LOAD_BAR_S,
        "cached_load_bar_met": cached_s <= CACHED_LOAD_BAR_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--sample", type=int, default=5000, help="images in the naive baseline")
    parser.add_argument("--name", default="data_loading", help="record as results/NAME.json")
    args = parser.parse_args()
    if not args.archive.is_file():
        parser.exit(1, f"archive not found: {args.archive}\n")
    figures = run(args.archive, args.sample, args.fold)
    print(f"HASYv2 data loading, {figures['images']:,} images, {figures['cpu_count']} cores")
    print(f"  load average before     {figures['load_average_before']}")
    print("                           wall s    CPU s")
    print(f"  listing only            {figures['listing_s']:7.2f}  {figures['listing_cpu_s']:7.2f}")
    bar = "met" if figures["first_load_bar_met"] else "MISSED"
    print(
        f"  first load (decode)     {figures['first_load_s']:7.2f}  "
        f"{figures['first_load_cpu_s']:7.2f}  (bar 30 s: {bar})"
    )
    bar = "met" if figures["cached_load_bar_met"] else "MISSED"
    print(
        f"  cached load             {figures['cached_load_s']:7.2f}  "
        f"{figures['cached_load_cpu_s']:7.2f}  (bar 2 s: {bar})"
    )
    print(
        f"  naive PIL, 1 process    {figures['naive_estimate_s']:7.2f} s  "
        f"({figures['naive_per_image_us']} us/image on {figures['naive_sample_size']} files)"
    )
    print(
        f"  speed-up vs naive       {figures['speedup_first_vs_naive']:.1f}x first, "
        f"{figures['speedup_cached_vs_naive']:.1f}x cached"
    )
    record_result(args.name, figures)


if __name__ == "__main__":
    main()
