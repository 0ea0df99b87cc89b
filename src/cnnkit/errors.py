"""One line of a third-party error's message, for errors that must fit on one line."""

from __future__ import annotations


def error_line(error: BaseException, last: bool = False) -> str:
    """The first (or ``last``) non-empty line of ``error``'s message, or its type's name.

    torch, SQLAlchemy and friends explain at length over many lines; the first line usually
    says what went wrong (the last one, for a state-dict size mismatch).
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(error).__name__
