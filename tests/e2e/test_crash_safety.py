"""Crash safety through real ``cnnkit train`` processes: SIGKILL then ``--resume``, and Ctrl-C.

Each run trains a tiny CNN on the embedded digits for three epochs of about a second. A run
killed mid-epoch and resumed, and a run interrupted with SIGINT and resumed, must both end with
the metrics and the model tensors of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnkit.inference.artifact import ModelFileError, load_model, read_metadata
from cnnkit.training.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint

EPOCHS = 3
TRAIN_ARGUMENTS = [
    "train",
    "--dataset",
    "digits",
    "--max-per-class",
    "40",
    "--image-size",
    "16",
    "--width",
    "8",
    "--epochs",
    str(EPOCHS),
    "--batch-size",
    "16",
    "--seed",
    "7",
    "--device",
    "cpu",
    "--quiet",
]
# Columns that depend only on the seed; ``seconds`` and ``images_per_second`` are wall-clock.
SEEDED_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "learning_rate",
    "val_loss",
    "val_accuracy",
    "val_top5",
)
# Generous limits: the machine may be busy; an unloaded one finishes each run in seconds.
RUN_TIMEOUT = 600.0
# Outputs of a run folder; anything else left by a crash must be a write_atomically temporary.
RUN_OUTPUTS = {
    CHECKPOINT_NAME,
    "config.yaml",
    "metrics.csv",
    "model.safetensors",
    "report",
    "run.json",
    "tensorboard",
}
TEMPORARY = re.compile(r"\..+\.tmp")


@dataclass
class Process:
    """A ``cnnkit train`` subprocess whose output goes to files in its run folder's parent."""

    popen: subprocess.Popen
    run_dir: Path
    stdout_path: Path
    stderr_path: Path

    def wait(self) -> int:
        return self.popen.wait(timeout=RUN_TIMEOUT)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")

    def describe(self) -> str:
        return f"exit {self.popen.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def _restore_default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler; a terminal's Ctrl-C reaches a process with the default one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(run_dir: Path, cache_dir: Path, label: str, resume: bool = False) -> Process:
    """Start ``python -m cnnkit train`` on one thread (bit-exact CPU maths, no oversubscription)."""
    command = [sys.executable, "-m", "cnnkit", *TRAIN_ARGUMENTS, "--out", str(run_dir)]
    command += ["--cache-dir", str(cache_dir)] + (["--resume"] if resume else [])
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stdout_path = run_dir.parent / f"{run_dir.name}-{label}.out"
    stderr_path = run_dir.parent / f"{run_dir.name}-{label}.err"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        popen = subprocess.Popen(
            command,
            stdout=stdout,
            stderr=stderr,
            env=environment,
            preexec_fn=_restore_default_sigint,
        )
    return Process(popen, run_dir, stdout_path, stderr_path)


def _finish(process: Process, expected_code: int = 0) -> Process:
    try:
        code = process.wait()
    except subprocess.TimeoutExpired:
        process.popen.kill()
        process.popen.wait()
        pytest.fail(f"cnnkit train did not finish within {RUN_TIMEOUT:.0f} s")
    assert code == expected_code, process.describe()
    return process


def _complete_rows(path: Path) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` written so far (the file is rewritten whole each epoch)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        return []
    return [
        row for row in rows if "epoch" in row and None not in row.values() and all(row.values())
    ]


def _interrupt_during_second_epoch(process: Process, signal_number: int) -> None:
    """Wait for epoch 1's row, then signal the process about halfway through epoch 2."""
    metrics_path = process.run_dir / "metrics.csv"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (rows := _complete_rows(metrics_path)):
        if process.popen.poll() is not None:
            pytest.fail(f"the run ended before its first epoch:\n{process.describe()}")
        if time.monotonic() > deadline:
            process.popen.kill()
            pytest.fail("no completed epoch within the time limit")
        time.sleep(0.02)
    # The checkpoint is saved before the CSV row, so epoch 2 is now under way; a tenth of epoch
    # 1's duration puts the signal among its batches. (Half of it once let epochs 2 and 3 both
    # finish first: epoch 1 ran beside the reference run, the later ones alone, much faster.)
    time.sleep(float(rows[0]["seconds"]) / 10)
    process.popen.send_signal(signal_number)


def _seeded(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{column: row[column] for column in SEEDED_COLUMNS} for row in rows]


def _test_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text(encoding="utf-8"))
    metrics.pop("files")  # Paths into the run folder.
    assert metrics.pop("evaluated")["model"] == str((run_dir / "model.safetensors").resolve())
    return metrics


def _assert_same_final_model(run_dir: Path, reference_dir: Path) -> None:
    """Equal metrics, equal test evaluation, equal tensors and metadata in the model file."""
    assert _seeded(_complete_rows(run_dir / "metrics.csv")) == _seeded(
        _complete_rows(reference_dir / "metrics.csv")
    )
    assert _test_metrics(run_dir) == _test_metrics(reference_dir)
    tensors = load_file(str(run_dir / "model.safetensors"))
    reference_tensors = load_file(str(reference_dir / "model.safetensors"))
    assert tensors.keys() == reference_tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference_tensors[name]), name
    assert read_metadata(run_dir / "model.safetensors") == read_metadata(
        reference_dir / "model.safetensors"
    )
    load_model(run_dir / "model.safetensors")  # Its checksums verify.


class Reference:
    """The uninterrupted run, started at once and running beside the interrupted ones."""

    def __init__(self, root: Path) -> None:
        self.process = _start(root / "straight", root / "cache-straight", "run")
        self._finished = False

    def run_dir(self) -> Path:
        if not self._finished:
            _finish(self.process)
            self._finished = True
        return self.process.run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reference")
    started = Reference(root)
    yield started
    if started.process.popen.poll() is None:
        started.process.popen.kill()
        started.process.popen.wait()


@dataclass
class KilledRun:
    """A run killed with SIGKILL during epoch 2, what it left behind, and its resumption."""

    run_dir: Path
    files_after_kill: set[str]
    rows_after_kill: list[dict[str, str]]
    checkpoint_after_kill: dict
    planted: dict[str, bytes]
    resumed: Process


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> KilledRun:
    """Depends on ``reference`` so that the uninterrupted run starts first, beside this one."""
    root = tmp_path_factory.mktemp("killed")
    run_dir, cache_dir = root / "run", root / "cache"
    first = _start(run_dir, cache_dir, "killed")
    _interrupt_during_second_epoch(first, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, first.describe()
    files = {path.name for path in run_dir.iterdir()}
    rows = _complete_rows(run_dir / "metrics.csv")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    # What a kill inside write_atomically leaves: half-written temporaries beside the real files.
    planted = {
        f".{CHECKPOINT_NAME}.crashed1.tmp": (run_dir / CHECKPOINT_NAME).read_bytes()[:5000],
        ".model.safetensors.crashed2.tmp": b"\x10\x00\x00\x00\x00\x00\x00\x00{",
    }
    for name, content in planted.items():
        (run_dir / name).write_bytes(content)
    resumed = _finish(_start(run_dir, cache_dir, "resumed", resume=True))
    return KilledRun(run_dir, files, rows, checkpoint, planted, resumed)


def test_sigkill_then_resume_continues_and_matches_an_uninterrupted_run(
    killed_run: KilledRun, reference: Reference
) -> None:
    completed = int(killed_run.checkpoint_after_kill["epoch"])
    assert 1 <= completed < EPOCHS, "the kill must land after epoch 1 and before the last one"
    rows = _complete_rows(killed_run.run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(1, EPOCHS + 1)]
    # The epochs finished before the kill were not trained again: their rows keep the wall-clock
    # times measured by the killed process, which a second training could not reproduce.
    saved_seconds = [repr(row["seconds"]) for row in killed_run.checkpoint_after_kill["history"]]
    assert [row["seconds"] for row in killed_run.rows_after_kill] == saved_seconds[
        : len(killed_run.rows_after_kill)
    ]
    assert [row["seconds"] for row in rows[:completed]] == saved_seconds
    assert "Model: " in killed_run.resumed.stdout
    _assert_same_final_model(killed_run.run_dir, reference.run_dir())


def test_a_kill_leaves_no_half_written_file_that_loads(
    killed_run: KilledRun, tmp_path: Path
) -> None:
    leftovers = killed_run.files_after_kill - RUN_OUTPUTS
    assert all(TEMPORARY.fullmatch(name) for name in leftovers), leftovers
    # The kill came before the model was saved; the checkpoint is whole and holds epoch >= 1.
    assert "model.safetensors" not in killed_run.files_after_kill
    assert killed_run.checkpoint_after_kill["epoch"] >= 1
    # A file cut short, as a crash during a write without a temporary would leave it, never loads.
    run_dir = killed_run.run_dir
    loaders = (
        (CHECKPOINT_NAME, load_checkpoint, CheckpointError),
        ("model.safetensors", load_model, ModelFileError),
    )
    for name, load, error in loaders:
        content = (run_dir / name).read_bytes()
        for length in (8, len(content) // 2, len(content) - 8):
            truncated = tmp_path / f"{length}-{name}"
            truncated.write_bytes(content[:length])
            with pytest.raises(error):
                load(truncated)
    # The half-written temporaries planted before --resume were ignored (or removed): the run
    # continued from the real checkpoint and finished normally.
    for name, content in killed_run.planted.items():
        assert not (run_dir / name).exists() or (run_dir / name).read_bytes() == content
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["epoch"] == EPOCHS
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert "Traceback" not in killed_run.resumed.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_an_interrupt_saves_exits_cleanly_and_resumes(
    tmp_path: Path, reference: Reference, signum: int
) -> None:
    """Ctrl-C, or ``kill PID`` as a scheduler or ``docker stop`` sends it."""
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    first = _start(run_dir, cache_dir, "interrupted")
    _interrupt_during_second_epoch(first, signum)
    _finish(first, expected_code=130)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert "Traceback" not in first.stderr, first.stderr
    message = re.search(r"Interrupted after (\d+) completed epoch\(s\)\.", first.stdout)
    assert message, first.stdout
    completed = int(message.group(1))
    assert 1 <= completed < EPOCHS
    assert f"Checkpoint: {run_dir / CHECKPOINT_NAME}; rerun with --resume" in first.stdout
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert checkpoint["epoch"] == completed
    assert not (run_dir / "model.safetensors").exists()
    assert not [path for path in run_dir.iterdir() if TEMPORARY.fullmatch(path.name)]

    second = _finish(_start(run_dir, cache_dir, "resumed", resume=True))
    rows = _complete_rows(run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(1, EPOCHS + 1)]
    assert [row["seconds"] for row in rows[:completed]] == [
        repr(row["seconds"]) for row in checkpoint["history"]
    ]
    assert "Traceback" not in second.stderr
    _assert_same_final_model(run_dir, reference.run_dir())
