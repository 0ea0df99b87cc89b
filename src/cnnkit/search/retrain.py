"""Retraining a search's best configuration on train+validation data into ``RUN_DIR/best``,
with the test split still held out."""

from __future__ import annotations

import logging

import optuna

from cnnkit.config import RunConfig, build_run_config, config_to_dict
from cnnkit.data.dataset import DataSplits, concatenate
from cnnkit.data.sources import LoadedData
from cnnkit.progress import bars_only
from cnnkit.search.space import SearchSpace
from cnnkit.search.trial_config import build_trial_config
from cnnkit.search.trials import TrialRunner
from cnnkit.search.workers import INTERRUPTS
from cnnkit.training.checkpoint import remove_checkpoints
from cnnkit.training.run import RunResult, train_run

logger = logging.getLogger(__name__)


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
