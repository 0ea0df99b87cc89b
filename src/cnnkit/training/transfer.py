"""Two-phase transfer learning: a head trained on cached frozen features, then a fine-tune.

Phase ``frozen`` (:mod:`cnnkit.training.frozen_phase`) computes the backbone's features once
per image view and trains only the head on them, in seconds. Phase ``finetune``
(:mod:`cnnkit.training.finetune`) unfreezes the backbone and trains every layer, the backbone at
a lower learning rate; an ensemble fine-tunes each member in turn. Both phases run the generic
:class:`~cnnkit.training.trainer.Trainer`; each writes its metrics into
``RUN_DIR/<phase>/metrics.csv`` and ``RUN_DIR/tensorboard`` (``<phase>/`` tags), and
``RUN_DIR/phases.json`` records every phase's validation and test figures
(:mod:`cnnkit.training.phases`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.config import Preprocessing, RunConfig
from cnnkit.data.dataset import DataSplits
from cnnkit.data.loader import build_loaders
from cnnkit.models.transfer_classifier import TransferEnsemble
from cnnkit.paths import finetune_folder
from cnnkit.runtime import DistributedContext
from cnnkit.training.callbacks import write_metrics_csv
from cnnkit.training.checkpoint import CHECKPOINT_NAME
from cnnkit.training.finetune import fit_finetune, refuse_a_resume_early
from cnnkit.training.frozen_phase import fit_frozen_head
from cnnkit.training.phases import (
    FROZEN_PHASE,
    PhaseLog,
    PhaseReport,
    combine_fits,
    frozen_line_printed_live,
    frozen_phase_line,
    phase_label,
)
from cnnkit.training.trainer import Callback, FitResult, Trainer, TrainingInterrupted


def fit_transfer(
    model: nn.Module,
    config: RunConfig,
    splits: DataSplits,
    preprocessing: Preprocessing,
    device: torch.device,
    run_dir: Path,
    progress: bool = True,
    feature_cache_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    freeze_batch_norm: bool = True,
    resume: bool = False,
    distributed: DistributedContext | None = None,
    identity: dict[str, Any] | None = None,
) -> FitResult:
    """Run the phases of ``config.transfer.phases`` on a model with a freezable backbone.

    Args:
        model: a transfer model (``freeze_backbone``, ``unfreeze_backbone``, ``dense`` and
            ``classifier`` head modules, ``forward_features``).
        config: the run configuration; ``transfer`` picks the phases and head settings,
            ``train`` drives the fine-tune.
        splits: decoded train/val/test images.
        preprocessing: the model's input preprocessing.
        device: where to train.
        run_dir: receives ``phases.json``, ``metrics.csv`` and per-phase folders.
        progress: show progress bars.
        feature_cache_dir: where frozen features are cached (default ``RUN_DIR/features``).
        callbacks: extra hooks for the fine-tune trainer (for example a search pruner).
        freeze_batch_norm: keep the batch-norm statistics during the fine-tune (see
            :class:`~cnnkit.training.finetune.FrozenBatchNorm`); on CUB this beat training
            them by 3-5 points.
        resume: continue an interrupted fine-tune from ``RUN_DIR/finetune/checkpoint.pt``.
            The frozen phase runs again first: its features come from the cache and its
            seeded head equals the first run's, and the checkpoint then replaces all weights.
        distributed: rank information under torchrun (only rank 0 writes files).
        identity: what the run trains on, checked on resume (see :class:`Trainer`).

    Returns:
        The phases' combined fit; the model is left with the last phase's best weights.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    distributed = distributed or DistributedContext()
    phases = config.transfer.phases
    members = list(model.members) if isinstance(model, TransferEnsemble) else [model]
    if resume and "finetune" in phases:
        # What the fine-tune's trainer would refuse, refused before the frozen phase rewrites
        # phases.json and its logs: a refused resume leaves the earlier run as it was.
        grouped = hasattr(members[0], "parameter_groups")
        refuse_a_resume_early(run_dir / finetune_folder(0), config.train, identity, grouped)
    inputs = _PhaseInputs(config, splits, preprocessing, device, run_dir, progress, distributed)
    log = PhaseLog(run_dir, distributed.is_main)
    if "frozen" in phases:
        fit, report = fit_frozen_head(
            model, *inputs.shared_arguments(), feature_cache_dir, distributed
        )
        log.add_phase(FROZEN_PHASE, fit, report)
        _print_frozen_phase_line(fit, inputs)
    if len(members) > 1:
        model.share_first()  # Every member starts from the frozen phase's head.
    if "finetune" in phases:
        _fit_members(members, inputs, log, callbacks, freeze_batch_norm, resume, identity)
    ensemble = None
    if len(members) > 1:
        ensemble = _score_ensemble(model, inputs)
        log.add_report(ensemble)
    return _combined_fit(log, ensemble, time.perf_counter() - start)


@dataclass(frozen=True)
class _PhaseInputs:
    """What every phase of one transfer run trains on and with, and where it writes."""

    config: RunConfig
    splits: DataSplits
    preprocessing: Preprocessing
    device: torch.device
    run_dir: Path
    progress: bool
    distributed: DistributedContext

    def shared_arguments(
        self,
    ) -> tuple[RunConfig, DataSplits, Preprocessing, torch.device, Path, bool]:
        """The arguments that :func:`fit_frozen_head` and :func:`fit_finetune` both take after
        the model, in their order."""
        return (
            self.config,
            self.splits,
            self.preprocessing,
            self.device,
            self.run_dir,
            self.progress,
        )


def _print_frozen_phase_line(fit: FitResult, inputs: _PhaseInputs) -> None:
    """The frozen phase's line as the phase ends, where :func:`frozen_line_printed_live` says
    so (on a terminal, with ``--quiet``, or without a fine-tune, the command lists every
    phase's epochs once the run ends)."""
    progress = inputs.progress and inputs.distributed.is_main
    if frozen_line_printed_live(inputs.config.transfer.phases, progress):
        line = frozen_phase_line(fit, inputs.config.transfer.head_epochs)
        print(line, file=sys.stderr, flush=True)


def _fit_members(
    members: list[nn.Module],
    inputs: _PhaseInputs,
    log: PhaseLog,
    callbacks: Sequence[Callback],
    freeze_batch_norm: bool,
    resume: bool,
    identity: dict[str, Any] | None,
) -> None:
    """Fine-tune each member in turn (a single model is the one member), tagging member N's
    phase ``2.0 + N`` in the history. Where the run holds more than this one fit, each
    fine-tune's epoch lines carry its phase's label (``fine-tune``, ``fine-tune 2``...).

    Raises:
        TrainingInterrupted: naming the member's phase and a checkpoint to resume from.
    """
    several = "frozen" in inputs.config.transfer.phases or len(members) > 1
    for index, member in enumerate(members):
        try:
            fit, report = fit_finetune(
                member,
                *inputs.shared_arguments(),
                callbacks,
                freeze_batch_norm,
                resume,
                inputs.distributed,
                identity,
                member=index,
                more_follows=index + 1 < len(members),
                label=phase_label(2.0 + index) if several else None,
            )
        except TrainingInterrupted as interrupted:
            if len(members) == 1:
                raise
            raise _member_interrupted(interrupted, inputs.run_dir, index) from None
        log.add_phase(2.0 + index, fit, report)


def _member_interrupted(
    interrupted: TrainingInterrupted, run_dir: Path, index: int
) -> TrainingInterrupted:
    """The interrupt of ensemble member ``index``'s fine-tune, naming its phase and the
    checkpoint ``--resume`` goes on from."""
    # Before its first epoch's checkpoint a member has none, but --resume goes on from the
    # earlier members' (they are trained again from theirs).
    first = run_dir / finetune_folder(0) / CHECKPOINT_NAME
    checkpoint = interrupted.checkpoint or (first if first.is_file() else None)
    return TrainingInterrupted(interrupted.epochs_completed, checkpoint, phase_label(2.0 + index))


def _score_ensemble(model: TransferEnsemble, inputs: _PhaseInputs) -> PhaseReport:
    """The ensemble's entry in ``phases.json``: its validation accuracy where there is a val
    split (the run's test figures are filled in by
    :func:`~cnnkit.training.phases.record_final_test`)."""
    start = time.perf_counter()
    config, device, distributed = inputs.config, inputs.device, inputs.distributed
    loaders = build_loaders(inputs.splits, config, inputs.preprocessing, device, distributed)
    _, val_loader, _ = loaders
    val_accuracy = None
    if val_loader is not None:
        scorer = Trainer(model, config.train, device, None, (), distributed, progress=False)
        val_accuracy = scorer.evaluate(val_loader)["accuracy"]
    return PhaseReport(
        "ensemble",
        0,
        0,
        val_accuracy,
        seconds=time.perf_counter() - start,
        details={"members": len(model.members)},
    )


def _combined_fit(log: PhaseLog, ensemble: PhaseReport | None, seconds: float) -> FitResult:
    """The phases' fits as one, written to ``RUN_DIR/metrics.csv`` by rank 0; an ensemble's
    figures are the run's."""
    result = combine_fits(log.fits, seconds)
    if ensemble is not None:
        # What the run kept is the ensemble, not the last member: its figures are the run's.
        result = dataclasses.replace(
            result, best_epoch=result.epochs_run, best_val_accuracy=ensemble.val_accuracy
        )
    if log.writes:
        write_metrics_csv(log.run_dir / "metrics.csv", result.history)
    return result
