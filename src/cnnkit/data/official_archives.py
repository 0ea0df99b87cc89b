"""The official dataset archives (HASYv2, CUB-200-2011): where each lives and how to recognise
it by its published checksum."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cnnkit.data.download import FetchError

READ_BYTES = 1 << 20  # Of a local file, to checksum or copy it.
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


def is_hex_digest(digest: str, algorithm: str) -> bool:
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
            if digest is not None and not is_hex_digest(digest, algorithm):
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
        for chunk in iter(lambda: handle.read(READ_BYTES), b""):
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
