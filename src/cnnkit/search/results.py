"""A search's trials as results: the table rows, TensorBoard HParams, parameter importances,
and the results tables and figures written from them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnkit.config import is_number
from cnnkit.evaluation.search_plots import write_search_figures
from cnnkit.evaluation.search_table import TrialSummary, write_results_tables
from cnnkit.search.space import SearchSpace

logger = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ENDED = (*FINISHED, TrialState.FAIL)
TRIAL_STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "fail",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def summarize_trial(trial: FrozenTrial, run_dir: Path) -> TrialSummary:
    """The results-table view of one Optuna trial (its folder relative to ``run_dir``)."""
    result = trial.user_attrs.get("result") or trial.user_attrs.get("progress") or {}
    curve = sorted((int(step), float(value)) for step, value in trial.intermediate_values.items())
    # A finished trial is ranked on what its objective returned, as Optuna's best_trial is
    # (retrain_best trains that one); the epochs' best, for a transfer model, misses phase 1.
    accuracy = result.get("val_accuracy")
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        accuracy = trial.value
    seconds = None
    if trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return TrialSummary(
        number=trial.number,
        state=TRIAL_STATES.get(trial.state, trial.state.name.lower()),
        params=dict(trial.params),
        val_accuracy=accuracy,
        val_loss=result.get("val_loss"),
        test_top1=result.get("test_top1"),
        epochs=int(result.get("epochs_run", len(curve))),
        seconds=seconds,
        run_dir=_relative(trial.user_attrs.get("run_dir", ""), run_dir),
        curve=curve,
        repeats=trial.user_attrs.get("repeats"),
    )


def _relative(path: str, start: Path) -> str:
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(Path(start).resolve()))
    except ValueError:
        return path


def collect_trials(study: optuna.Study, run_dir: Path) -> list[TrialSummary]:
    """Finished (complete or pruned) trials of the study, from every process."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return [summarize_trial(trial, run_dir) for trial in trials]


def log_trial_hparams(log_dir: Path, trial: TrialSummary, space: SearchSpace) -> None:
    """One TensorBoard HParams entry (``LOG_DIR/trial-NNN``) for a finished or pruned trial."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    values: dict[str, Any] = {
        name: value if isinstance(value, (int, float, str, bool)) else str(value)
        for name, value in trial.params.items()
    }
    values["state"] = trial.state
    domains: dict[str, list[Any]] = {"state": ["complete", "pruned"]}
    for parameter in space.parameters:
        if parameter.type == "categorical" and parameter.name in values:
            convert = hparam_type(parameter.choices)
            values[parameter.name] = convert(values[parameter.name])
            domains[parameter.name] = [convert(choice) for choice in parameter.choices]
    metrics = {
        "hparams/val_accuracy": trial.val_accuracy,
        "hparams/val_loss": trial.val_loss,
        "hparams/test_top1": trial.test_top1,
        "hparams/epochs_run": float(trial.epochs),
    }
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    # SummaryWriter.add_hparams would also leave an empty event file in LOG_DIR per call.
    with SummaryWriter(str(log_dir / trial.label)) as writer:
        for summary in hparams(values, metrics, domains):
            writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            writer.add_scalar(key, value)


def hparam_type(choices: Sequence[Any]) -> Callable[[Any], Any]:
    """How a categorical parameter's values are written to HParams: TensorBoard takes a
    discrete domain of one type only, so ``[0, 0.5]`` becomes floats and ``[null, 3]`` text."""
    if all(isinstance(choice, bool) for choice in choices):
        return bool
    if all(is_number(choice) for choice in choices):
        return float
    return str


def parameter_importances(study: optuna.Study) -> dict[str, float] | None:
    """fANOVA importances of the parameters that varied among the finished trials, or
    ``None`` with fewer than two finished trials or no parameter that varied."""
    import warnings

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None
    varied = [
        name
        for name in complete[0].params
        if len({repr(trial.params.get(name)) for trial in complete}) > 1
    ]
    if not varied:
        return None
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's notes on its evaluators, not for users.
            importances = optuna.importance.get_param_importances(
                study, evaluator=evaluator, params=varied
            )
        return {name: float(value) for name, value in importances.items()}
    except (ValueError, RuntimeError) as error:
        logger.info("no parameter importances: %s", error)
        return None


class TrialReporter:
    """Passes each trial of the study that ends from now on to ``on_trial`` once, whichever
    process ran it (trials that had ended before, in an earlier run, are not repeated)."""

    def __init__(
        self, on_trial: Callable[[TrialSummary], None] | None, run_dir: Path, study: optuna.Study
    ) -> None:
        self.on_trial, self.run_dir = on_trial, run_dir
        self.reported = {t.number for t in study.get_trials(deepcopy=False, states=ENDED)}

    def report_new(self, study: optuna.Study, current: FrozenTrial | None = None) -> None:
        """Report the trials that ended since the last call (``current`` even if it failed)."""
        if self.on_trial is None:
            return
        ended = {t.number: t for t in study.get_trials(deepcopy=False, states=ENDED)}
        if current is not None:
            ended[current.number] = current
        for number in sorted(set(ended) - self.reported):
            self.reported.add(number)
            self.on_trial(summarize_trial(ended[number], self.run_dir))


def write_outputs(
    study: optuna.Study, space: SearchSpace, run_dir: Path
) -> tuple[list[TrialSummary], dict[str, str]]:
    """Write the results tables and figures of the trials so far; return them and the files."""
    trials = collect_trials(study, run_dir)
    parameter_names = [parameter.name for parameter in space.parameters]
    files = write_results_tables(trials, parameter_names, run_dir)
    importances = parameter_importances(study)
    files.update(write_search_figures(trials, parameter_names, importances, run_dir))
    return trials, files


def count_trials(study: optuna.Study, trials: list[TrialSummary]) -> dict[str, int]:
    """How many of ``trials`` ended in each state, with ``fail`` split from ``rerun``.

    A trial that was interrupted or lost with its process and queued again is not a failure
    of its settings: it is counted apart, and its rerun is counted like any other trial.
    """
    counts = {state: sum(t.state == state for t in trials) for state in TRIAL_STATES.values()}
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    rerun = {t.system_attrs.get("failed_trial") for t in study.get_trials(deepcopy=False)}
    counts["fail"] = sum(t.number not in rerun for t in failed)
    counts["rerun"] = sum(t.number in rerun for t in failed)
    return counts
