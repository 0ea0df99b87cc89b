"""What a search's worker processes share: how many, their threads, interrupts, and what
happens when one dies (its trial is failed and queued again; a worker dies with its search
process). :mod:`cnnkit.search.pool` starts and stops them."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnkit.training.trainer import Callback, Trainer, TrainingInterrupted

logger = logging.getLogger(__name__)


def default_workers(device: str = "auto") -> int:
    """Processes for a search when none are asked for: one per core on a CPU (up to 4), else 1.

    Small networks train faster per core in one thread than spread over several, so on a CPU
    a process per core finishes a grid sooner; a GPU is best left to a single process.
    """
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


class Interrupts:
    """Ctrl-C and ``kill`` during a search, made safe for its study's storage.

    A KeyboardInterrupt raised while the storage is read or written (SQLAlchemy over SQLite)
    can leave a lock held, and the next query then waits forever: the search hangs instead of
    stopping. So while :meth:`installed`, SIGINT and SIGTERM interrupt at once only inside
    :meth:`interruptible` (a trial training, the data loading, waiting for workers); anywhere
    else the signal is held over and raised at the next safe point.
    """

    def __init__(self) -> None:
        self.safe = False
        self.pending = False

    def _handle(self, signum: int, frame: Any) -> None:
        # Held until an interrupt leaves an interruptible block: Python ignores one raised
        # inside a garbage-collection callback (SQLAlchemy's weakref callbacks run in the
        # middle of training), and the search would then run to its end.
        self.pending = True
        if self.safe:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise a held-over interrupt now."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self, hold_ignored: bool = False) -> Iterator[None]:
        """A block that an interrupt may stop at any point (no storage work in it, except
        inside :meth:`storage`).

        An interrupt raised where Python ignored it (see :meth:`_handle`) goes off as the block
        ends, or with ``hold_ignored`` at the next safe point instead: a trial whose training
        ran to its end then keeps its result, and the search stops before the next one.
        """
        self.check()
        previous, self.safe = self.safe, True
        try:
            yield
        except (KeyboardInterrupt, TrainingInterrupted):
            self.pending = False  # The interrupt is on its way out.
            raise
        finally:
            self.safe = previous
        if not hold_ignored:
            self.check()

    @contextlib.contextmanager
    def storage(self) -> Iterator[None]:
        """Storage work inside an interruptible block: an interrupt waits for its end."""
        previous, self.safe = self.safe, False
        try:
            yield
        finally:
            self.safe = previous
        if previous:
            self.check()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM this way in the block (main thread only); an interrupt
        still held over at its end is raised then."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.safe, self.pending = False, False
        previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        for number in previous:
            signal.signal(number, self._handle)
        previous_hook, sys.unraisablehook = (
            sys.unraisablehook,
            self._unraisable_hook(sys.unraisablehook),
        )
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            sys.unraisablehook = previous_hook
        self.check()

    def _unraisable_hook(self, previous: Any) -> Any:
        """``sys.unraisablehook`` that keeps quiet about an interrupt Python ignored (it is
        held, and raised at the block's end) instead of printing its traceback to the user."""

        def hook(unraisable: Any) -> None:
            if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.pending:
                return
            previous(unraisable)

        return hook


INTERRUPTS = Interrupts()  # The one guard of this process's search.


class CoreShare(Callback):
    """Lets the trials still running take the cores of workers that have nothing left to run.

    Each of several workers starts with ``cores // workers`` threads; at the end of a grid fewer
    trials run than there are workers, and a long last trial would otherwise train on one core
    while the others idle. At the start of the trial and after each epoch the trial takes
    ``cores // running trials`` threads.
    """

    def __init__(self, study: optuna.Study, cores: int) -> None:
        self.study = study
        self.cores = max(1, cores)

    def threads(self) -> int:
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return max(1, self.cores // max(1, len(running)))

    def _rebalance(self) -> None:
        import torch

        with INTERRUPTS.storage():
            threads = self.threads()
        if threads != torch.get_num_threads():
            logger.info("training with %d thread(s)", threads)
            torch.set_num_threads(threads)

    def on_fit_start(self, trainer: Trainer) -> None:
        self._rebalance()

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._rebalance()


def process_start(pid: int) -> tuple[str, str] | None:
    """State letter and start time of a Linux process (``None`` where /proc is unavailable)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_after_name = text.rsplit(")", 1)[1].split()
    return fields_after_name[0], fields_after_name[19]


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, process id and the process's start time."""
    start = process_start(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": start[1] if start else None}


def worker_dead(worker: dict[str, Any]) -> bool:
    """True when ``worker`` ran on this host and its process no longer exists."""
    if worker.get("host") != socket.gethostname():
        return False
    pid = int(worker.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    current = process_start(pid)
    if current is None:
        return False
    return current[0] in ("Z", "X") or (worker.get("start") not in (None, current[1]))


def requeue_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Add a waiting copy of a failed trial (same params and grid point) so it runs again."""
    system_attrs = {
        **trial.system_attrs,
        "failed_trial": trial.number,
        "retry_history": [*trial.system_attrs.get("retry_history", []), trial.number],
    }
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs=system_attrs,
        )
    )
    logger.info("trial %d will run again (its process stopped)", trial.number)


ORPHAN_SECONDS = 2.0


def recover_trials(study: optuna.Study) -> list[int]:
    """Fail and re-queue trials whose process died (SIGKILL, power loss) or was interrupted.

    A RUNNING trial of a dead process on this host is marked FAIL at once; trials of other hosts
    are left to Optuna's heartbeat. A trial stopped with Ctrl-C is already FAIL.

    Returns:
        The numbers of the trials queued again.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    queued = []
    now = datetime.datetime.now()
    for trial in trials:
        worker = trial.user_attrs.get("worker")
        # A live worker records itself within milliseconds of starting a trial, so a trial
        # without one after a while belongs to a process killed in between.
        orphan = (
            worker is None
            and trial.datetime_start is not None
            and (now - trial.datetime_start) > datetime.timedelta(seconds=ORPHAN_SECONDS)
        )
        dead = orphan or (worker is not None and worker_dead(worker))
        if trial.state == TrialState.RUNNING and dead:
            try:
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")):
            continue
        if trial.number not in retried:
            requeue_trial(study, trial)
            queued.append(trial.number)
    return queued


def die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the search process dies.

    A search killed with SIGKILL cannot stop its workers itself; without this they would go on
    training while a rerun of the command starts new ones on the same study.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
