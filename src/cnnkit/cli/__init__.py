"""The ``cnnkit`` command line: parse arguments, build configs, call the library, print results.

This package is the only code that reads ``sys.argv`` and the environment, and the only code
that prints; a module per command, with the options they share in ``arguments``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.parser import build_parser, parse_arguments

__all__ = ["CommandError", "build_parser", "main", "parse_arguments"]


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Make ``kill PID`` (SIGTERM: what nohup jobs, schedulers and ``docker stop`` send) stop a
    command as Ctrl-C does: a training run then records that it was interrupted and keeps its
    last checkpoint for ``--resume``, instead of dying with run.json still saying "running"."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # Only the main thread may set handlers (main() called from a thread).
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _discard_stdout() -> None:
    """Point stdout at the null device, so that Python's flush at exit finds no closed pipe."""
    with contextlib.suppress(OSError, ValueError):  # No file descriptor (a test's capture).
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def _said_by_rank_0(args, error: BaseException) -> bool:
    """Whether this is a ``cnnkit train`` process under torchrun other than its machine's
    first (local rank 0), and ``error`` one that every process meets alike (a bad option, a
    checkpoint that cannot be resumed): each machine's first process alone prints it, where
    every process used to print the same line. ``-v`` prints it everywhere."""
    if args.command != "train" or args.verbose:
        return False
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        return False
    if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0":
        return False
    from cnnkit.training.checkpoint import CheckpointError

    return isinstance(error, (CommandError, CheckpointError))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # -v shows this package's debug details, not every library's: onnx_ir, PIL and others log
    # over a thousand DEBUG and INFO lines for one export.
    logging.getLogger("cnnkit").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    try:
        with _stop_on_sigterm():
            status = args.handler(args)
        sys.stdout.flush()  # Where the reader has gone, buffered output fails here.
        return status
    except BrokenPipeError:
        # The reader went away (`cnnkit predict FOLDER | head -1`): stop quietly, as Unix tools
        # do, with the status of a process that SIGPIPE ended.
        _discard_stdout()
        return 128 + getattr(signal, "SIGPIPE", 13)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, ImportError) as error:
        if _said_by_rank_0(args, error):
            return 2
        if args.verbose and not isinstance(error, CommandError):
            # -v: the whole traceback, for a bug report; the status stays 2 (a fatal error),
            # not Python's 1, which `predict` uses for "some files failed".
            traceback.print_exc()
        # "[Errno 17] cannot write ..." reads better without Python's errno prefix.
        message = re.sub(r"^\[Errno \d+\] ", "", str(error)).splitlines()
        print(f"cnnkit {args.command}: error: {message[0] if message else error}", file=sys.stderr)
        for line in message[1:]:
            print(line, file=sys.stderr)
        return 2
