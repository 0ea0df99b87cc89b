"""Shared by the benchmark scripts: where the real data lives and where results are written."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cnnkit.atomic import write_atomically

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def shared_dataset(filename: str) -> Path:
    """Path of a file in ``../shared/data``; exits with a clear message when it is absent."""
    path = SHARED_DATA / filename
    if not path.exists():
        sys.exit(f"skipped: {path} is absent (the real data lives in ../shared/data)")
    return path


def command_line(argv: list[str]) -> str:
    """The command that re-runs this benchmark from the repository root: a script under
    ``benchmarks/`` as ``python -m benchmarks.NAME``, whatever path started it."""
    script = Path(argv[0]).resolve() if argv else None
    if script is not None and script.suffix == ".py" and script.parent == REPO_ROOT / "benchmarks":
        return " ".join(["python", "-m", f"benchmarks.{script.stem}", *argv[1:]])
    return " ".join(["python", *argv])


def cpu_name() -> str:
    """The processor's model name (Linux ``/proc/cpuinfo``), else what ``platform`` says.

    Two machines of the same architecture can differ in speed and in bf16 numerics (AMX or
    AVX-512 kernels), so results name the model."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_description() -> str:
    """The processor architecture and model, the CPU cores, and the GPU where CUDA has one
    (whether or not the benchmark used it: the payload's own fields say where it ran)."""
    cpu = f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            return f"{cpu}, {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return cpu


def record_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the command, date and machine."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    revision = subprocess.run(
        # "-dirty" marks figures measured with uncommitted changes.
        ["git", "describe", "--always", "--dirty"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    document = {
        "benchmark": name,
        "command": command_line(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_revision": revision or "unknown",
        "machine": machine_description(),
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    text = json.dumps(document, indent=2, default=str) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return path
