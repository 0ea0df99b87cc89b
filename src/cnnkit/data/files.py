"""Reading whole input files without blocking on FIFOs or reading devices.

A dataset folder or a ``predict`` argument may name a FIFO (``mkfifo a.png``) or a device:
a plain ``open`` of a FIFO waits forever for a writer, and ``/dev/zero`` never ends. Every
input file the package reads goes through :func:`read_regular_file`, which refuses both.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path

from cnnkit.data.source import ReadError

# What opening a path that is no regular file gives: read_regular_file's own "not a regular
# file" (a folder, FIFO or device), EISDIR where the system refuses to open a folder, ENXIO for
# a socket. It lasts until the path is replaced; a permission denied may be fixed by chmod.
_NOT_A_FILE = frozenset((errno.EINVAL, errno.EISDIR, errno.ENXIO))


def read_regular_file(path: str | Path) -> bytes:
    """Return the bytes of the regular file at ``path`` (symlinks are followed).

    Raises:
        OSError: if ``path`` is missing or unreadable, or is not a regular file (a folder, a
            FIFO, a socket or a device); ``strerror`` says which.
    """
    # O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer.
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(descriptor, True)
        handle = os.fdopen(descriptor, "rb")
    except BaseException:
        # An interrupt inside os.fdopen may leave the descriptor already closed: closing it
        # again must not replace the interrupt with "bad file descriptor".
        with contextlib.suppress(OSError):
            os.close(descriptor)
        raise
    with handle:
        return handle.read()


def iter_file_bytes(
    root: Path, keys: Iterable[str], absent: AbstractSet[str] = frozenset()
) -> Iterator[tuple[str, bytes | ReadError]]:
    """Yield ``(key, bytes)`` for each path relative to ``root``; a :class:`ReadError` where it
    cannot be read (perhaps for a moment: a network share, a file being copied or moved).

    A key in ``absent`` (missing when the listing's fingerprint was taken, which records it)
    that is still missing is not yielded, as an archive does not yield a key it lacks: it is
    absent for good, so a cache entry may remember it.
    """
    for key in keys:
        try:
            yield key, read_regular_file(root / key)
        except (FileNotFoundError, NotADirectoryError) as error:
            if key not in absent:
                yield key, ReadError(error.strerror or str(error))
        except OSError as error:
            yield key, ReadError(error.strerror or str(error), error.errno in _NOT_A_FILE)
