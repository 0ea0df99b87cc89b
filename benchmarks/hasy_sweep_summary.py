"""Summarise a ``benchmarks/hasy_gpu_sweep.sh`` run: each variant's test top-1 curve (from its
log, so a variant stopped at the time limit still counts), its planned and finished epochs, and
its final figures where it finished. Records ``benchmarks/results/NAME.json``.

    python -m benchmarks.hasy_sweep_summary OUT_DIR [--configs DIR] [--name hasy_gpu_sweep]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from benchmarks.record import REPO_ROOT, record_result
from cnnkit.presets import preset_for

EPOCH_LINE = re.compile(r"^epoch (\d+): test top-1 ([0-9.]+)$")


def summarise(log: Path, config: Path, result: Path | None) -> dict:
    """One variant: its settings file, curve, planned epochs and final figures (if finished)."""
    curve = [
        [int(match[1]), float(match[2])]
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
        if (match := EPOCH_LINE.match(line))
    ]
    overrides = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    planned = overrides.get("train", {}).get("epochs", preset_for("hasy")["train"]["epochs"])
    summary = {
        "config": str(
            config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT) else config
        ),
        "overrides": overrides,
        "epochs_planned": planned,
        "epochs_finished": len(curve),
        "finished": result is not None,
        "best_test_top1": max((accuracy for _, accuracy in curve), default=None),
        "curve": curve,
    }
    if result is not None:
        figures = json.loads(result.read_text(encoding="utf-8"))
        summary.update(
            test_top1=figures["test_top1"],
            test_top5=figures["test_top5"],
            wall_minutes=figures["wall_minutes"],
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the folder the sweep wrote its logs to")
    parser.add_argument(
        "--configs", default="benchmarks/configs", help="the folder of hasy_gpu_NAME.yaml"
    )
    parser.add_argument("--name", default="hasy_gpu_sweep", help="record under this name")
    args = parser.parse_args()
    out = Path(args.out_dir)
    variants = {}
    for log in sorted(out.glob("*.log")):
        config = (REPO_ROOT / args.configs / f"hasy_gpu_{log.stem}.yaml").resolve()
        if not config.exists():
            continue  # the sweep's own log, say
        result = out / f"hasy_gpu_{log.stem}.json"
        variants[log.stem] = summarise(log, config, result if result.exists() else None)
        item = variants[log.stem]
        final = f", final {item['test_top1']:.4f}" if item["finished"] else " (stopped)"
        print(
            f"{log.stem}: {item['epochs_finished']}/{item['epochs_planned']} epochs, "
            f"best {item['best_test_top1']:.4f}{final}"
        )
    gpu = out / "gpu.txt"
    device = gpu.read_text(encoding="utf-8").strip() if gpu.exists() else "unknown"
    path = record_result(args.name, {"device": device, "variants": variants})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
