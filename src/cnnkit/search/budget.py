"""A search's budget: how many trials the study should hold, how many more this process may
start, and why a continued search has none left to run."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnkit.search.config import SearchConfig
from cnnkit.search.results import FINISHED
from cnnkit.search.space import SearchSpace


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


def process_count(study: optuna.Study, config: SearchConfig, space: SearchSpace) -> int:
    """Processes to run the study with: ``config.workers``, but no more than trials left (each
    process starts a trial as soon as it begins), and at least this one."""
    remaining = trials_to_run(study, config, space)
    return config.workers if remaining is None else max(1, min(config.workers, remaining))
