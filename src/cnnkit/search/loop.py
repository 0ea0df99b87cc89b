"""One process's share of a search: Optuna's optimize loop over the trial runner, writing the
results tables and TensorBoard HParams after each trial, and quiet about Ctrl-C."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from cnnkit.errors import error_line
from cnnkit.evaluation.search_table import TrialSummary, write_results_tables
from cnnkit.search.budget import trials_to_run
from cnnkit.search.results import (
    FINISHED,
    TrialReporter,
    collect_trials,
    log_trial_hparams,
    summarize_trial,
)
from cnnkit.search.space import SearchSpace
from cnnkit.search.trials import TrialRunner
from cnnkit.training.trainer import TrainingInterrupted

logger = logging.getLogger(__name__)


def optimize_study(
    study: optuna.Study,
    runner: TrialRunner,
    reporter: TrialReporter | None = None,
) -> None:
    """Run trials in this process until the budget, the grid or the timeout is used up."""
    config, space, run_dir = runner.config, runner.space, runner.run_dir
    # Trials other workers are running count as taken here too, not only after each trial: a
    # worker that starts while another runs the last trial of the budget has none to run.
    # (Interrupted runs' trials were re-queued before any worker started.)
    remaining = trials_to_run(study, config, space, count_running=True)
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
