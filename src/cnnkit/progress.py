"""When progress bars show: the one rule every tqdm bar in cnnkit follows."""

from __future__ import annotations

import sys
from typing import TextIO


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a bar: off when ``progress`` is false, and otherwise shown only
    on a terminal (``None``), so piped or logged output gets no ``\\r``-joined lines."""
    return None if progress else True


def plain_lines(progress: bool, stream: TextIO | None = None) -> bool:
    """Whether to print one plain line per epoch instead: progress is wanted, but the bars do
    not show because the output goes to a file or a pipe (a log under nohup or CI then still
    says how training goes while it runs)."""
    stream = stream or sys.stderr
    return progress and not (hasattr(stream, "isatty") and stream.isatty())


def bars_only(progress: bool) -> bool:
    """``progress`` for a run whose epochs should not print plain lines off a terminal (a
    search's trials: the search prints one line per trial instead)."""
    return progress and not plain_lines(progress)
