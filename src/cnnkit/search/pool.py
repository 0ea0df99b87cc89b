"""Starting, joining and stopping a search's extra worker processes, each running the same
optimize loop on the same study (what they share is in :mod:`cnnkit.search.workers`)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from dataclasses import replace
from typing import Any

import optuna

from cnnkit.config import RunConfig
from cnnkit.search.config import SearchConfig
from cnnkit.search.loop import optimize_study
from cnnkit.search.space import SearchSpace
from cnnkit.search.study import open_study
from cnnkit.search.trials import TrialRunner
from cnnkit.search.workers import INTERRUPTS, die_with_parent
from cnnkit.training.trainer import TrainingInterrupted

logger = logging.getLogger(__name__)
# How long a stopped worker gets to queue its trial again before it is terminated.
WORKER_STOP_SECONDS = 60.0


def worker_main(
    base: RunConfig,
    space: SearchSpace,
    config: SearchConfig,
    cache_dir: Any,
    threads: int,
    index: int = 1,
    held: int = 0,
) -> None:
    """Entry point of extra worker ``index``: the same loop, on the same study.

    A seeded sampler gets ``seed + index``: the same seed in every process would propose the
    same trials in each. On a continued study (``held`` trials when the main process opened
    it) that seed is mixed with ``held`` as the main process's is. Ctrl-C ends the worker
    quietly; the main process reports it.
    """
    import torch

    die_with_parent()
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # The main process reports trials.
    if config.sampler_seed is not None:
        config = replace(config, sampler_seed=(config.sampler_seed + index) % 2**32)
    try:
        # Ctrl-C and kill both stop the trial, whatever the shell that started the search left
        # (a background job starts with SIGINT ignored); the main process sends SIGTERM when it
        # is stopped itself.
        with INTERRUPTS.installed():
            study, _, _ = open_study(config, space, base.run_dir(), held)
            optimize_study(
                study, TrialRunner(base, space, config, base.run_dir(), cache_dir, False)
            )
    except (KeyboardInterrupt, TrainingInterrupted):
        return
    finally:
        # A second signal (the group's Ctrl-C and the main process's) must not cut the
        # interrupted trial's bookkeeping short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def join_workers(
    workers: list[multiprocessing.Process], report: bool = True, timeout: float | None = None
) -> None:
    """Wait for the worker processes to end (or ``timeout`` seconds each, then terminate
    them); with ``report``, warn of one that failed."""
    for process in workers:
        process.join(timeout)
        if process.is_alive():
            logger.warning("%s did not stop in %.0f s: terminated", process.name, timeout)
            process.terminate()
            process.join()
        if report and process.exitcode:
            logger.warning("%s exited with status %s", process.name, process.exitcode)


def stop_workers(workers: list[multiprocessing.Process], report: bool = True) -> None:
    """Interrupt the running workers (each queues its trial to run again) and wait for them.

    SIGTERM, which a worker handles as Ctrl-C once it runs, ends one still starting up
    quietly, where SIGINT would print a KeyboardInterrupt traceback from its imports.
    """
    for process in workers:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    join_workers(workers, report, timeout=WORKER_STOP_SECONDS)


def start_workers(
    base: RunConfig,
    space: SearchSpace,
    config: SearchConfig,
    cache_dir: Any,
    threads: int,
    held: int = 0,
) -> list[multiprocessing.Process]:
    """Start workers 1 to ``config.workers - 1`` (this process is worker 0), each with
    ``threads`` threads, on a study that held ``held`` trials when this search opened it."""
    # "spawn" gives each worker a fresh interpreter: forking a process that has used
    # OpenMP threads can hang the child.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=worker_main,
            args=(base, space, config, cache_dir, threads, index, held),
            name=f"cnnkit-search-worker-{index}",
        )
        for index in range(1, config.workers)
    ]
    for process in processes:
        process.start()
    return processes
