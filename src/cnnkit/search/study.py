"""A search's Optuna study: the seeded sampler, the pruner, and the storage it lives in (SQLite by
default, with heartbeats so that a dead worker's trial is queued again)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path

import optuna

from cnnkit.errors import error_line
from cnnkit.search.config import SearchConfig
from cnnkit.search.space import SearchSpace
from cnnkit.search.workers import requeue_trial


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
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    url = config.storage or "sqlite:///" + str((run_dir / "study.db").resolve())
    name = config.study_name or run_dir.name
    try:
        study = optuna.create_study(
            storage=open_storage(url),
            study_name=name,
            sampler=build_sampler(config, space, held),
            pruner=build_pruner(config),
            direction="maximize",
            load_if_exists=True,
        )
    except BaseException:
        if created:  # A storage that cannot be opened leaves no empty search folder behind.
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # Only if still empty.
        raise
    return study, url, name


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study storage at ``url``, whose heartbeats let :func:`requeue_trial` queue a dead
    worker's trial again.

    Raises:
        ValueError: naming the URL, when the storage cannot be opened.
    """
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
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=30,
                grace_period=120,
                **{hook: requeue_trial},
            )
    except Exception as error:  # SQLAlchemy raises many types, each with a long message.
        raise ValueError(f"storage {url}: cannot open the study ({error_line(error)})") from error
