"""HASYv2 handwritten symbols, read from the official archive (streamed) or an extracted folder.

Also owns the sequential tar reader that the archive-backed sources share.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import lzma
import os
import posixpath
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnkit.data.csv_source import iter_csv_rows
from cnnkit.data.source import DataFormatError, Listing, SampleRecord

logger = logging.getLogger(__name__)

LABELS_FILE = "hasy-data-labels.csv"
SYMBOLS_FILE = "symbols.csv"
# Members seen before the metadata are kept in memory up to this size, so that an archive whose
# CSVs come last is decompressed once instead of twice.
BUFFER_LIMIT = 512 * 1024 * 1024
_BLOCK = 512
_READ_SIZE = 1 << 20
_REGULAR_TYPES = (b"0", b"\0", b"7")


def _decompressor_factory(head: bytes) -> Callable[[], object] | None:
    if head.startswith(b"BZh"):
        return bz2.BZ2Decompressor
    if head.startswith(b"\x1f\x8b"):
        return lambda: zlib.decompressobj(wbits=31)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor
    return None


def _iter_decompressed(path: Path) -> Iterator[bytes]:
    """Yield the decompressed bytes of a (multi-stream) bz2, gzip, xz or plain file in order."""
    with open(path, "rb") as handle:
        data = handle.read(_READ_SIZE)
        factory = _decompressor_factory(data)
        decompressor = factory() if factory else None
        while data:
            if decompressor is None:
                yield data
                data = handle.read(_READ_SIZE)
                continue
            try:
                yield decompressor.decompress(data)
            except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
                raise DataFormatError(f"{path}: corrupt compressed data ({error})") from error
            data = b""
            if decompressor.eof:
                # Parallel compressors write several streams back to back; zeros are padding.
                data = decompressor.unused_data
                if not data.strip(b"\0"):
                    data = b""
                decompressor = factory()
            if not data:
                data = handle.read(_READ_SIZE)


class _ByteStream:
    """Exact-size reads over a sequence of chunks, copying each byte at most twice."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._position = 0
        self.offset = 0

    def _fill(self, size: int) -> None:
        pieces = [self._buffer[self._position :]]
        available = len(pieces[0])
        while available < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            pieces.append(chunk)
            available += len(chunk)
        self._buffer = b"".join(pieces)
        self._position = 0

    def read(self, size: int) -> bytes:
        if len(self._buffer) - self._position < size:
            self._fill(size)
        start = self._position
        self._position = min(start + size, len(self._buffer))
        self.offset += self._position - start
        return self._buffer[start : self._position]

    def skip(self, size: int) -> int:
        skipped = 0
        while skipped < size:
            if self._position >= len(self._buffer):
                self._fill(1)
                if not self._buffer:
                    break
            step = min(size - skipped, len(self._buffer) - self._position)
            self._position += step
            skipped += step
        self.offset += skipped
        return skipped


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def _pax_values(data: bytes) -> dict[str, str]:
    values, position = {}, 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        values[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position += length
    return values


def normalize_member_name(name: str) -> str:
    """Drop a leading ``./`` or ``/`` so that member names compare as relative paths."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def iter_archive(
    path: str | Path, wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """Stream the regular files of a tar archive (bz2, gzip, xz or plain) in archive order.

    A hand-written reader: ``tarfile``'s stream mode spends about 90% of its time on per-member
    bookkeeping (20 s instead of 2 s for HASYv2). It reads sequentially and never seeks.

    Args:
        path: the archive file.
        wanted: decides from the normalised member name whether to return its bytes; the bytes
            of other members are skipped and returned as None. Default: all.

    Yields:
        ``(name, data)`` per regular file, ``name`` normalised by :func:`normalize_member_name`.

    Raises:
        DataFormatError: for a corrupt header, corrupt compressed data or a truncated archive.
    """
    path = Path(path)
    stream = _ByteStream(_iter_decompressed(path))
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK or not header.strip(b"\0"):
            return
        checksum = sum(header) - sum(header[148:156]) + 256
        try:
            valid = checksum == _octal(header[148:156])
            size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
        except ValueError:
            valid = False
        if not valid:
            raise DataFormatError(f"{path}: not a tar archive (bad header at byte {stream.offset})")
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:263] == b"ustar\0" and header[345] != 0:
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}"
        name = normalize_member_name(pax.get("path", long_name or name))
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (b"L", b"x"):
            data = stream.read(size)
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                pax = _pax_values(data)
            stream.skip(padded - size)
            continue
        long_name, pax = None, {}
        if kind in _REGULAR_TYPES and (wanted is None or wanted(name)):
            data = stream.read(size)
            complete = len(data) == size and stream.skip(padded - size) == padded - size
            if complete:
                yield name, data
        else:
            complete = stream.skip(padded) == padded
            if complete and kind in _REGULAR_TYPES:
                yield name, None
        if not complete:
            raise DataFormatError(f"{path}: archive ends inside {name!r} (truncated download?)")


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

    The data root is where ``anchor`` lies: the top level or a single folder. Members seen
    before the metadata is complete are kept (up to ``buffer_limit`` bytes) so that, when the
    metadata comes last, the images need not be decompressed a second time.

    Args:
        path: the archive.
        wanted: file names relative to the data root; must include ``anchor``.
        anchor: the file that marks the data root.
        buffer_limit: the most member bytes kept in memory.
    """
    found: dict[tuple[str, str], bytes] = {}
    buffered: dict[str, bytes] | None = {}
    buffered_size = 0

    def is_wanted(name: str) -> bool:
        return buffered is not None or any(rest in wanted for _, rest in _roots_of(name))

    for name, data in iter_archive(path, is_wanted):
        matches = [(root, rest) for root, rest in _roots_of(name) if rest in wanted]
        for match in matches:
            found[match] = data or b""
        if not matches and buffered is not None and data is not None:
            buffered_size += len(data)
            buffered[name] = data
            if buffered_size > buffer_limit:
                buffered = None
        for root, rest in matches:
            if rest == anchor and all((root, file) in found for file in wanted):
                return ArchiveScan(root, {file: found[(root, file)] for file in wanted}, None)
            if all((root, file) in found for file in wanted) and (root, anchor) in found:
                return ArchiveScan(root, {file: found[(root, file)] for file in wanted}, None)
    root = next((root for root, rest in found if rest == anchor), "")
    files = {rest: data for (where, rest), data in found.items() if where == root}
    members = None
    if buffered is not None:
        members = {name[len(root) :]: data for name, data in buffered.items() if name.startswith(root)}
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
