"""What :meth:`~cnnkit.training.trainer.Trainer.fit` carries from epoch to epoch and returns,
and the errors that end a fit before its last epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class TrainingDiverged(ValueError):
    """The training loss became infinite or NaN; the weights are useless from there on."""


class TrainingInterrupted(RuntimeError):
    """Raised after Ctrl-C; the last completed epoch is saved in the checkpoint.

    Args:
        epochs_completed: the epochs the checkpoint holds.
        checkpoint: the checkpoint ``--resume`` continues from (None: none was written).
        phase: which phase of a transfer run (fine-tune 2...), where it says.
        when: when it landed, where that was outside an epoch ("after training, before the
            model was saved"); the message then says this instead of the epochs.
    """

    def __init__(
        self,
        epochs_completed: int,
        checkpoint: Path | None,
        phase: str | None = None,
        when: str | None = None,
    ) -> None:
        of = f" of {phase}" if phase else ""
        self.summary = when or f"after {epochs_completed} completed epoch(s){of}"
        super().__init__(f"interrupted {when}" if when else f"training interrupted {self.summary}")
        self.epochs_completed = epochs_completed
        self.checkpoint = checkpoint
        self.phase = phase


@dataclass
class FitResult:
    """What a call to :meth:`Trainer.fit` did.

    Attributes:
        history: one metrics row per epoch, resumed epochs included.
        best_epoch: the epoch whose weights were kept: the best on validation, or without a
            validation split the last.
        best_val_accuracy: the best epoch's validation accuracy; without a validation split,
            the highest training accuracy of an epoch (search ranks such trials by it), which
            is no validation figure: :func:`cnnkit.training.run.train_run` records null.
        epochs_run: the epochs trained in all, resumed ones included; after an early stop,
            the epoch it stopped after.
        stopped_early: early stopping ended the run, in this call or (resumed) an earlier one.
        seconds: this call's training time.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


@dataclass
class FitProgress:
    """Where a fit stands after its last completed epoch; the checkpoint saves all of it.

    Attributes:
        result: the result so far (history, best epoch and score, early stop).
        best_state: the best validation epoch's weights (averaged, where an average is kept),
            or None until there is one, and always without a validation split.
        bad_epochs: epochs in a row without a better score, for early stopping.
    """

    result: FitResult = field(default_factory=FitResult)
    best_state: dict | None = None
    bad_epochs: int = 0
