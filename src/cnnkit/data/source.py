"""The contract every data source follows: list samples, then stream their bytes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


class DataFormatError(ValueError):
    """A listing file (CSV, metadata) that is malformed; the message names file and line."""


def encode_name(text: str) -> bytes:
    """UTF-8 bytes of a path, key or token to hash.

    A file name that is not UTF-8 reaches Python with its bad bytes as surrogates (``os.walk``,
    ``sys.argv``); they turn back into those bytes here instead of failing the encoding.
    """
    return text.encode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (surrogates, see
    :func:`encode_name`) shown as U+FFFD, as ``cnnkit predict`` prints them: for what cannot
    hold surrogates (a plot's labels, JSON for a web page)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class SampleRecord:
    """One image of a source.

    Attributes:
        key: identifies the file inside the source (a relative path or an archive member).
        label: index into the listing's class names.
        split: ``"train"``, ``"test"`` or ``None`` when the source has no official split.
        origin: where the record was declared, such as ``labels.csv:12``, for error messages.
        box: optional crop ``(x, y, width, height)`` in pixels, applied before preprocessing.
    """

    key: str
    label: int
    split: str | None = None
    origin: str = ""
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class ReadError:
    """Why a file that is there could not be read: a source yields it in place of the bytes.

    Attributes:
        reason: the system's words, such as ``"Permission denied"`` or ``"not a regular file"``.
        lasting: whether it lasts until the path is replaced (a folder, FIFO or device named
            like an image), which changes the listing's fingerprint, so a cache entry may keep
            the problem. Other failures may pass (an I/O error on a network share, a permission
            fixed by chmod, which leaves size and time as they were): nothing is cached then.
    """

    reason: str
    lasting: bool = False


@dataclass
class Listing:
    """All samples of a source, plus what identifies its contents for the cache."""

    records: list[SampleRecord]
    class_names: list[str]
    fingerprint: str
    description: str = ""


class Source(Protocol):
    """A dataset that can list its samples and stream their encoded bytes."""

    def list_samples(self) -> Listing:
        """Read the metadata and return every sample with its label."""
        ...

    def iter_bytes(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes | ReadError]]:
        """Yield ``(key, data)`` for each key, in any order; ``data`` is a :class:`ReadError`
        if the file is there but could not be read. A key the source does not hold is not
        yielded."""
        ...


# A source may also offer ``cache_token() -> str | None``: a cheap string that changes whenever
# its listing would. Archive sources use it so that the listing itself is cached on disk.
