"""One line of a third-party error's message, for errors that must fit on one line, and the
errors an exception was raised from or while handling."""

from __future__ import annotations

import re
from collections.abc import Iterator

# Colour and cursor codes (CSI sequences): the torch.onnx exporter colours its messages.
_TERMINAL_CODE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def error_line(error: BaseException, last: bool = False) -> str:
    """The first (or ``last``) non-empty line of ``error``'s message, or its type's name.

    torch, SQLAlchemy and friends explain at length over many lines; the first line usually
    says what went wrong (the last one, for a state-dict size mismatch). Terminal colour codes
    are removed.
    """
    text = _TERMINAL_CODE.sub("", str(error))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(error).__name__


def chained_errors(error: BaseException) -> Iterator[BaseException]:
    """``error``, then each error it was raised from (``__cause__``) or while handling
    (``__context__``), and theirs, each once."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def caused_by_interrupt(error: BaseException) -> bool:
    """Whether a Ctrl-C (or SIGTERM turned into one) lies behind ``error``: a library that
    catches every ``Exception`` can meet the half-done import or state an interrupt left and
    raise an unrelated error while handling it."""
    return any(isinstance(e, KeyboardInterrupt) for e in chained_errors(error))


def root_cause(error: BaseException) -> BaseException:
    """The error at the end of ``error``'s ``raise ... from`` chain (``error`` itself if none):
    what a wrapper such as torch.onnx's TorchExportError reports on."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error
