"""HTTP downloads into a ``.part`` file that resume where they stopped (Range requests),
with a progress bar. What the bytes are, and whether they are right, is ``fetch``'s concern.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from cnnkit.progress import bar_disabled

if TYPE_CHECKING:
    from cnnkit.data.official_archives import ArchiveSpec

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
_MAX_ATTEMPTS = 3
_USER_AGENT = "cnnkit-fetch (python-urllib)"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class FetchError(ValueError):
    """An archive could not be downloaded or imported."""


class InterruptedTransferError(Exception):
    """The connection ended before the whole body arrived; the ``.part`` file can resume."""


def download(
    url: str, part_path: Path, spec: ArchiveSpec, *, progress: bool, timeout: float
) -> bool:
    """Fill ``part_path`` with the body at ``url``, resuming after dropped connections.

    Returns:
        Whether the finished file was resumed, i.e. ends with bytes appended to an earlier
        ``.part`` (from this run or an earlier one).
    """
    last_interruption: InterruptedTransferError | None = None
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            return _download_once(url, part_path, spec, progress=progress, timeout=timeout)
        except InterruptedTransferError as interruption:
            last_interruption = interruption
            logger.warning(
                "download of %s interrupted (%s); attempt %d of %d",
                url,
                interruption,
                attempt,
                _MAX_ATTEMPTS,
            )
    raise FetchError(
        f"download of {url} was interrupted {_MAX_ATTEMPTS} times ({last_interruption}); "
        f"run again to resume {part_path.name}, or pass --from FILE with a copy of {spec.filename}"
    )


def _download_once(
    url: str, part_path: Path, spec: ArchiveSpec, *, progress: bool, timeout: float
) -> bool:
    """Make one request, appending to the ``.part`` file on 206 and rewriting it on 200.

    Returns:
        Whether the ``.part`` file holds bytes from an earlier request (a resumed download).
    """
    # Only the official URL is known to serve the published size; a mirror's copy may differ.
    known_size = spec.size_bytes if url == spec.url else None
    offset = part_path.stat().st_size if part_path.exists() else 0
    if known_size is not None and offset > known_size:
        logger.warning("%s is larger than the archive; starting again", part_path)
        part_path.unlink()
        offset = 0
    response = _request(url, offset, spec, timeout=timeout)
    if response is None:
        # Nothing left to send: the .part file is already whole; the checksum decides.
        logger.info("server reports %s is complete", part_path)
        return True
    with response:
        start, total, mode = _body_position(response, url, part_path, offset, spec)
        if total is None:
            total = known_size
        # The publisher's size is only a hint for a mirror's bar, never a reason to retry.
        bar_total = total if total is not None else spec.size_bytes
        received = _copy_body(response, part_path, mode, start, bar_total, spec.filename, progress)
    # Without a length, a clean end of the body is its end: the checksum decides if it is whole.
    if total is not None and start + received < total:
        raise InterruptedTransferError(
            f"connection closed after byte {start + received} of {total}"
        )
    return mode == "ab"


def _request(
    url: str, offset: int, spec: ArchiveSpec, *, timeout: float
) -> http.client.HTTPResponse | None:
    """Open ``url`` from byte ``offset``; None if the server says there is nothing left (416).

    Raises:
        FetchError: if the server cannot be reached or answers with an error.
    """
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            return None
        raise FetchError(_failure_message(url, spec, f"HTTP {error.code} {error.reason}")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        raise FetchError(_failure_message(url, spec, str(reason))) from None


def _body_position(
    response: http.client.HTTPResponse, url: str, part_path: Path, offset: int, spec: ArchiveSpec
) -> tuple[int, int | None, str]:
    """Where the body starts, the whole file's size (None if unknown) and the ``.part`` mode.

    Raises:
        FetchError: if the server resumed at the wrong byte or answered an unexpected status.
    """
    if response.status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            part_path.unlink(missing_ok=True)
            raise FetchError(
                f"{url} resumed at byte {start} instead of {offset}; run again to restart"
            )
        logger.info("resuming %s at byte %d", spec.filename, offset)
        mode = "ab"
    elif response.status == 200:
        if offset:
            # The server ignored the Range header; without a word, the restart looks like a hang.
            logger.warning(
                "the server does not resume downloads: starting %s again from the beginning",
                spec.filename,
            )
        start, total, mode = 0, None, "wb"
    else:
        raise FetchError(_failure_message(url, spec, f"unexpected HTTP {response.status}"))
    length_header = response.headers.get("Content-Length")
    if total is None and length_header and length_header.isdigit():
        total = start + int(length_header)
    return start, total, mode


def _copy_body(
    response: http.client.HTTPResponse,
    part_path: Path,
    mode: str,
    offset: int,
    total: int | None,
    label: str,
    progress: bool,
) -> int:
    """Stream the response into the ``.part`` file, fsync it, and return the bytes received.

    Each piece is written (and flushed) as it arrives, rather than once per whole chunk, so the
    bar moves with the data and an interrupt (Ctrl-C) keeps every byte received to resume.
    """
    received = 0
    interruption: Exception | None = None
    with (
        open(part_path, mode) as output,
        tqdm(
            total=total,
            initial=offset,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=bar_disabled(progress),
        ) as bar,
    ):
        while True:
            try:
                chunk = response.read1(_CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as error:
                interruption = error
                break
            if not chunk:
                break
            output.write(chunk)
            output.flush()
            received += len(chunk)
            bar.update(len(chunk))
        os.fsync(output.fileno())
    if interruption is not None:
        raise InterruptedTransferError(f"{type(interruption).__name__} after {received} bytes")
    return received


def _parse_content_range(header: str | None) -> tuple[int, int | None]:
    """Return the first byte and the total size (None if ``*``) of a Content-Range header."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        raise FetchError(f"server sent 206 with an unreadable Content-Range: {header!r}")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _failure_message(url: str, spec: ArchiveSpec, reason: str) -> str:
    return (
        f"could not download {url}: {reason}; check the connection, or download "
        f"{spec.filename} yourself and pass --from FILE"
    )
