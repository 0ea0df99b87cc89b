"""HASYv2 handwritten symbols, read from the official archive (streamed) or an extracted folder."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
from collections.abc import Iterator, Sequence
from pathlib import Path

from cnnkit.data.archive import DatasetFiles, parse_integer, relative_key
from cnnkit.data.csv_source import iter_csv_rows
from cnnkit.data.folder import fingerprint_files
from cnnkit.data.source import DataFormatError, Listing, ReadError, SampleRecord, encode_name

logger = logging.getLogger(__name__)

LABELS_FILE = "hasy-data-labels.csv"
SYMBOLS_FILE = "symbols.csv"


def _symbols_with_images(
    class_names: list[str], records: list[SampleRecord], listed_in: str
) -> tuple[list[str], list[SampleRecord]]:
    """The classes that have images, and the records labelled among them: a symbol that
    ``symbols.csv`` lists with no image in ``listed_in`` (the labels file, or a fold's files)
    is left out, as no split could hold it (a trimmed copy of the data)."""
    used = sorted({record.label for record in records})
    if len(used) == len(class_names):
        return class_names, records
    dense = {label: index for index, label in enumerate(used)}
    unused = [name for label, name in enumerate(class_names) if label not in dense]
    logger.warning(
        "%s lists %d symbol(s) with no image in %s, left out: %s",
        SYMBOLS_FILE,
        len(unused),
        listed_in,
        ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""),
    )
    relabelled = [dataclasses.replace(record, label=dense[record.label]) for record in records]
    return [class_names[label] for label in used], relabelled


def _parse_symbols(data: bytes, name: str) -> tuple[list[str], dict[int, int]]:
    """Return the class names in symbol_id order and the label of each symbol_id."""
    rows = []
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for line, (symbol_id, latex) in iter_csv_rows(data, name, ("symbol_id", "latex")):
        number = parse_integer(symbol_id, name, line, "symbol_id")
        if not latex:
            raise DataFormatError(f"{name}:{line}: empty latex for symbol_id {symbol_id}")
        if number in seen_ids or latex in seen_names:
            raise DataFormatError(f"{name}:{line}: symbol {symbol_id} {latex!r} is listed twice")
        seen_ids.add(number)
        seen_names.add(latex)
        rows.append((number, latex))
    if not rows:
        raise DataFormatError(f"{name}:2: no symbols listed")
    rows.sort()
    labels = {number: label for label, (number, _) in enumerate(rows)}
    return [latex for _, latex in rows], labels


def _fold_key(path: str, folder: str) -> str:
    # The official paths all read "../../hasy-data/..."; that case skips normpath.
    if path.startswith("../../") and "./" not in path[6:]:
        return path[6:]
    return posixpath.normpath(posixpath.join(folder, path))


class HasySource:
    """HASYv2: ``hasy-data-labels.csv`` plus ``symbols.csv``, optionally one fold's split.

    ``path`` is the ``HASYv2.tar.bz2`` archive, streamed without extracting, or an extracted
    folder (with or without one top-level folder). Class names are the LaTeX commands of
    ``symbols.csv`` in ascending ``symbol_id`` order. With ``fold=K`` each record's split comes
    from ``classification-task/fold-K/{train,test}.csv`` and images in neither are left out.
    The fingerprint ignores the fold, so every fold shares one decoded cache.

    The labels CSV is the archive's last member, so listing decompresses the whole archive once;
    the images met on the way are kept in memory and :meth:`iter_bytes` serves them from there.

    Args:
        path: the archive or folder.
        fold: the official fold (1-10), or None for no official split.
    """

    def __init__(self, path: str | Path, fold: int | None = None) -> None:
        if fold is not None and fold < 1:
            raise ValueError(f"fold must be >= 1; got {fold}")
        self.path = Path(path)
        self.fold = fold
        self._files = DatasetFiles(path, LABELS_FILE)
        self._listing: Listing | None = None

    def _fold_file(self, split: str) -> str:
        return f"classification-task/fold-{self.fold}/{split}.csv"

    def _fold_splits(self, files: dict[str, bytes], labels: dict[str, int]) -> dict[str, str]:
        splits: dict[str, str] = {}
        for split in ("train", "test"):
            file = self._fold_file(split)
            folder = posixpath.dirname(file)
            for line, (path,) in iter_csv_rows(files[file], file, ("path",)):
                key = _fold_key(path or "", folder)
                if key not in labels:
                    raise DataFormatError(f"{file}:{line}: {path!r} is not in {LABELS_FILE}")
                if key in splits:
                    raise DataFormatError(f"{file}:{line}: {path!r} is listed twice in the fold")
                splits[key] = split
        return splits

    def _read_labels(
        self, data: bytes, class_names: list[str], label_of_symbol: dict[int, int]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Return the label and the CSV line of each image key."""
        labels: dict[str, int] = {}
        lines: dict[str, int] = {}
        columns = ("path", "symbol_id", "latex")
        for line, (path, symbol_id, latex) in iter_csv_rows(data, LABELS_FILE, columns):
            key = relative_key(path or "", LABELS_FILE, line)
            label = label_of_symbol.get(parse_integer(symbol_id, LABELS_FILE, line, "symbol_id"))
            if label is None:
                raise DataFormatError(
                    f"{LABELS_FILE}:{line}: symbol_id {symbol_id} is not in {SYMBOLS_FILE}"
                )
            if latex != class_names[label]:
                raise DataFormatError(
                    f"{LABELS_FILE}:{line}: latex {latex!r} disagrees with {SYMBOLS_FILE} "
                    f"({class_names[label]!r} for symbol_id {symbol_id})"
                )
            if key in labels:
                raise DataFormatError(f"{LABELS_FILE}:{line}: {path!r} is listed twice")
            labels[key] = label
            lines[key] = line
        return labels, lines

    def _build_listing(self) -> Listing:
        required = [LABELS_FILE, SYMBOLS_FILE]
        if self.fold is not None:
            required += [self._fold_file(split) for split in ("train", "test")]
        files = self._files.read_metadata(required)
        class_names, label_of_symbol = _parse_symbols(files[SYMBOLS_FILE], SYMBOLS_FILE)
        labels, lines = self._read_labels(files[LABELS_FILE], class_names, label_of_symbol)
        splits = self._fold_splits(files, labels) if self.fold is not None else None
        records = [
            SampleRecord(key, label, splits[key] if splits else None, f"{LABELS_FILE}:{lines[key]}")
            for key, label in labels.items()
            if splits is None or key in splits
        ]
        listed_in = LABELS_FILE if self.fold is None else f"fold {self.fold}'s files"
        class_names, records = _symbols_with_images(class_names, records, listed_in)
        digest = hashlib.sha256(encode_name(f"{self._files.identity()}|{len(labels)}|"))
        digest.update(files[LABELS_FILE] + b"\0" + files[SYMBOLS_FILE])
        if self._files.folder is not None:
            # A stat per image (about 0.3 s for all of HASYv2): an image rewritten in place
            # leaves its folder's time as it was, and a missing one is reported as missing.
            missing: set[str] = set()
            keys = (record.key for record in records)
            digest.update(fingerprint_files(self._files.folder, keys, missing).encode())
            self._files.absent = frozenset(missing)
        fold = f", fold {self.fold}" if self.fold is not None else ""
        return Listing(
            records,
            class_names,
            f"hasy-{digest.hexdigest()[:16]}",
            f"HASYv2 ({len(records):,} images, {len(class_names):,} classes{fold})",
        )

    def cache_token(self) -> str | None:
        """A string that changes whenever :meth:`list_samples` would, found without reading.

        For an archive: its path, size and time plus the fold. A caller may keep the listing
        under this token, since listing an archive whose labels come last decompresses it all.
        None for a folder, whose listing is cheap.
        """
        token = self._files.archive_token()
        # "listing 2": symbols without images are left out; listings kept before are not used.
        return None if token is None else f"hasy listing 2|{token}|fold={self.fold}"

    def list_samples(self) -> Listing:
        """Read the CSVs; the result is kept on the instance.

        Raises:
            DataFormatError: for a missing CSV or a malformed row, naming file and line.
        """
        if self._listing is None:
            self._listing = self._build_listing()
        listing = self._listing
        return Listing(
            list(listing.records),
            list(listing.class_names),
            listing.fingerprint,
            listing.description,
        )

    def iter_bytes(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes | ReadError]]:
        """Yield the PNG bytes of ``keys``; keys absent from an archive are not yielded."""
        if self._listing is None:
            self.list_samples()
        yield from self._files.iter_bytes(keys)
