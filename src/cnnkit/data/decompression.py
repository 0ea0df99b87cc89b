"""Decompressed bytes of a dataset archive (bz2, gzip, xz or plain), read ahead in a thread, and
exact-size reads over them. The reader never seeks: a compressed archive is one pass."""

from __future__ import annotations

import bz2
import lzma
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from cnnkit.data.source import DataFormatError

_READ_SIZE = 1 << 20
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


def iter_decompressed(path: Path) -> Iterator[bytes]:
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


class ByteStream:
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
