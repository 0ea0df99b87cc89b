"""CUB-200-2011 (dev copy, official split) transfer bars: the default recipe reaches >= 88% top-1
on the test split within 30 minutes on a 2-core CPU, data decoding included; the frozen phase
alone is reported separately, next to logistic regression on frozen centre-crop features.

    python -m benchmarks.cub_transfer                  # = cnnkit train --dataset cub
    python -m benchmarks.cub_transfer --phases frozen  # the frozen phase alone
    python -m benchmarks.cub_transfer --set train.epochs=4 --set data.val_fraction=0

The decoded-image cache starts empty (a fresh temporary folder) unless ``--cache-dir`` is given,
so the wall time includes decoding every JPEG. Wall and CPU seconds are both printed: on a
machine shared with other jobs the CPU seconds show what the run itself needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.record import record_result, shared_dataset
from cnnkit.config import build_run_config, config_to_dict
from cnnkit.presets import preset_for
from cnnkit.runtime import tune_allocator
from cnnkit.training.phases import PHASES_NAME, phase_label
from cnnkit.training.run import train_run

ARCHIVE = "CUB_200_2011-dev.tgz"
BARS = {"top1": 0.88, "wall_seconds": 30 * 60}


def cpu_seconds() -> float:
    """User plus system CPU time of this process and its finished children (decoders)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def parse_setting(text: str) -> dict[str, Any]:
    """``section.field=value`` (value parsed as YAML) -> ``{section: {field: value}}``."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise SystemExit(f"--set needs SECTION.FIELD=VALUE; got {text!r}")
    dotted, raw = text.split("=", 1)
    section, name = dotted.split(".", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; numbers are meant here.
        with contextlib.suppress(ValueError):
            value = float(value)
    return {section: {name: value}}


def logistic_regression_baseline(config, cache_dir: str) -> float:
    """Test top-1 of logistic regression on Lite0's frozen centre-crop features, the issue's
    yardstick: images decoded for Lite0's own input (224 px centre crop of 256), not the run's."""
    from sklearn.linear_model import LogisticRegression

    from cnnkit.data.sources import build_splits
    from cnnkit.models.registry import create_model
    from cnnkit.training.features import (
        FeatureCache,
        FeatureSource,
        FeatureView,
        digest_module,
        load_or_compute_features,
    )
    from cnnkit.training.run import feature_cache_dir

    model = create_model("efficientnet_lite0", 1000, 3, pretrained=True).eval()
    splits = build_splits(config.data, model.default_preprocessing, cache_dir).splits
    source = FeatureSource(
        "efficientnet_lite0", digest_module(model.backbone), model.default_preprocessing
    )
    cache = FeatureCache(feature_cache_dir(cache_dir))  # Beside the run's own features.
    device = torch.device("cpu")
    train, _ = load_or_compute_features(
        model, splits.train.images, source, FeatureView(0), cache, device
    )
    test, _ = load_or_compute_features(
        model, splits.test.images, source, FeatureView(0), cache, device
    )
    classifier = LogisticRegression(max_iter=2000, random_state=config.train.seed)
    classifier.fit(train, splits.train.labels)
    return float(np.mean(classifier.predict(test) == splits.test.labels))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", help="frozen,finetune (default: the preset's) or frozen")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override on top of the cub preset (repeatable)",
    )
    parser.add_argument("--cache-dir", help="decoded-image cache (default: a fresh temp folder)")
    parser.add_argument("--out", help="run folder (default: a fresh temp folder)")
    parser.add_argument("--baseline", action="store_true", help="also fit logistic regression")
    parser.add_argument("--name", default="cub_transfer", help="results file name")
    args = parser.parse_args()
    archive = shared_dataset(ARCHIVE)
    # Removed when the benchmark ends (its fresh cache takes hundreds of megabytes).
    scratch = tempfile.TemporaryDirectory(prefix="cnnkit-cub-bench-")
    work = Path(scratch.name)
    layers: list[dict[str, Any]] = [
        preset_for("cub"),
        {"data": {"dataset": "cub", "data": str(archive)}, "out": args.out or str(work / "run")},
    ]
    if args.phases:
        layers.append({"transfer": {"phases": args.phases.split(",")}})
    layers += [parse_setting(text) for text in args.set]
    config = build_run_config(*layers)
    if config.train.fast_path:
        tune_allocator()
    cache_dir = args.cache_dir or str(work / "cache")
    print(f"config: {json.dumps(config_to_dict(config), default=str)}", flush=True)

    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    result = train_run(config, cache_dir=cache_dir, progress=False)
    wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
    phases = json.loads((result.run_dir / PHASES_NAME).read_text())["phases"]
    phases[-1]["test_top1"] = result.test_metrics["top1"]
    phases[-1]["test_top5"] = result.test_metrics["top5"]

    print(f"data: {result.data_description}")
    for phase in phases:
        print(
            f"phase {phase['name']:<10}: val {_percent(phase['val_accuracy'])}  "
            f"test top-1 {_percent(phase['test_top1'])}  top-5 {_percent(phase['test_top5'])}  "
            f"epochs {phase['epochs_run']} (kept {phase['kept_epoch']})  "
            f"{phase['seconds']:.0f} s  {json.dumps(phase['details'])}"
        )
    for row in result.fit.history:
        if row.get("phase", 0.0) >= 2.0:
            print(
                f"  {phase_label(row['phase'])} epoch {int(row['epoch'])}: "
                f"train_acc {row['train_accuracy']:.4f}  "
                f"val_acc {row.get('val_accuracy', float('nan')):.4f}  "
                f"{row['images_per_second']:.1f} img/s  {row['seconds']:.0f} s"
            )
    timings = {key: round(value, 1) for key, value in result.seconds.items()}
    top1 = result.test_metrics["top1"]
    print(f"timings (s): {timings}")
    print(f"test: top-1 {top1:.4f}  top-5 {result.test_metrics['top5']:.4f}")
    print(f"wall {wall:.0f} s, CPU {cpu:.0f} s (process + decoders)")
    baseline = None
    if args.baseline:
        baseline = logistic_regression_baseline(config, cache_dir)
        print(f"logistic regression on frozen centre-crop features: test top-1 {baseline:.4f}")
    passed = top1 >= BARS["top1"] and wall <= BARS["wall_seconds"]
    print(f"bars (top-1 >= {BARS['top1']:.0%}, wall <= 30 min): {'PASS' if passed else 'FAIL'}")
    path = record_result(
        args.name,
        {
            "config": config_to_dict(config),
            "data": result.data_description,
            "phases": phases,
            "test": result.test_metrics,
            "timings": timings,
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "logistic_regression_top1": baseline,
            "bars": BARS,
            "passed": passed,
        },
    )
    print(f"recorded: {path}")


if __name__ == "__main__":
    main()
