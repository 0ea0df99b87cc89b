"""Worker processes fed one job at a time by the calling thread, and stopped at once on an
interrupt.

``multiprocessing.Pool`` feeds its workers from a thread of its own. After Ctrl-C,
``Pool.terminate()`` could wait forever on that thread, blocked writing a large job into a pipe
that no worker would read any more. Here only the calling thread writes, a worker is sent a job
only when it is idle (so it reads the whole job), and an interrupt kills the workers without
waiting on anything.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

_END = object()
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
_STOP_SECONDS = 5.0  # How long finished workers get to exit before they are killed.


def map_unordered(
    function: Callable[[Any], Any],
    jobs: Iterable[Any],
    processes: int,
) -> Iterator[Any]:
    """Yield ``function(job)`` for each job, in the order they finish, from ``processes``
    child processes.

    The jobs are read one ahead of the workers (the next is ready while they compute), so at
    most ``processes + 1`` are in memory. Close the iterator (``contextlib.closing``) when
    leaving early: that kills the workers.

    Args:
        function: a module-level function (the ``spawn`` start method pickles it).
        jobs: its arguments (not None); they and the results are pickled through pipes.
        processes: how many worker processes to start.

    Raises:
        ChildProcessError: if a worker died (killed, out of memory) before it answered.
        Exception: whatever ``function`` raised in a worker.
    """
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    workers: dict[Connection, BaseProcess] = {}
    finished = False
    try:
        with _interrupts_deferred():
            for _ in range(processes):
                ours, theirs = context.Pipe()
                # A forked worker holds copies of the parent's ends; it closes them, so that
                # the parent's death reads as the end of its pipe and no worker is orphaned.
                inherited = [ours, *workers] if context.get_start_method() == "fork" else []
                worker = context.Process(target=_serve, args=(function, theirs, inherited))
                worker.daemon = True
                worker.start()
                theirs.close()  # The worker's end: its death then reads as the end of the pipe.
                workers[ours] = worker
        yield from _feed(workers, iter(jobs))
        finished = True
    finally:
        _stop(workers, finished)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while processes start, and deliver them after.

    An interrupt raised inside fork's at-fork callbacks (logging's lock handling) is printed
    as "Exception ignored" and lost: the command would then run on as if never stopped.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Only the main thread runs signal handlers.
        return
    received: list[int] = []
    # None: a handler not set from Python, which could not be put back.
    held = [s for s in _INTERRUPTS if signal.getsignal(s) not in (None, signal.SIG_IGN)]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received:
            signal.raise_signal(signum)


def _feed(workers: dict[Connection, BaseProcess], jobs: Iterator[Any]) -> Iterator[Any]:
    """Send each idle worker the next job and yield the results as they come."""
    idle, busy = list(workers), set()
    ahead = next(jobs, _END)
    while True:
        while idle and ahead is not _END:
            connection = idle.pop()
            connection.send(ahead)
            busy.add(connection)
            ahead = next(jobs, _END)
        if not busy:
            return
        for connection in wait(list(busy)):
            busy.discard(connection)
            idle.append(connection)
            yield _answer(connection, workers[connection])


def _answer(connection: Connection, worker: BaseProcess) -> Any:
    """A worker's result, or its error raised here."""
    try:
        succeeded, value = connection.recv()
    except (EOFError, OSError):
        worker.join(_STOP_SECONDS)
        raise ChildProcessError(
            f"a worker process died before it answered (exit code {worker.exitcode})"
        ) from None
    if not succeeded:
        raise value
    return value


def _serve(
    function: Callable[[Any], Any], connection: Connection, inherited: list[Connection]
) -> None:
    """A worker's loop: answer each job with ``(True, result)`` or ``(False, error)``, until
    told to stop or its parent is gone.

    A worker leaves Ctrl-C to its parent (which stops it) and dies quietly when killed,
    whatever handlers it inherited.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for other in inherited:
        other.close()
    try:
        while (job := connection.recv()) is not None:
            try:
                answer = (True, function(job))
            except Exception as error:  # Raised again in the parent, which knows what to do.
                answer = (False, error)
            connection.send(answer)
    except (EOFError, OSError):
        return  # The parent is gone.


def _stop(workers: dict[Connection, BaseProcess], finished: bool) -> None:
    """Let finished workers exit, or kill them at once after an interrupt or an error."""
    for connection, worker in workers.items():
        if finished:
            with contextlib.suppress(OSError):  # A worker that died is killed below.
                connection.send(None)
        elif worker.is_alive():
            worker.kill()
    for connection, worker in workers.items():
        worker.join(_STOP_SECONDS)
        if worker.is_alive():
            worker.kill()
            worker.join(_STOP_SECONDS)
        connection.close()
