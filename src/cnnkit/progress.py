"""When progress bars show: the one rule every tqdm bar in cnnkit follows."""

from __future__ import annotations


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a bar: off when ``progress`` is false, and otherwise shown only
    on a terminal (``None``), so piped or logged output gets no ``\\r``-joined lines."""
    return None if progress else True
