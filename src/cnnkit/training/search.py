"""Hyperparameter search with Optuna: trial configs for train_run, pruning, resumable studies.

Search only produces configs and calls the one training function; each trial is a normal run
folder under ``RUN_DIR/trials/``. The study lives in SQLite, so a rerun continues it and several
processes can work on it at once.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import os
import re
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnkit.config import RunConfig, build_run_config, config_to_dict
from cnnkit.data.dataset import DataSplits, concatenate
from cnnkit.data.sources import LoadedData
from cnnkit.errors import error_line
from cnnkit.evaluation.search_plots import (
    TrialSummary,
    write_results_tables,
)
from cnnkit.progress import bars_only
from cnnkit.training.checkpoint import remove_checkpoints
from cnnkit.training.run import RunResult, train_run
from cnnkit.training.search_results import (
    FINISHED,
    TRIAL_STATES,
    TrialReporter,
    collect_trials,
    log_trial_hparams,
    summarize_trial,
    write_outputs,
)
from cnnkit.training.search_settings import (
    check_same_search,
    check_space,
    write_search_settings,
)
from cnnkit.training.search_trials import (
    TrialRunner,
)
from cnnkit.training.search_workers import (
    INTERRUPTS,
    die_with_parent,
    recover_trials,
    requeue_trial,
)
from cnnkit.training.spaces import SearchSpace, build_trial_config
from cnnkit.training.trainer import TrainingInterrupted

logger = logging.getLogger(__name__)
SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "halving", "none")
# How long a stopped worker gets to queue its trial again before it is terminated.
WORKER_STOP_SECONDS = 60.0


@dataclass(frozen=True)
class SearchConfig:
    """How to search: sampler, pruner, budget and where the study is stored.

    Attributes:
        sampler: ``grid`` (every combination), ``tpe`` or ``random``.
        pruner: ``halving`` (successive halving), ``median`` or ``none``.
        n_trials: finished trials the study should hold (default: the grid size, or 20).
        timeout: stop starting trials after this many seconds.
        storage: an Optuna storage URL (default ``sqlite:///RUN_DIR/study.db``).
        study_name: the study's name in the storage (default: the run folder's name).
        sampler_seed: seed for the sampler (``None``: a fresh one, safe for parallel workers).
        prune_warmup: epochs every trial runs before it can be pruned. Two by default: the
            first epoch mostly measures how fast a setting starts, and a regularised one
            starts slowly (the book grid's own pick, dropout 0.5, was pruned at epoch 1).
        reduction_factor: successive halving keeps the best 1/reduction_factor at each rung.
        median_startup_trials: trials that finish before median pruning starts.
        retrain_best: train the best configuration again on train+validation data.
        keep_checkpoints: keep each trial's resumable ``checkpoint.pt`` (large) after it ends.
        workers: processes working on the study at once (each with its share of the cores).
    """

    sampler: str = "tpe"
    pruner: str = "halving"
    n_trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    sampler_seed: int | None = None
    prune_warmup: int = 2
    reduction_factor: int = 3
    median_startup_trials: int = 3
    retrain_best: bool = False
    keep_checkpoints: bool = False
    workers: int = 1

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}; got {self.pruner!r}")
        if self.n_trials is not None and self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1; got {self.n_trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0; got {self.timeout}")
        if self.prune_warmup < 1:
            raise ValueError(f"prune_warmup must be >= 1; got {self.prune_warmup}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1; got {self.workers}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2; got {self.reduction_factor}")


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


def sampler_seed(seed: int | None, held: int) -> int | None:
    """The seed a random or TPE sampler starts from on a study that holds ``held`` trials.

    A new study (``held`` 0) takes ``seed`` itself, so the same command repeats the same
    search. A continued one must not: its sampler would start the seed's sequence again and
    propose the points the first run tried. So each point a study is continued from gets a
    seed of its own, mixed from both numbers (a sum such as ``seed + held`` would meet the
    ``seed + index`` of an earlier run's worker).
    """
    if seed is None or held == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence((seed % 2**32, held)).generate_state(1)[0])


def build_sampler(
    config: SearchConfig, space: SearchSpace, held: int = 0
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``config.sampler``, for a study that held ``held`` trials
    when this search started (see :func:`sampler_seed`; the grid sampler skips the points
    already tried by itself)."""
    if config.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=config.sampler_seed)
    seed = sampler_seed(config.sampler_seed, held)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def build_pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    """Successive halving (rungs at ``warmup * factor**k`` epochs), median, or no pruning."""
    if config.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=config.prune_warmup, reduction_factor=config.reduction_factor
        )
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=config.median_startup_trials, n_warmup_steps=config.prune_warmup
        )
    return optuna.pruners.NopPruner()


def open_study(
    config: SearchConfig, space: SearchSpace, run_dir: Path, held: int = 0
) -> tuple[optuna.Study, str, str]:
    """Create or load the study (``load_if_exists``), with heartbeats for crashed workers.

    ``held`` is the number of trials the study held when the search started, which a seeded
    sampler's seed is derived from (:func:`build_sampler`): the search's main process counts
    them once it has opened the study, and passes that count to its workers.

    Returns:
        The study, its storage URL and its name.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    url = config.storage or "sqlite:///" + str((run_dir / "study.db").resolve())
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # Newer Optuna renamed the stale-trial hook; both call requeue_trial for a dead worker.
    parameters = inspect.signature(optuna.storages.RDBStorage).parameters
    hook = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in parameters
        else "failed_trial_callback"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=30,
                grace_period=120,
                **{hook: requeue_trial},
            )
    except Exception as error:  # SQLAlchemy raises many types, each with a long message.
        raise ValueError(f"storage {url}: cannot open the study ({error_line(error)})") from error
    name = config.study_name or run_dir.name
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=build_sampler(config, space, held),
        pruner=build_pruner(config),
        direction="maximize",
        load_if_exists=True,
    )
    return study, url, name


def target_trials(config: SearchConfig, space: SearchSpace) -> int | None:
    """Finished trials the study should hold: ``n_trials``, the grid size, 20, or no limit."""
    if config.n_trials is not None:
        return config.n_trials
    if config.sampler == "grid":
        return len(space.grid_combinations())
    return None if config.timeout else 20


def _unstarted_grid_points(trials: list[FrozenTrial], space: SearchSpace) -> int:
    grid = space.grid()
    started = {
        t.system_attrs["grid_id"]
        for t in trials
        if "grid_id" in t.system_attrs
        and t.system_attrs.get("search_space") == grid
        and t.state != TrialState.WAITING
    }
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return len(space.grid_combinations()) - len(started) + waiting


def nothing_left_to_run(study: optuna.Study, config: SearchConfig, space: SearchSpace) -> str:
    """Why a search that is continued runs no trial: its budget or its grid is used up."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    held = f"{finished} finished trial{'s' if finished != 1 else ''}"
    reached = config.n_trials is not None and finished >= config.n_trials
    if config.sampler == "grid" and not reached and _unstarted_grid_points(trials, space) == 0:
        return f"every point of the grid has been tried ({held}): nothing left to run"
    budget = (
        f"--n-trials is {config.n_trials}"
        if config.n_trials is not None
        else f"{target_trials(config, space)} is the default budget"
    )
    return (
        f"the search already holds {held} and {budget}: nothing left to run "
        "(a larger --n-trials runs more)"
    )


def trials_to_run(
    study: optuna.Study, config: SearchConfig, space: SearchSpace, count_running: bool = False
) -> int | None:
    """How many more trials this process may start (0: the study is done; None: no limit).

    With ``count_running``, trials that other processes are running count as taken, so that
    parallel workers together stop at ``n_trials`` instead of each finishing one more.
    """
    trials = study.get_trials(deepcopy=False)
    target = target_trials(config, space)
    taken = FINISHED + ((TrialState.RUNNING,) if count_running else ())
    budget = None if target is None else target - sum(t.state in taken for t in trials)
    if config.sampler == "grid":
        unstarted = _unstarted_grid_points(trials, space)
        budget = unstarted if budget is None else min(budget, unstarted)
    return None if budget is None else max(0, budget)


def _optimize(
    study: optuna.Study,
    runner: TrialRunner,
    reporter: TrialReporter | None = None,
) -> None:
    """Run trials in this process until the budget, the grid or the timeout is used up."""
    config, space, run_dir = runner.config, runner.space, runner.run_dir
    remaining = trials_to_run(study, config, space)
    if remaining == 0:
        return
    parameter_names = [parameter.name for parameter in space.parameters]

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        # The tables come first: they are the search's result, and HParams only a view of it.
        write_results_tables(collect_trials(study, run_dir), parameter_names, run_dir)
        if trial.state in FINISHED:
            _log_hparams(run_dir, summarize_trial(trial, run_dir), space)
        if reporter is not None:
            reporter.report_new(study, trial)
        # Stop once every grid point (or the whole budget) is taken by a finished or running
        # trial: Optuna would otherwise repeat a point that another worker is still running.
        if trials_to_run(study, config, space, count_running=True) == 0:
            study.stop()

    # Ctrl-C is not a failure worth a traceback: the interrupted trial is re-queued and the
    # command says how to continue.
    optuna_logger = logging.getLogger("optuna.study._optimize")
    quiet = _QuietInterruptions()
    optuna_logger.addFilter(quiet)
    try:
        study.optimize(
            runner,
            n_trials=remaining,
            timeout=config.timeout,
            callbacks=[after_trial],
            gc_after_trial=True,
        )
    finally:
        optuna_logger.removeFilter(quiet)


def _log_hparams(run_dir: Path, summary: TrialSummary, space: SearchSpace) -> None:
    """Log a trial to TensorBoard's HParams; a failure there is a warning, never the end of
    the search (the results tables hold the same numbers)."""
    try:
        log_trial_hparams(run_dir / "tensorboard", summary, space)
    except Exception as error:  # TensorBoard's protobufs raise TypeError, ValueError and more.
        logger.warning(
            "%s: not logged to TensorBoard HParams (%s)", summary.label, error_line(error)
        )


class _QuietInterruptions(logging.Filter):
    """Drops Optuna's traceback for a trial stopped by Ctrl-C, and the "Trial N failed with
    value None." line that follows it: such a trial is queued again, not failed."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        number = re.match(r"Trial (\d+) failed", message)
        if isinstance(error, (TrainingInterrupted, KeyboardInterrupt)):
            if number:
                self.interrupted.add(number.group(1))
            return False
        return not (number and number.group(1) in self.interrupted)


def _worker_main(
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
            _optimize(study, TrialRunner(base, space, config, base.run_dir(), cache_dir, False))
    except (KeyboardInterrupt, TrainingInterrupted):
        return
    finally:
        # A second signal (the group's Ctrl-C and the main process's) must not cut the
        # interrupted trial's bookkeeping short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _join_workers(
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


def _stop_workers(workers: list[multiprocessing.Process], report: bool = True) -> None:
    """Interrupt the running workers (each queues its trial to run again) and wait for them.

    SIGTERM, which a worker handles as Ctrl-C once it runs, ends one still starting up
    quietly, where SIGINT would print a KeyboardInterrupt traceback from its imports.
    """
    for process in workers:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    _join_workers(workers, report, timeout=WORKER_STOP_SECONDS)


def _start_workers(
    base: RunConfig,
    space: SearchSpace,
    config: SearchConfig,
    cache_dir: Any,
    threads: int,
    held: int = 0,
) -> list[multiprocessing.Process]:
    # "spawn" gives each worker a fresh interpreter: forking a process that has used
    # OpenMP threads can hang the child.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker_main,
            args=(base, space, config, cache_dir, threads, index, held),
            name=f"cnnkit-search-worker-{index}",
        )
        for index in range(1, config.workers)
    ]
    for process in processes:
        process.start()
    return processes


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
    import torch

    check_held_out(base)
    start = time.perf_counter()
    run_dir = base.run_dir()
    if not logger.isEnabledFor(logging.DEBUG):
        # Each trial is reported once (on_trial); Optuna's own INFO lines would repeat it.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The space is checked before the search's folder and study are created: a refused one
    # leaves nothing behind.
    check_space(space, base, config.sampler, space_file)
    recorded_name = check_same_search(run_dir, base, space, config)
    if config.study_name is None and recorded_name:
        config = replace(config, study_name=recorded_name)
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
    runner = TrialRunner(base, space, config, run_dir, cache_dir, progress, data, on_data)
    threads = torch.get_num_threads()
    workers: list[multiprocessing.Process] = []
    if trials_to_run(study, config, space) != 0:
        # Load (and cache) the data before any worker starts, so that the workers read it
        # from the cache instead of all decoding it at once.
        with INTERRUPTS.interruptible():
            runner.data_for(base)
    else:
        logger.warning("%s: %s", run_dir, nothing_left_to_run(study, config, space))
    remaining = trials_to_run(study, config, space)
    # No more processes than trials left: each one starts a trial as soon as it begins.
    processes = config.workers if remaining is None else max(1, min(config.workers, remaining))
    runner.config = config = replace(config, workers=processes)
    if processes > 1:
        per_worker = max(1, (os.cpu_count() or 1) // processes)
        workers = _start_workers(base, space, config, cache_dir, per_worker, held_at_start)
        torch.set_num_threads(per_worker)
    reporter = TrialReporter(on_trial, run_dir, study)
    try:
        _optimize(study, runner, reporter)
        with INTERRUPTS.interruptible():  # Ctrl-C while waiting for them lands below too.
            _join_workers(workers)
    except (TrainingInterrupted, KeyboardInterrupt):
        _stop_workers(workers)  # A kill reaches this process alone: stop the workers too.
        write_outputs(study, space, run_dir)  # The tables and figures of the trials so far.
        raise
    except BaseException:
        # Any other error ends the search now, not once the workers have run the budget.
        _stop_workers(workers, report=False)
        raise
    finally:
        torch.set_num_threads(threads)
    reporter.report_new(study)  # Trials the other processes finished last.
    trials, files = write_outputs(study, space, run_dir)
    counts = {state: sum(t.state == state for t in trials) for state in TRIAL_STATES.values()}
    # A trial that was interrupted or lost with its process and queued again is not a failure
    # of its settings: it is counted apart, and its rerun is counted like any other trial.
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    rerun = {t.system_attrs.get("failed_trial") for t in study.get_trials(deepcopy=False)}
    counts["fail"] = sum(t.number not in rerun for t in failed)
    counts["rerun"] = sum(t.number in rerun for t in failed)
    retrained = None
    if config.retrain_best and counts["complete"]:
        retrained = retrain_best(study, base, space, runner, progress)
    return SearchResult(
        run_dir, url, name, trials, counts, files, retrained, time.perf_counter() - start
    )


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


def retrain_best(
    study: optuna.Study,
    base: RunConfig,
    space: SearchSpace,
    runner: TrialRunner,
    progress: bool = True,
) -> RunResult:
    """Train the best trial's configuration on train+validation data into ``RUN_DIR/best``.

    The test split stays held out, so the saved model's test accuracy remains honest.

    Raises:
        ValueError: if no trial has finished.
    """
    best = study.best_trial
    out = base.run_dir() / "best"
    config = build_trial_config(base, space, best.params, out)
    with INTERRUPTS.interruptible():  # Ctrl-C while the data loads stops at once too.
        loaded = runner.data_for(config)
    splits = loaded.splits
    train = concatenate(splits.train, splits.val) if splits.val is not None else splits.train
    merged = DataSplits(
        train,
        None,
        splits.test,
        splits.class_names,
        f"{splits.description} (train+val used for training)",
        splits.copies_kept_together,
    )
    final = build_run_config(config_to_dict(config), {"data": {"val_fraction": 0.0}})
    # train_run replaces an earlier best/ run once training starts (keeping files it did not
    # write): one that fails or is stopped before that leaves the earlier model in place.
    logger.info("retraining trial %d's configuration on train+validation", best.number)
    with INTERRUPTS.interruptible():
        result = train_run(
            final,
            cache_dir=runner.cache_dir,
            progress=bars_only(progress),
            data=LoadedData(merged, loaded.problems, loaded.from_cache),
        )
    if not runner.config.keep_checkpoints:
        remove_checkpoints(out)
    return result
