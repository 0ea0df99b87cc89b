"""Dataset files from an archive (streamed, never extracted) or an extracted folder: finding the
data root, reading the metadata in one pass, then the images.

Shared by the archive-backed sources (HASYv2, CUB-200-2011); the tar reading itself is in
:mod:`cnnkit.data.tar_reader`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnkit.data.files import iter_file_bytes, read_regular_file
from cnnkit.data.folder import is_image_name
from cnnkit.data.source import DataFormatError, ReadError
from cnnkit.data.tar_reader import iter_archive

# Members seen before the metadata are kept in memory up to this size, so that an archive whose
# CSVs come last is decompressed once instead of twice.
BUFFER_LIMIT = 512 * 1024 * 1024


@dataclass
class ArchiveScan:
    """What one sequential pass over an archive found.

    Attributes:
        root: the folder inside the archive that holds the anchor file, ``""`` or ``"name/"``.
        files: the wanted files that were found, by name relative to ``root``.
        members: every other member under ``root`` by relative name, when the pass read the
            whole archive within the memory budget; None otherwise.
    """

    root: str
    files: dict[str, bytes]
    members: dict[str, bytes] | None


def _roots_of(name: str) -> list[tuple[str, str]]:
    """The ways to split a member name into a data root (top level or one folder) and a rest."""
    top, slash, rest = name.partition("/")
    return [("", name), (f"{top}/", rest)] if slash else [("", name)]


def scan_archive(
    path: str | Path, wanted: Collection[str], anchor: str, buffer_limit: int = BUFFER_LIMIT
) -> ArchiveScan:
    """Collect metadata files from an archive in one pass, stopping once all are found.

    The data root is where ``anchor`` lies: the top level or a single folder. When images come
    before the metadata (as in HASYv2, whose labels CSV is the last member), the pass goes on to
    the end and keeps every member (up to ``buffer_limit`` bytes), so that the images need not be
    decompressed a second time.

    Args:
        path: the archive.
        wanted: file names relative to the data root; must include ``anchor``.
        anchor: the file that marks the data root.
        buffer_limit: the most member bytes kept in memory.
    """
    found: dict[tuple[str, str], bytes] = {}
    buffered: dict[str, bytes] | None = {}
    buffered_size = 0
    buffered_images = False
    complete_root: str | None = None

    endings = tuple(wanted)

    def is_wanted(name: str) -> bool:
        return buffered is not None or name.endswith(endings)

    for name, data in iter_archive(path, is_wanted):
        matches = []
        if name.endswith(endings):
            matches = [(root, rest) for root, rest in _roots_of(name) if rest in wanted]
        for match in matches:
            found[match] = data or b""
        if not matches and buffered is not None and data is not None:
            buffered_size += len(data)
            buffered_images = buffered_images or is_image_name(name)
            buffered[name] = data
            if buffered_size > buffer_limit:
                buffered = None
        for root, _ in matches:
            if complete_root is None and all((root, file) in found for file in wanted):
                complete_root = root
        if complete_root is not None and (buffered is None or not buffered_images):
            files = {file: found[(complete_root, file)] for file in wanted}
            return ArchiveScan(complete_root, files, None)
    return _whole_scan(found, buffered, complete_root, anchor)


def _whole_scan(
    found: dict[tuple[str, str], bytes],
    buffered: dict[str, bytes] | None,
    root: str | None,
    anchor: str,
) -> ArchiveScan:
    """What a pass of :func:`scan_archive` that read the whole archive found. Without a
    ``root`` that holds every wanted file, the root is where ``anchor`` lies (or the top)."""
    if root is None:
        root = next((where for where, rest in found if rest == anchor), "")
    files = {rest: data for (where, rest), data in found.items() if where == root}
    members = None
    if buffered is not None:
        members = {
            name[len(root) :]: data for name, data in buffered.items() if name.startswith(root)
        }
    return ArchiveScan(root, files, members)


def find_data_root(folder: Path, anchor: str) -> Path:
    """Return ``folder`` or its single subfolder that holds ``anchor``.

    Raises:
        DataFormatError: if neither holds it, or several subfolders do.
    """
    if (folder / anchor).is_file():
        return folder
    candidates = sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith(".") and (entry / anchor).is_file()
    )
    if len(candidates) > 1:
        names = ", ".join(entry.name for entry in candidates)
        raise DataFormatError(f"{folder}: several subfolders hold {anchor} ({names}); pick one")
    if not candidates:
        raise DataFormatError(f"{folder}: missing {anchor} (looked here and one folder down)")
    return candidates[0]


class DatasetFiles:
    """A dataset shipped as an archive (streamed, never extracted) or as an extracted folder.

    Args:
        path: the archive file or the folder.
        anchor: the metadata file that marks the data root (the top level or one folder down).
    """

    def __init__(self, path: str | Path, anchor: str) -> None:
        self.path = Path(path)
        self.anchor = anchor
        # Files missing when the listing was fingerprinted (sources that stat each file).
        self.absent: frozenset[str] = frozenset()
        self.folder: Path | None = None
        self._archive_root = ""
        self._members: dict[str, bytes] | None = None

    def read_metadata(self, required: Sequence[str]) -> dict[str, bytes]:
        """Read the metadata files (one pass over an archive, partial where possible).

        Raises:
            DataFormatError: if the path does not exist or a required file is missing.
        """
        if self.path.is_dir():
            self.folder = find_data_root(self.path, self.anchor)
            files = {}
            for file in required:
                try:
                    files[file] = read_regular_file(self.folder / file)
                except OSError as error:
                    raise DataFormatError(
                        f"{self.folder / file}: missing or unreadable ({error.strerror})"
                    ) from error
            return files
        if not self.path.is_file():
            raise DataFormatError(f"{self.path}: no such archive or folder")
        scan = scan_archive(self.path, required, self.anchor, BUFFER_LIMIT)
        missing = [file for file in required if file not in scan.files]
        if missing:
            raise DataFormatError(f"{self.path}: the archive has no {', '.join(missing)}")
        self._archive_root, self._members = scan.root, scan.members
        return scan.files

    def archive_token(self) -> str | None:
        """The archive's path, size and modification time, without reading it; None otherwise."""
        if not self.path.is_file():
            return None
        stat = self.path.stat()
        return f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    def identity(self) -> str:
        """A cheap identity of the container: the archive's path, size and time, or the folder."""
        if self.folder is not None:
            return f"folder|{self.folder.resolve()}"
        return f"archive|{self.archive_token()}"

    def iter_bytes(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes | ReadError]]:
        """Yield ``(key, bytes)`` for keys relative to the data root: one pass at most.

        Keys absent from the archive or folder are not yielded; unreadable files a ReadError.
        Call :meth:`read_metadata` first.
        """
        if self.folder is not None:
            yield from iter_file_bytes(self.folder, keys, self.absent)
            return
        if self._members is not None:
            # The metadata pass already holds every member; hand them out once.
            members, self._members = self._members, None
            yield from ((key, members[key]) for key in keys if key in members)
            return
        pending = {self._archive_root + key: key for key in keys}
        for name, data in iter_archive(self.path, pending.__contains__):
            key = pending.pop(name, None)
            if key is not None and data is not None:
                yield key, data
            if not pending:
                return


def parse_integer(text: str | None, name: str, line: int, column: str) -> int:
    """``int(text)``, raising :class:`DataFormatError` naming file, line and column."""
    try:
        return int(text or "")
    except ValueError:
        raise DataFormatError(f"{name}:{line}: {column} must be an integer; got {text!r}") from None


def relative_key(path: str, name: str, line: int) -> str:
    """Normalise a path relative to the data root, refusing one that escapes it."""
    key = posixpath.normpath(path) if path else ""
    if not key or key.startswith(("../", "/")) or key in (".", ".."):
        raise DataFormatError(f"{name}:{line}: path {path!r} is outside the dataset; refused")
    return key
