"""Hyperparameter search with Optuna: trial configs for train_run, pruning, resumable studies.

Search only produces configs and calls the one training function; each trial is a normal run
folder under ``RUN_DIR/trials/``. The study lives in SQLite, so a rerun continues it and several
processes can work on it at once. This module drives a search from its checks to its results.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna

from cnnkit.config import RunConfig
from cnnkit.data.sources import LoadedData
from cnnkit.evaluation.search_table import TrialSummary
from cnnkit.search.budget import nothing_left_to_run, process_count, trials_to_run
from cnnkit.search.config import SearchConfig
from cnnkit.search.loop import optimize_study
from cnnkit.search.pool import join_workers, start_workers, stop_workers
from cnnkit.search.results import (
    FINISHED,
    TrialReporter,
    count_trials,
    write_outputs,
)
from cnnkit.search.retrain import retrain_best
from cnnkit.search.settings import check_same_search, write_search_settings
from cnnkit.search.space import SearchSpace
from cnnkit.search.space_checks import check_space
from cnnkit.search.study import build_sampler, open_study
from cnnkit.search.trials import TrialRunner
from cnnkit.search.workers import INTERRUPTS, recover_trials
from cnnkit.training.run import RunResult
from cnnkit.training.trainer import TrainingInterrupted

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a search (this call and any earlier or parallel ones on the study) produced."""

    run_dir: Path
    storage: str
    study_name: str
    trials: list[TrialSummary]
    counts: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)
    retrained: RunResult | None = None
    seconds: float = 0.0

    @property
    def best(self) -> TrialSummary | None:
        """The finished (not pruned) trial with the highest validation accuracy."""
        finished = [t for t in self.trials if t.state == "complete"]
        return max(finished, key=lambda t: t.val_accuracy, default=None)


def run_search(
    base: RunConfig,
    space: SearchSpace,
    config: SearchConfig,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    on_trial: Callable[[TrialSummary], None] | None = None,
    on_data: Callable[[LoadedData], None] | None = None,
    data: LoadedData | None = None,
    space_file: str | Path | None = None,
) -> SearchResult:
    """Run (or continue) a search and write its results table, plots and HParams.

    With ``config.workers > 1`` the extra workers are separate processes on the same study,
    each with ``cpu_count // workers`` threads; they load the data through ``cache_dir``.

    Args:
        base: the resolved config every trial starts from (its ``out`` is the search folder).
        space: the hyperparameters to search.
        config: sampler, pruner, budget, workers and storage.
        cache_dir: decoded-image cache root.
        progress: show training progress bars (this process only).
        on_trial: called after each trial this process finishes (the CLI prints a line).
        on_data: called once the data is loaded.
        data: already-loaded splits to use for every trial with the base data config.
        space_file: the YAML file ``space`` was read from, which errors about it name (else
            they name the space).

    Returns:
        The study's trials (from every process) and the files written.

    Raises:
        ValueError: if the base config trains on the test images (``train_on_all``) or holds
            out no validation images, or the space does not fit the base config or the
            sampler (a parameter that sets the data split, a model option one of its models
            does not take, a continuous range for the grid sampler).
    """
    with INTERRUPTS.installed():  # Ctrl-C and kill never land inside a storage query.
        return _run_search(
            base, space, config, cache_dir, progress, on_trial, on_data, data, space_file
        )


def _run_search(
    base: RunConfig,
    space: SearchSpace,
    config: SearchConfig,
    cache_dir: str | Path | None,
    progress: bool,
    on_trial: Callable[[TrialSummary], None] | None,
    on_data: Callable[[LoadedData], None] | None,
    data: LoadedData | None,
    space_file: str | Path | None = None,
) -> SearchResult:
    """:func:`run_search`'s steps, with its guard against Ctrl-C and kill installed."""
    import torch

    check_held_out(base)
    start = time.perf_counter()
    run_dir = base.run_dir()
    if not logger.isEnabledFor(logging.DEBUG):
        # Each trial is reported once (on_trial); Optuna's own INFO lines would repeat it.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = _checked_config(base, space, config, space_file)
    study, url, name, held_at_start = _open_search(base, space, config)
    runner = TrialRunner(base, space, config, run_dir, cache_dir, progress, data, on_data)
    threads = torch.get_num_threads()
    _load_data_first(study, runner)
    runner.config = config = replace(config, workers=process_count(study, config, space))
    workers = _start_extra_workers(runner, held_at_start)
    reporter = TrialReporter(on_trial, run_dir, study)
    _run_trials(study, runner, reporter, workers, threads)
    reporter.report_new(study)  # Trials the other processes finished last.
    trials, files = write_outputs(study, space, run_dir)
    counts = count_trials(study, trials)
    retrained = None
    if config.retrain_best and counts["complete"]:
        retrained = retrain_best(study, base, space, runner, progress)
    elif config.retrain_best:
        logger.warning("--retrain-best: no trial finished, so there is nothing to retrain")
    return SearchResult(
        run_dir, url, name, trials, counts, files, retrained, time.perf_counter() - start
    )


def _checked_config(
    base: RunConfig, space: SearchSpace, config: SearchConfig, space_file: str | Path | None
) -> SearchConfig:
    """Check the space, and the search against the one its folder holds, before the folder
    and the study are created (a refused search leaves nothing behind).

    Returns:
        ``config``, with the study name the folder records where it names none: a continued
        search works on its own study.
    """
    check_space(space, base, config.sampler, space_file)
    recorded_name = check_same_search(base.run_dir(), base, space, config)
    if config.study_name is None and recorded_name:
        config = replace(config, study_name=recorded_name)
    return config


def _open_search(
    base: RunConfig, space: SearchSpace, config: SearchConfig
) -> tuple[optuna.Study, str, str, int]:
    """Open (or continue) the study, record the search in ``RUN_DIR/search.yaml``, and queue
    again the trials a stopped run left.

    Returns:
        The study, its storage URL, its name, and the trials it held when it was opened (which
        a seeded sampler's seed is derived from, in this process and in the workers).
    """
    run_dir = base.run_dir()
    study, url, name = open_study(config, space, run_dir)
    held_at_start = len(study.get_trials(deepcopy=False))
    if held_at_start:
        # A continued study: a seeded sampler goes on with new points, not its first ones.
        study.sampler = build_sampler(config, space, held_at_start)
    write_search_settings(run_dir, base, space, config, name, url)
    queued = recover_trials(study)
    if queued:
        logger.warning("re-queued interrupted trial(s) %s", queued)
    finished = sum(trial.state in FINISHED for trial in study.trials)
    if finished:  # A rerun of the same command continues the study rather than starting over.
        logger.warning(
            "%s: continuing study %s, which holds %d finished trial(s)", run_dir, name, finished
        )
    return study, url, name, held_at_start


def _load_data_first(study: optuna.Study, runner: TrialRunner) -> None:
    """Load (and cache) the base config's data before any worker starts, so that the workers
    read it from the cache instead of all decoding it at once; with no trial left to run,
    say why instead."""
    config, space = runner.config, runner.space
    if trials_to_run(study, config, space) != 0:
        with INTERRUPTS.interruptible():
            runner.data_for(runner.base)
    else:
        logger.warning("%s: %s", runner.run_dir, nothing_left_to_run(study, config, space))


def _start_extra_workers(runner: TrialRunner, held: int) -> list[multiprocessing.Process]:
    """Start the ``runner.config.workers - 1`` processes that work on the study besides this
    one, and give this one its share of the cores too (none started for one process)."""
    import torch

    config = runner.config
    if config.workers <= 1:
        return []
    per_worker = max(1, (os.cpu_count() or 1) // config.workers)
    workers = start_workers(runner.base, runner.space, config, runner.cache_dir, per_worker, held)
    torch.set_num_threads(per_worker)
    return workers


def _run_trials(
    study: optuna.Study,
    runner: TrialRunner,
    reporter: TrialReporter,
    workers: list[multiprocessing.Process],
    threads: int,
) -> None:
    """Run trials in this process, then wait for the ``workers``; restore ``threads`` threads.

    A stop (Ctrl-C or kill) stops the workers, writes the results of the trials so far and
    raises again; any other error stops the workers and raises at once.
    """
    import torch

    try:
        optimize_study(study, runner, reporter)
        with INTERRUPTS.interruptible():  # Ctrl-C while waiting for them lands below too.
            join_workers(workers)
    except (TrainingInterrupted, KeyboardInterrupt):
        stop_workers(workers)  # A kill reaches this process alone: stop the workers too.
        write_outputs(study, runner.space, runner.run_dir)  # The tables and figures so far.
        raise
    except BaseException:
        # Any other error ends the search now, not once the workers have run the budget.
        stop_workers(workers, report=False)
        raise
    finally:
        torch.set_num_threads(threads)


def check_held_out(base: RunConfig) -> None:
    """Refuse a base config that leaves no held-out images to rank trials on.

    Raises:
        ValueError: for ``data.train_on_all`` (search has no flag for it, so it came from a
            config file), or for no validation split (trials would be ranked on training
            accuracy, labelled as validation accuracy).
    """
    if base.data.train_on_all:
        raise ValueError(
            "search compares trials on held-out images: remove data.train_on_all from the "
            "--config file"
        )
    if base.data.val_fraction == 0:
        raise ValueError(
            "search compares trials on held-out images: --val-fraction (data.val_fraction) "
            "must be above 0"
        )
