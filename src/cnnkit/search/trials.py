"""One search trial: the parameters it asks for, its run folder, and the objective that
trains it with :func:`train_run` (a repeat of a finished point is not trained again).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnkit.config import RunConfig
from cnnkit.data.sources import LoadedData, build_splits
from cnnkit.progress import bars_only
from cnnkit.search.results import FINISHED
from cnnkit.search.space import SearchSpace
from cnnkit.search.trial_config import build_trial_config
from cnnkit.search.workers import INTERRUPTS, CoreShare, worker_identity
from cnnkit.training.checkpoint import remove_checkpoints
from cnnkit.training.preprocessing import resolve_preprocessing
from cnnkit.training.run import RunResult, train_run
from cnnkit.training.run_folder import write_run_info
from cnnkit.training.trainer import Callback, Trainer, TrainingDiverged, TrainingInterrupted

if TYPE_CHECKING:
    from cnnkit.search.config import SearchConfig

logger = logging.getLogger(__name__)


def trial_dir(run_dir: Path, number: int) -> Path:
    """``RUN_DIR/trials/trial-NNN``."""
    return Path(run_dir) / "trials" / f"trial-{number:03d}"


def suggest_params(trial: optuna.Trial, space: SearchSpace, grid: bool) -> dict[str, Any]:
    """Ask the trial for every parameter of ``space`` (grid values are categorical)."""
    params: dict[str, Any] = {}
    for parameter in space.parameters:
        name = parameter.name
        if grid or parameter.type == "categorical":
            choices = parameter.grid_values() if grid else list(parameter.choices)
            params[name] = trial.suggest_categorical(name, choices)
        elif parameter.type == "int":
            step = int(parameter.step or 1)
            low, high = int(parameter.low), int(parameter.high)
            params[name] = trial.suggest_int(name, low, high, step=step, log=parameter.log)
        else:
            low, high = float(parameter.low), float(parameter.high)
            params[name] = trial.suggest_float(
                name, low, high, step=parameter.step, log=parameter.log
            )
    return params


class PruningCallback(Callback):
    """Reports each epoch's validation accuracy to the trial and stops it when told to prune."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.best: dict[str, float] = {}

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        epoch = int(metrics["epoch"])
        value = float(metrics.get("val_accuracy", metrics["train_accuracy"]))
        if not value <= self.best.get("val_accuracy", float("-inf")):
            self.best = {"val_accuracy": value, "val_loss": metrics.get("val_loss", float("nan"))}
            self.best["best_epoch"] = epoch
        with INTERRUPTS.storage():
            self.trial.report(value, epoch)
            self.trial.set_user_attr("progress", {**self.best, "epochs_run": epoch})
            # A trial that has trained its last epoch finishes: pruning it then saves nothing.
            prune = epoch < trainer.config.epochs and self.trial.should_prune()
        if not prune:
            return
        # The trainer's teardown hooks close the TensorBoard writer after this raises.
        raise optuna.TrialPruned(f"pruned after epoch {epoch} (accuracy {value:.4f})")


class TrialRunner:
    """The objective: one trial's config -> :func:`train_run`, with the data loaded once."""

    def __init__(
        self,
        base: RunConfig,
        space: SearchSpace,
        config: SearchConfig,
        run_dir: Path,
        cache_dir: str | Path | None,
        progress: bool,
        data: LoadedData | None = None,
        on_data: Callable[[LoadedData], None] | None = None,
    ) -> None:
        self.base, self.space, self.config, self.run_dir = base, space, config, run_dir
        self.cache_dir, self.progress, self.on_data = cache_dir, progress, on_data
        self._data: tuple[Any, LoadedData] | None = None
        if data is not None:
            self._data = (self._data_key(base), data)

    @staticmethod
    def _data_key(config: RunConfig) -> tuple:
        return (config.data, resolve_preprocessing(config))

    def data_for(self, config: RunConfig) -> LoadedData:
        """The loaded splits for ``config`` (loaded again only if a trial changes the data)."""
        key = self._data_key(config)
        if self._data is None or self._data[0] != key:
            loaded = build_splits(config.data, key[1], self.cache_dir, self.progress)
            self._data = (key, loaded)
            if self.on_data is not None:
                self.on_data(loaded)
        return self._data[1]

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_identity())
        params = suggest_params(trial, self.space, self.config.sampler == "grid")
        earlier = repeated_trial(trial, params)
        if earlier is not None:
            return repeat_result(trial, earlier)
        config = build_trial_config(
            self.base, self.space, params, trial_dir(self.run_dir, trial.number)
        )
        run_dir = config.run_dir()
        trial.set_user_attr("run_dir", str(run_dir))
        pruning = PruningCallback(trial)
        callbacks: list[Callback] = [pruning]
        if self.config.workers > 1 and config.train.device in ("auto", "cpu"):
            callbacks.append(CoreShare(trial.study, os.cpu_count() or 1))
        try:
            # A signal Python swallowed near the end of training stops the search before the
            # next trial: this one ran to its end, so its result is kept, not thrown away.
            with INTERRUPTS.interruptible(hold_ignored=True):
                result = train_run(
                    config,
                    cache_dir=self.cache_dir,
                    progress=bars_only(self.progress),
                    callbacks=callbacks,
                    data=self.data_for(config),
                )
        except optuna.TrialPruned:
            write_run_info(run_dir, config, {"status": "pruned", **pruning.best})
            raise
        except (TrainingInterrupted, KeyboardInterrupt):
            trial.set_user_attr("interrupted", True)
            raise
        except TrainingDiverged as error:
            # One bad corner of the space (too high a learning rate) fails its trial only:
            # optuna records a NaN result as failed, and the study goes on.
            logger.warning("trial %d: %s", trial.number, error)
            write_run_info(run_dir, config, {"status": "diverged", "error": str(error)})
            trial.set_user_attr("error", str(error))
            return float("nan")
        finally:
            if not self.config.keep_checkpoints:
                remove_checkpoints(run_dir)
        return record_result(trial, result, pruning.best)


def record_result(trial: optuna.Trial, result: RunResult, best: dict[str, float]) -> float:
    """Store a trained trial's results (``best``: its best epoch's validation numbers) in its
    ``result`` user attribute, which the results tables read; return its objective value."""
    fit = result.fit
    trial.set_user_attr(
        "result",
        {
            **best,
            "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch,
            "test_top1": result.test_metrics.get("top1"),
            "test_top5": result.test_metrics.get("top5"),
            "train_seconds": fit.seconds,
        },
    )
    return float(fit.best_val_accuracy)


def repeated_trial(trial: optuna.Trial, params: dict[str, Any]) -> FrozenTrial | None:
    """The first finished trial of the study with exactly ``params``, or None.

    TPE proposes points of a small all-categorical space (the 40-point book grid) again once
    it has seen most of them; training one again would only measure the noise of a rerun.
    """
    for earlier in trial.study.get_trials(deepcopy=False, states=FINISHED):
        if earlier.number != trial.number and earlier.params == params:
            return earlier
    return None


def repeat_result(trial: optuna.Trial, earlier: FrozenTrial) -> float:
    """End ``trial`` as ``earlier`` ended, without training: its value, or pruned.

    The repeat is kept as a trial of its own (and counts against the budget, like any trial
    the sampler proposed), so the sampler sees the point again as it would after a rerun. Its
    ``repeats`` user attribute names ``earlier``, which the results tables show; it has no
    learning curve of its own, so the figures show ``earlier``'s once.

    Raises:
        optuna.TrialPruned: when ``earlier`` was pruned.
    """
    trial.set_user_attr("repeats", earlier.number)
    for key in ("run_dir", "result", "progress"):
        if key in earlier.user_attrs:
            trial.set_user_attr(key, earlier.user_attrs[key])
    logger.info("trial %d repeats trial %d: not trained again", trial.number, earlier.number)
    if earlier.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"repeats trial {earlier.number}, which was pruned")
    return float(earlier.value)
