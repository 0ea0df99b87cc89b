"""Sequential reading of dataset archives (tar, optionally bz2/gzip/xz) and extracted folders.

Shared by the archive-backed sources (HASYv2, CUB-200-2011). The reader never seeks, which keeps
a compressed archive to one decompression pass.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import posixpath
import queue
import threading
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnkit.data.files import iter_file_bytes, read_regular_file
from cnnkit.data.folder import is_image_name
from cnnkit.data.source import DataFormatError, ReadError

logger = logging.getLogger(__name__)

# Members seen before the metadata are kept in memory up to this size, so that an archive whose
# CSVs come last is decompressed once instead of twice.
BUFFER_LIMIT = 512 * 1024 * 1024
_BLOCK = 512
_READ_SIZE = 1 << 20
_REGULAR_TYPES = (b"0", b"\0", b"7")
_END = object()


def _decompressor_factory(head: bytes) -> Callable[[], object] | None:
    if head.startswith(b"BZh"):
        return bz2.BZ2Decompressor
    if head.startswith(b"\x1f\x8b"):
        return lambda: zlib.decompressobj(wbits=31)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor
    return None


def _decompress_file(path: Path) -> Iterator[bytes]:
    """Yield the decompressed bytes of a (multi-stream) bz2, gzip, xz or plain file in order.

    Raises:
        DataFormatError: for corrupt compressed data or a compressed stream cut short.
    """
    with open(path, "rb") as handle:
        data = handle.read(_READ_SIZE)
        factory = _decompressor_factory(data)
        if factory is None:
            while data:
                yield data
                data = handle.read(_READ_SIZE)
            return
        decompressor, started = factory(), False
        while data:
            if not started and not data.strip(b"\0"):
                # Zeros after a stream's end are padding, not the start of another stream.
                data = handle.read(_READ_SIZE)
                continue
            try:
                output = decompressor.decompress(data)
            except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
                raise DataFormatError(f"{path}: corrupt compressed data ({error})") from error
            started = True
            yield output
            data = b""
            if decompressor.eof:
                # Parallel compressors write several streams back to back; zeros are padding.
                data = decompressor.unused_data
                decompressor, started = factory(), False
            if not data:
                data = handle.read(_READ_SIZE)
        if started:
            raise DataFormatError(f"{path}: compressed data ends early (truncated download?)")


def _iter_decompressed(path: Path) -> Iterator[bytes]:
    """Like :func:`_decompress_file`, decompressing ahead in a thread.

    The decompressors release the GIL, so the tar parsing overlaps the decompression.
    """
    chunks: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in _decompress_file(path):
                if not put(chunk):
                    return
            put(_END)
        except Exception as error:  # Handed to the consumer, which raises it.
            put(error)

    thread = threading.Thread(target=produce, name="decompress", daemon=True)
    thread.start()
    try:
        while (item := chunks.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


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


def _pax_values(data: bytes, path: Path) -> dict[str, str]:
    """The ``key=value`` records of a pax header, each ``"<length> <key>=<value>\\n"``.

    Raises:
        DataFormatError: naming ``path`` for a record whose length is missing, too short for
            the record (0 would never move on) or beyond the header.
    """
    values, position = {}, 0
    while position < len(data) and data[position]:  # NUL padding after the last record ends it.
        space = data.find(b" ", position)
        digits = data[position:space] if space > position else b""
        end = position + int(digits) if digits.isdigit() else -1
        if end <= space + 1 or end > len(data):
            raise DataFormatError(
                f"{path}: corrupt pax header (bad record {data[position : position + 40]!r})"
            )
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        values[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position = end
    return values


def normalize_member_name(name: str) -> str:
    """Drop a leading ``./`` or ``/`` so that member names compare as relative paths."""
    if name.startswith(("./", "/")):
        while name.startswith("./"):
            name = name[2:]
        name = name.lstrip("/")
    return name


def iter_archive(
    path: str | Path, wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """Stream the regular files of a tar archive (bz2, gzip, xz or plain) in archive order,
    hard links last.

    A hand-written reader: ``tarfile``'s stream mode spends about 90% of its time on per-member
    bookkeeping (20 s instead of 2 s for HASYv2). It reads sequentially and never seeks.

    A hard link is a file too. A wanted one comes after the others, with its target's bytes
    from a second pass that reads the targets only: keeping every member's bytes in case a
    later link names it would not bound the memory. An archive without hard links is read once.

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
    links: dict[str, str] = {}
    yield from _iter_members(path, wanted, links)
    if links:
        yield from _iter_hard_links(path, links)


def _iter_hard_links(path: Path, links: dict[str, str]) -> Iterator[tuple[str, bytes | None]]:
    """Yield each hard link of ``links`` (name -> target name) with its target's bytes."""
    pending: dict[str, list[str]] = {}
    for link, target in links.items():
        pending.setdefault(target, []).append(link)
    for target, data in _iter_members(path, pending.__contains__, None):
        for link in pending.pop(target, ()):
            yield link, data
    for target, names in pending.items():
        logger.warning(
            "%s: hard link %s points to %s, which is not a file in the archive",
            path,
            names[0],
            target,
        )


def _text(field: bytes) -> str:
    """A NUL-terminated header field as text; bytes that are not UTF-8 become surrogates."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _member_name(header: bytes, pax: dict[str, str], long_name: str | None) -> str:
    """The normalised name of the member of ``header``, or the one its pax or GNU long-name
    record gives it."""
    name = _text(header[:100])
    if header[257:263] == b"ustar\0" and header[345] != 0:
        name = f"{_text(header[345:500])}/{name}"
    return normalize_member_name(pax.get("path", long_name or name))


def _iter_members(
    path: Path, wanted: Callable[[str], bool] | None, links: dict[str, str] | None
) -> Iterator[tuple[str, bytes | None]]:
    """One pass of :func:`iter_archive`. Wanted hard links go into ``links`` (name -> the file
    they name) instead of being yielded; with ``links`` None, hard links are left out."""
    stream = _ByteStream(_iter_decompressed(path))
    long_name: str | None = None
    long_link: str | None = None
    pax: dict[str, str] = {}
    link_targets: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if 0 < len(header) < _BLOCK:
            if stream.offset <= _BLOCK:  # Not even one header: a small file of another kind.
                raise DataFormatError(f"{path}: not a tar archive ({len(header)} bytes)")
            raise DataFormatError(f"{path}: archive ends inside a header (truncated download?)")
        if not header.strip(b"\0"):
            return
        # Compressed formats carry their own checksums, so past the first header the header
        # checksum is only checked where the "ustar" magic does not already vouch for it.
        trusted = stream.offset > _BLOCK and header[257:262] == b"ustar"
        try:
            size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
            valid = trusted or _octal(header[148:156]) == sum(header) - sum(header[148:156]) + 256
        except ValueError:
            valid = False
        if not valid:
            raise DataFormatError(f"{path}: not a tar archive (bad header at byte {stream.offset})")
        kind = header[156:157]
        name = _member_name(header, pax, long_name)
        padded = -(-size // _BLOCK) * _BLOCK
        if kind == b"g":  # Global settings: nothing that names or sizes a file.
            stream.skip(padded)
            continue
        if kind in (b"K", b"L", b"x"):
            data = stream.read(size)
            if kind == b"x":
                pax = _pax_values(data, path)
            elif kind == b"K":
                long_link = _text(data)
            else:
                long_name = _text(data)
            stream.skip(padded - size)
            continue
        if kind == b"1":
            target = normalize_member_name(pax.get("linkpath", long_link or _text(header[157:257])))
            link_targets[name] = link_targets.get(target, target)  # A link to a link: its file.
        long_name, long_link, pax = None, None, {}
        is_link = kind == b"1" and links is not None
        if kind in _REGULAR_TYPES and (wanted is None or wanted(name)):
            data = stream.read(size)
            complete = len(data) == size and stream.skip(padded - size) == padded - size
            if complete:
                yield name, data
        else:
            complete = stream.skip(padded) == padded
            if is_link and (wanted is None or wanted(name)):
                links[name] = link_targets[name]  # Yielded after the pass, with the file's bytes.
            elif complete and (kind in _REGULAR_TYPES or is_link):
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
    root = complete_root
    if root is None:
        root = next((root for root, rest in found if rest == anchor), "")
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
