"""How a hyperparameter search runs: its frozen :class:`SearchConfig` (sampler, pruner, budget,
workers and storage) and the sampler and pruner names it accepts."""

from __future__ import annotations

from dataclasses import dataclass

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "halving", "none")


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
