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
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cnnkit.atomic import fsync_directory, write_atomically
from cnnkit.data.download import FetchError, download

logger = logging.getLogger(__name__)

_READ_BYTES = 1 << 20  # Of a local file, to checksum or copy it.

_UNVERIFIED_SUFFIX = ".unverified"
_HEX_LENGTHS = {"sha256": 64, "md5": 32}


class ChecksumError(FetchError):
    """An archive's checksum differs from the published one.

    Attributes:
        source: the file or URL whose content was checked.
        algorithm: ``"sha256"`` or ``"md5"``.
        expected: the published hex digest.
        actual: the hex digest of the bytes received.
        hint: what the message suggests doing, where the default does not fit.
    """

    def __init__(
        self,
        source: str,
        algorithm: str,
        expected: str,
        actual: str,
        hint: str | None = None,
        given_by: str | None = None,
    ) -> None:
        if given_by is None:
            claim = f"expected {algorithm} {expected}, got {actual}"
        else:  # The user's checksum: the file is as likely at fault as the value given.
            claim = f"its {algorithm} is {actual}, not the {expected} given with {given_by}"
        super().__init__(
            f"checksum mismatch for {source}: {claim}; "
            + (hint or "the file is corrupt or not the official archive (--no-verify accepts it)")
        )
        self.source = source
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual
        self.hint = hint


def _is_hex_digest(digest: str, algorithm: str) -> bool:
    return re.fullmatch(f"[0-9a-f]{{{_HEX_LENGTHS[algorithm]}}}", digest) is not None


@dataclass(frozen=True)
class ArchiveSpec:
    """Where an official archive lives and how to recognise it.

    Attributes:
        name: the short name used on the command line (``hasy``, ``cub``).
        filename: the file name the archive is saved under.
        url: the canonical download location.
        sha256: the SHA-256 hex digest, or None where no authoritative one is published.
        size_bytes: the archive size, used for the progress bar; None if unknown.
        description: one line saying what the archive is.
        md5: the MD5 hex digest; used only where ``sha256`` is None.
    """

    name: str
    filename: str
    url: str
    sha256: str | None
    size_bytes: int | None
    description: str
    md5: str | None = None

    def __post_init__(self) -> None:
        if not self.filename or Path(self.filename).name != self.filename:
            raise ValueError(f"filename must be a bare file name, got {self.filename!r}")
        if self.sha256 is None and self.md5 is None:
            raise ValueError(f"archive {self.name!r} needs a sha256 or an md5 checksum")
        for algorithm in ("sha256", "md5"):
            digest = getattr(self, algorithm)
            if digest is not None and not _is_hex_digest(digest, algorithm):
                raise ValueError(f"{algorithm} of archive {self.name!r} is not a hex digest")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise ValueError(f"size_bytes must be positive, got {self.size_bytes}")

    @property
    def checksum(self) -> tuple[str, str]:
        """The ``(algorithm, hex digest)`` to verify with, SHA-256 where available."""
        if self.sha256 is not None:
            return "sha256", self.sha256
        return "md5", self.md5  # type: ignore[return-value]  # __post_init__ guarantees one


ARCHIVES: dict[str, ArchiveSpec] = {
    # Zenodo record 259444 (DOI 10.5281/zenodo.259444) publishes only an MD5 for this file; the
    # same MD5 is in the author's own loader (MartinThoma/HASY hasy_tools.py, md5_hash=...).
    "hasy": ArchiveSpec(
        name="hasy",
        filename="HASYv2.tar.bz2",
        url="https://zenodo.org/records/259444/files/HASYv2.tar.bz2?download=1",
        sha256=None,
        md5="fddf23f36e24b5236f6b3a0880c778e3",
        size_bytes=34_597_561,
        description="HASYv2: 168,233 handwritten symbols, 32x32, 369 classes (ODbL 1.0)",
    ),
    # CaltechDATA record 65de6-vp158 lists only an MD5; it is the MD5 long published with the
    # original vision.caltech.edu file (torchvision-style loaders use it as tgz_md5).
    "cub": ArchiveSpec(
        name="cub",
        filename="CUB_200_2011.tgz",
        url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
        sha256=None,
        md5="97eceeb196236b17998738112f37df78",
        size_bytes=1_150_585_339,
        description="CUB-200-2011: 11,788 bird photos of 200 species (research use)",
    ),
}


def get_archive_spec(name: str) -> ArchiveSpec:
    """Return the spec of the archive called ``name``.

    Raises:
        ValueError: if ``name`` is not a known archive; the message lists the choices.
    """
    if name not in ARCHIVES:
        choices = ", ".join(sorted(ARCHIVES))
        raise ValueError(f"unknown dataset archive {name!r}; choose one of: {choices}")
    return ARCHIVES[name]


def compute_checksum(path: str | Path, algorithm: str = "sha256") -> str:
    """Return the hex digest of a file, read in chunks.

    Args:
        path: the file to hash.
        algorithm: any name ``hashlib.new`` accepts, e.g. ``"sha256"`` or ``"md5"``.
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(
    path: str | Path, spec: ArchiveSpec, source: str | None = None, hint: str | None = None
) -> None:
    """Check a file against the spec's published checksum.

    Args:
        path: the file to check.
        spec: the archive it should be.
        source: how to name the file in an error; defaults to ``path``.
        hint: what the error should suggest doing; a default is used if None.

    Raises:
        ChecksumError: if the digests differ; the message names the file and both digests.
    """
    algorithm, expected = spec.checksum
    actual = compute_checksum(path, algorithm)
    if actual != expected:
        raise ChecksumError(source or str(path), algorithm, expected, actual, hint)


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
    if not _is_hex_digest(digest, "sha256"):
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
    """Check a finished download; on a mismatch keep its bytes unless it was resumed.

    Raises:
        ChecksumError: if the checksum differs; the message says where the bytes went and what
            to do next.
    """
    try:
        verify_archive(part_path, spec, source=f"{spec.filename} downloaded from {source_url}")
    except ChecksumError as error:
        if resumed:
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
            for chunk in iter(lambda: input_file.read(_READ_BYTES), b""):
                digest.update(chunk)
                output.write(chunk)
        if verify and digest.hexdigest() != expected:
            raise ChecksumError(str(source), algorithm, expected, digest.hexdigest())

    # A temporary file, fsynced and renamed into place, with the usual (umask) file mode.
    write_atomically(final_path, copy)
    logger.info("imported %s as %s%s", source, final_path, "" if verify else " (not verified)")
    return final_path
