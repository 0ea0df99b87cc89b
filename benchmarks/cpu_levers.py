"""Training throughput (images/s) on the CPU under each speed lever, alone and combined.

Levers: glibc allocator tuning (``cnnkit.runtime.tune_allocator``), channels-last memory format,
bf16 autocast, and the number of torch threads. Every measurement runs in a fresh process (the
allocator setting cannot be undone) through cnnkit's real training path: ``Trainer`` with a
``BatchLoader``. Configurations alternate within each round; the table shows medians.

    python benchmarks/cpu_levers.py                  # about 5 minutes on 2 cores
    python benchmarks/cpu_levers.py --rounds 5 --seconds 6

``--worker JSON`` is the per-process entry point, also used by ``benchmarks/vs_keras.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOADS = {
    # name: (model, model options, channels, batch size, optimizer)
    "book_cnn b32": ("book_cnn", {"dense": 1024}, 3, 32, "adam"),
    "book_cnn b256": ("book_cnn", {"dense": 1024}, 3, 256, "adam"),
    "symbol_cnn b128": ("symbol_cnn", {}, 1, 128, "adamw"),
}
BOOK_1024_PARAMETERS = 1_569_041
NUM_CLASSES = 369


@dataclass(frozen=True)
class Levers:
    """The speed settings of one measurement process.

    ``passive_wait`` sets ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of
    spinning) and ``fused_optimizer`` builds Adam/AdamW with ``fused=True``; neither is a
    cnnkit option today; they measure proposed changes.
    """

    tune_allocator: bool = False
    channels_last: bool = False
    bf16: bool = False
    threads: int | None = None
    passive_wait: bool = False
    fused_optimizer: bool = False

    def describe(self) -> str:
        names = {
            "tune_allocator": "allocator",
            "channels_last": "channels_last",
            "bf16": "bf16",
            "passive_wait": "passive wait",
            "fused_optimizer": "fused adam",
        }
        parts = [label for name, label in names.items() if getattr(self, name)]
        if self.threads:
            parts.append(f"threads={self.threads}")
        return " + ".join(parts) or "baseline"


class _FusedOptimizerTrainer:
    """Mixin: the trainer's own optimizer, rebuilt with ``fused=True`` (Adam and AdamW)."""

    def _build_optimizer(self):
        import torch

        optimizer = super()._build_optimizer()
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return optimizer
        groups = [
            {"params": group["params"], "lr": group["lr"]} for group in optimizer.param_groups
        ]
        defaults = optimizer.defaults
        return type(optimizer)(
            groups, lr=defaults["lr"], weight_decay=defaults["weight_decay"], fused=True
        )


@dataclass(frozen=True)
class WorkerJob:
    """One training measurement: a model, a batch size, how many steps, and the levers.

    ``data`` names an ``.npz`` file with ``images`` (uint8 ``[N, S, S, C]``), ``labels`` and
    ``num_classes``; without it the images are random.
    """

    model: str
    options: dict[str, Any]
    channels: int
    batch_size: int
    optimizer: str = "adam"
    levers: Levers = field(default_factory=Levers)
    warmup_steps: int = 5
    seconds: float = 4.0
    steps: int | None = None
    data: str | None = None
    augment: bool = False


def run_worker(job: WorkerJob) -> dict[str, Any]:
    """Measure steady-state training images/s in this process (call it in a fresh process).

    The warm-up steps go through ``Trainer.fit`` (which builds the optimizer); the measured
    steps through ``Trainer.train_epoch``, whose own timer includes the loader and transforms.
    """
    if job.levers.tune_allocator:
        from cnnkit.runtime import tune_allocator

        tune_allocator()
    import numpy as np
    import torch

    from cnnkit.config import AugmentConfig, TrainConfig
    from cnnkit.data.dataset import ImageSet
    from cnnkit.data.loader import BatchLoader, build_train_transform
    from cnnkit.models.registry import create_model
    from cnnkit.training.trainer import Trainer

    if job.levers.threads:
        torch.set_num_threads(job.levers.threads)
    torch.manual_seed(0)
    if job.data:
        arrays = np.load(job.data)
        images, labels = arrays["images"], arrays["labels"].astype(np.int64)
        num_classes = int(arrays["num_classes"])
    else:
        generator = np.random.default_rng(0)
        images = generator.integers(0, 256, (4096, 32, 32, job.channels), np.uint8)
        labels = generator.integers(0, NUM_CLASSES, len(images)).astype(np.int64)
        num_classes = NUM_CLASSES
    model = create_model(job.model, num_classes, job.channels, **job.options)
    parameters = sum(p.numel() for p in model.parameters())
    image_set = ImageSet(images, labels, [str(i) for i in range(num_classes)])
    transform = build_train_transform(model.default_preprocessing, AugmentConfig(job.augment))
    config = TrainConfig(
        epochs=1,
        batch_size=job.batch_size,
        optimizer=job.optimizer,
        learning_rate=1e-3,
        weight_decay=0.0,
        schedule="constant",
        warmup_fraction=0.0,
        label_smoothing=0.0,
        device="cpu",
        channels_last=job.levers.channels_last,
        bf16_cpu=job.levers.bf16,
    )
    trainer_class = Trainer
    if job.levers.fused_optimizer:
        trainer_class = type("FusedOptimizerTrainer", (_FusedOptimizerTrainer, Trainer), {})
    trainer = trainer_class(model, config, torch.device("cpu"), progress=False)

    def loader(max_batches: int) -> BatchLoader:
        return BatchLoader(
            image_set,
            job.batch_size,
            transform,
            shuffle=True,
            drop_last=True,
            max_batches=max_batches,
        )

    start = time.perf_counter()
    trainer.fit(loader(job.warmup_steps))
    warmup_seconds = time.perf_counter() - start
    # Without a fixed step count, size the run from the warm-up speed to take about ``seconds``.
    step_seconds = warmup_seconds / job.warmup_steps
    steps = job.steps or max(10, int(job.seconds / max(step_seconds, 1e-6)))
    measured = loader(steps)
    measured.set_epoch(1)
    cpu_start = time.process_time()
    row = trainer.train_epoch(measured)
    cpu_seconds = time.process_time() - cpu_start
    return {
        "images_per_second": row["images_per_second"],
        # Images per CPU-second of this process: robust to other load on one thread.
        "images_per_cpu_second": steps * job.batch_size / max(cpu_seconds, 1e-9),
        "steps": steps,
        "images": steps * job.batch_size,
        "parameters": parameters,
        "threads": torch.get_num_threads(),
        "loss": row["train_loss"],
    }


def measure_in_subprocess(jobs: list[WorkerJob], timeout: float = 900) -> list[dict[str, Any]]:
    """Run :func:`run_worker` for each job, in order, in one fresh Python process.

    The jobs must share their levers: the allocator setting and the OpenMP wait policy hold for
    the whole process.
    """
    levers = jobs[0].levers
    if any(job.levers != levers for job in jobs):
        raise ValueError("jobs run in one process must share their levers")
    payload = json.dumps([{**job.__dict__, "levers": job.levers.__dict__} for job in jobs])
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", payload]
    environment = dict(os.environ)
    if levers.passive_wait:
        environment["OMP_WAIT_POLICY"] = "PASSIVE"
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environment
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker failed: {completed.stderr.strip()[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def lever_configs(cores: int) -> list[Levers]:
    """Each lever alone, then the levers together."""
    configs = [
        Levers(),
        Levers(tune_allocator=True),
        Levers(channels_last=True),
        Levers(bf16=True),
        Levers(threads=1),
    ]
    if cores > 2:
        configs.append(Levers(threads=cores // 2))
    configs += [
        Levers(passive_wait=True),
        Levers(fused_optimizer=True),
        Levers(tune_allocator=True, channels_last=True),
        Levers(tune_allocator=True, channels_last=True, passive_wait=True, fused_optimizer=True),
        Levers(
            tune_allocator=True,
            channels_last=True,
            passive_wait=True,
            fused_optimizer=True,
            bf16=True,
        ),
    ]
    return configs


def print_table(
    samples: dict[tuple[str, Levers], list[dict]],
    workloads: list[str],
    configs: list[Levers],
    metric: str,
    title: str,
) -> None:
    print(f"\n{title}")
    print(f"{'workload':<16} {'levers':<58} {'median':>7} {'vs base':>8}  rounds")
    for workload in workloads:
        baseline = statistics.median(row[metric] for row in samples[(workload, Levers())])
        for levers in configs:
            values = [row[metric] for row in samples[(workload, levers)]]
            median = statistics.median(values)
            spread = ", ".join(f"{value:.0f}" for value in values)
            print(
                f"{workload:<16} {levers.describe():<58} {median:>7.0f} "
                f"{median / baseline:>7.2f}x  [{spread}]"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="measured time per run")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--name", default="cpu_levers", help="results file name")
    args = parser.parse_args()
    if args.worker:
        jobs = [{**raw, "levers": Levers(**raw["levers"])} for raw in json.loads(args.worker)]
        print(json.dumps([run_worker(WorkerJob(**job)) for job in jobs]))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    configs = lever_configs(cores or 1)
    samples: dict[tuple[str, Levers], list[dict]] = {}
    start = time.perf_counter()
    print(
        f"{cores} cores, {args.rounds} rounds; synthetic 32x32 images, {NUM_CLASSES} classes, "
        "no augmentation"
    )
    for round_number in range(args.rounds):
        # One process per configuration and round runs every workload, which keeps the
        # interpreter start-up (about 2 s) from dominating the run time.
        for levers in configs:
            jobs = [
                WorkerJob(
                    *WORKLOADS[workload],
                    levers=levers,
                    warmup_steps=args.warmup_steps,
                    seconds=args.seconds,
                )
                for workload in args.workloads
            ]
            for workload, job, result in zip(
                args.workloads, jobs, measure_in_subprocess(jobs), strict=True
            ):
                if job.model == "book_cnn" and result["parameters"] != BOOK_1024_PARAMETERS:
                    raise SystemExit(f"book_cnn has {result['parameters']} parameters")
                samples.setdefault((workload, levers), []).append(result)
        print(
            f"round {round_number + 1} done after {time.perf_counter() - start:.0f} s", flush=True
        )
    print_table(samples, args.workloads, configs, "images_per_second", "Training images/s")
    print_table(
        samples,
        args.workloads,
        configs,
        "images_per_cpu_second",
        "Images per CPU-second of the process (spin-waiting counts as CPU time)",
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import record_result

    medians = {
        f"{workload} | {levers.describe()}": statistics.median(
            row["images_per_second"] for row in samples[(workload, levers)]
        )
        for workload in args.workloads
        for levers in configs
    }
    record_result(args.name, {"rounds": args.rounds, "images_per_second": medians})


if __name__ == "__main__":
    main()
