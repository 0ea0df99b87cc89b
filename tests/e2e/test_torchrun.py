"""Distributed training under torchrun: 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ARGS = [
    "train",
    "--dataset",
    "digits",
    "--epochs",
    "6",
    "--batch-size",
    "64",
    "--seed",
    "3",
    "--quiet",
]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
    "-m",
    "cnnkit",
]


def test_two_process_torchrun_matches_single_process(tmp_path: Path) -> None:
    single = tmp_path / "single"
    double = tmp_path / "ddp"
    _run([sys.executable, "-m", "cnnkit", *ARGS, "--out", str(single)], tmp_path)
    _run([*TORCHRUN, *ARGS, "--out", str(double)], tmp_path)
    single_info = json.loads((single / "run.json").read_text())
    double_info = json.loads((double / "run.json").read_text())
    single_val = single_info["fit"]["best_val_accuracy"]
    double_val = double_info["fit"]["best_val_accuracy"]
    assert single_val > 0.9
    assert abs(single_val - double_val) <= 0.01 + 1e-9, (single_val, double_val)
    assert sorted(p.name for p in double.glob("*.safetensors")) == ["model.safetensors"]
    # Only rank 0 wrote the metrics: one row per epoch, not two.
    assert len((double / "metrics.csv").read_text().strip().splitlines()) == 1 + 6


def test_torchrun_with_micro_batches_trains(tmp_path: Path) -> None:
    """Each process splits its 32 samples into passes of 8 and synchronises once a step."""
    out = tmp_path / "ddp-micro"
    _run([*TORCHRUN, *ARGS, "--micro-batch", "8", "--out", str(out)], tmp_path)
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["train"]["micro_batch_size"] == 8
    assert info["fit"]["best_val_accuracy"] > 0.9


def test_micro_batches_under_torchrun_give_the_single_process_whole_batch_step(tmp_path):
    """Two processes, each splitting its 8 samples into passes of 3, 3 and 2, synchronise
    gradients once and end with the weights of one process stepping on all 16 at once."""
    from tests.e2e import ddp_step_worker as worker

    command = [*TORCHRUN[:-2], str(Path(worker.__file__)), str(tmp_path), "3"]
    _run(command, tmp_path)
    reference = worker.trainer(None)
    reference._step(worker.batch())
    expected = [p.detach() for p in reference.module.parameters()]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True)
        assert result["reductions"] == 1  # one all-reduce for the step, not one a pass
        for got, want in zip(result["weights"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
