"""Shared by the benchmark scripts: where the real data lives and where results are written."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def shared_dataset(filename: str) -> Path:
    """Path of a file in ``../shared/data``; exits with a clear message when it is absent."""
    path = SHARED_DATA / filename
    if not path.exists():
        sys.exit(f"skipped: {path} is absent (the real data lives in ../shared/data)")
    return path


def record_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the command, date and machine."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    document = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_revision": revision or "unknown",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
