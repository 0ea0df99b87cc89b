"""Download or import the official dataset archives (HASYv2, CUB-200-2011), checked by checksum.

Downloads resume from a ``<file>.part`` with an HTTP Range request, and a finished file is verified
and then renamed into place, so the target folder never holds a half-written archive. A download
that fails its checksum is kept as ``<file>.unverified`` for the next run to check or accept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cnnkit.atomic import fsync_directory, write_atomically
from cnnkit.data.download import download
from cnnkit.data.official_archives import (
    READ_BYTES,
    ArchiveSpec,
    ChecksumError,
    get_archive_spec,
    is_hex_digest,
    verify_archive,
)

logger = logging.getLogger(__name__)

_UNVERIFIED_SUFFIX = ".unverified"


def fetch_archive(
    name: str,
    to_dir: str | Path,
    *,
    from_file: str | Path | None = None,
    url: str | None = None,
    verify: bool = True,
    progress: bool = True,
    timeout: float = 30.0,
    sha256: str | None = None,
) -> Path:
    """Download (or import) an official archive into ``to_dir`` and return its path.

    An existing file that passes the checksum is kept as it is. A download writes
    ``<file>.part`` and resumes it with an HTTP Range request, both after a dropped connection
    (up to three attempts per call) and on the next call.

    Args:
        name: the archive's short name, a key of ``ARCHIVES`` (``hasy``, ``cub``).
        to_dir: the folder to save it in; created if missing (and removed again, with the
            parents made for it, if the fetch fails and leaves it empty).
        from_file: a local copy to import instead of downloading.
        url: a mirror to download from instead of the canonical location.
        verify: check the published checksum; False accepts any content (e.g. dev copies).
        progress: show a tqdm progress bar.
        timeout: seconds to wait on each network operation.
        sha256: a SHA-256 to verify with instead of the published checksum (the publishers
            give only an MD5; a SHA-256 from a trusted listing or an earlier fetch is stronger).

    Returns:
        The path of the archive inside ``to_dir``.

    Raises:
        ValueError: for an unknown name, both ``from_file`` and ``url``, a non-HTTP URL, or a
            ``sha256`` that is not 64 hex digits.
        FileNotFoundError: if ``from_file`` does not exist.
        FetchError: if the download fails; the message names the URL.
        ChecksumError: if the content differs from the published checksum.
    """
    spec = get_archive_spec(name)
    if sha256 is not None:
        if not verify:
            raise ValueError("a SHA-256 to check and --no-verify contradict each other")
        spec = dataclasses.replace(spec, sha256=_given_sha256(sha256))
    if Path(to_dir).exists() and not Path(to_dir).is_dir():
        raise ValueError(f"--to {to_dir}: is a file; the archive goes into a folder")
    created = _missing_folders(Path(to_dir))
    try:
        return _fetch(
            spec, Path(to_dir), from_file, url, verify, progress, timeout, sha256 is not None
        )
    except ChecksumError as error:
        if sha256 is None:
            raise
        hint = error.hint or "the file is corrupt, or it is not the one that SHA-256 belongs to"
        raise ChecksumError(
            error.source, error.algorithm, error.expected, error.actual, hint, given_by="--sha256"
        ) from None
    finally:
        _remove_if_empty(created)  # A failed fetch leaves no empty --to folder behind.


def _given_sha256(text: str) -> str:
    """A SHA-256 given on the command line, in the lower case the checks compare.

    Raises:
        ValueError: naming ``--sha256`` if it is not 64 hex digits.
    """
    digest = text.strip().lower()
    if not is_hex_digest(digest, "sha256"):
        raise ValueError(f"--sha256 {text!r}: a SHA-256 is 64 hex digits")
    return digest


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; stop at the first that isn't."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _fetch(
    spec: ArchiveSpec,
    to_dir: Path,
    from_file: str | Path | None,
    url: str | None,
    verify: bool,
    progress: bool,
    timeout: float,
    sha256_given: bool = False,
) -> Path:
    """:func:`fetch_archive` once ``spec`` is settled."""
    if from_file is not None and url is not None:
        raise ValueError("pass either from_file or url, not both")
    source_url = url or spec.url
    if urllib.parse.urlsplit(source_url).scheme not in ("http", "https"):
        raise ValueError(f"url must be http or https, got {source_url!r}")
    target_dir = Path(to_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    final_path = target_dir / spec.filename

    if from_file is not None:
        return _import_file(Path(from_file), final_path, spec, verify=verify)
    if final_path.exists():
        return _check_existing(final_path, spec, verify=verify)
    unverified_path = target_dir / f"{spec.filename}{_UNVERIFIED_SUFFIX}"
    if unverified_path.exists() and _accept_unverified(unverified_path, spec, verify=verify):
        return _move_into_place(unverified_path, final_path)

    part_path = target_dir / f"{spec.filename}.part"
    resumed = download(source_url, part_path, spec, progress=progress, timeout=timeout)
    if verify:
        _verify_download(part_path, spec, source_url, resumed=resumed, sha256_given=sha256_given)
    else:
        logger.warning("%s was not verified against its published checksum", spec.filename)
    return _move_into_place(part_path, final_path)


def _check_existing(final_path: Path, spec: ArchiveSpec, *, verify: bool) -> Path:
    """Return an archive already in place, checked first unless ``verify`` is False."""
    if verify:
        # A wrong file under the official name is left for the user to inspect, not replaced.
        verify_archive(
            final_path,
            spec,
            hint="delete it to download again, or use --no-verify to keep it",
        )
        logger.info("%s is already present and verified", final_path)
    else:
        logger.info("%s is already present (not verified)", final_path)
    return final_path


def _move_into_place(path: Path, final_path: Path) -> Path:
    """Rename a finished file to the archive's name, durably, and return the new path."""
    os.replace(path, final_path)
    fsync_directory(final_path.parent)
    logger.info("saved %s", final_path)
    return final_path


def _accept_unverified(path: Path, spec: ArchiveSpec, *, verify: bool) -> bool:
    """Whether an earlier download that failed its checksum can be used now; deleted if not.

    Args:
        path: the ``<file>.unverified`` an earlier run kept.
        spec: the archive, with the checksum to check now (perhaps a new ``--sha256``).
        verify: False accepts the file as it is.
    """
    if not verify:
        logger.warning("using %s, kept from an earlier download, without verifying it", path)
        return True
    try:
        verify_archive(path, spec)
    except ChecksumError as error:
        logger.warning(
            "%s does not match the checksum either (its %s is %s): deleting it and downloading "
            "the archive again",
            path,
            error.algorithm,
            error.actual,
        )
        path.unlink()
        return False
    logger.info("%s, kept from an earlier download, now passes the checksum", path)
    return True


def _verify_download(
    part_path: Path, spec: ArchiveSpec, source_url: str, *, resumed: bool, sha256_given: bool
) -> None:
    """Check a finished download; on a mismatch keep its bytes, unless it was resumed and
    checked against the publisher's checksum (a resumed download checked against a user's
    ``--sha256`` is kept too: the value may be mistyped, and a download of 1.1 GB is costly).

    Raises:
        ChecksumError: if the checksum differs; the message says where the bytes went and what
            to do next.
    """
    try:
        verify_archive(part_path, spec, source=f"{spec.filename} downloaded from {source_url}")
    except ChecksumError as error:
        if resumed and not sha256_given:
            # Bytes appended to an earlier .part may belong to another version of the file, and
            # checking them again could never succeed, so the next run starts afresh.
            part_path.unlink(missing_ok=True)
            hint = (
                "it was resumed from an earlier partial download, which makes corruption likely, "
                "so it is deleted; run again to download it afresh"
            )
        else:
            hint = _set_aside(part_path, spec, sha256_given=sha256_given)
        raise ChecksumError(
            error.source, error.algorithm, error.expected, error.actual, hint
        ) from None


def _set_aside(part_path: Path, spec: ArchiveSpec, *, sha256_given: bool) -> str:
    """Rename a whole download that failed its checksum to ``.unverified``; return the hint.

    Only the checksum may be wrong (a mistyped ``--sha256``), so the bytes are kept rather
    than downloaded again (1.1 GB for CUB).
    """
    unverified_path = part_path.with_name(f"{spec.filename}{_UNVERIFIED_SUFFIX}")
    os.replace(part_path, unverified_path)
    fsync_directory(unverified_path.parent)
    if sha256_given:
        cause = "the file is corrupt, or it is not the one that SHA-256 belongs to"
        action = "with the right --sha256 to check it, or with --no-verify to accept it"
    else:
        cause = "the file is corrupt or not the official archive"
        action = "with --no-verify to accept it, or with --sha256 to check a SHA-256 you trust"
    return (
        f"{cause}; the download is kept as {unverified_path}: run again {action} "
        "(a run it does not pass deletes it and downloads the archive again)"
    )


def _import_file(source: Path, final_path: Path, spec: ArchiveSpec, *, verify: bool) -> Path:
    """Copy a local archive into place through a temporary file, checking it on the way."""
    if not source.is_file():
        kind = "is a folder, not an archive file" if source.is_dir() else "not found"
        raise FileNotFoundError(f"archive to import {kind}: {source}")
    if final_path.exists() and source.resolve() == final_path.resolve():
        if verify:
            verify_archive(final_path, spec)
        return final_path
    if verify and final_path.exists():
        try:
            verify_archive(final_path, spec)
        except ChecksumError:
            logger.info("replacing %s, which does not match its checksum", final_path)
        else:
            logger.info("%s is already present and verified", final_path)
            return final_path

    algorithm, expected = spec.checksum
    digest = hashlib.new(algorithm)

    def copy(temporary: Path) -> None:
        with open(temporary, "wb") as output, open(source, "rb") as input_file:
            for chunk in iter(lambda: input_file.read(READ_BYTES), b""):
                digest.update(chunk)
                output.write(chunk)
        if verify and digest.hexdigest() != expected:
            raise ChecksumError(str(source), algorithm, expected, digest.hexdigest())

    # A temporary file, fsynced and renamed into place, with the usual (umask) file mode.
    write_atomically(final_path, copy)
    logger.info("imported %s as %s%s", source, final_path, "" if verify else " (not verified)")
    return final_path
