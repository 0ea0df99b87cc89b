"""Files that are either fully written or not there: write a temporary, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it; it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(temporary_path)``, fsync the result, then rename it onto ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
        )
    except OSError as error:  # Name the file asked for, not the temporary one.
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise OSError(
                error.errno, f"cannot write {path}: {blocking} is a file, not a folder"
            ) from error
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from error
    os.close(handle)
    umask = current_umask()
    try:
        write(Path(temporary))
        # mkstemp creates the file private (0600), and some writers (safetensors) replace it
        # with their own; either way give the result the usual umask-based mode.
        os.chmod(temporary, 0o666 & ~umask)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        try:
            os.replace(temporary, path)
        except OSError as error:
            raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
