"""A CSV of ``path,label`` rows (optional ``split``), with image paths relative to the CSV.

Also owns :func:`iter_csv_rows`, the strict CSV reader whose errors name the file and line.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from cnnkit.data.files import iter_file_bytes, read_regular_file
from cnnkit.data.folder import fingerprint_files
from cnnkit.data.source import DataFormatError, Listing, ReadError, SampleRecord

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


def decode_text(data: bytes, name: str) -> str:
    """Decode UTF-8 (a byte order mark is dropped).

    Raises:
        DataFormatError: naming ``name`` and the line of the first invalid byte.
    """
    # The BOM is dropped by hand: "utf-8-sig" would count error positions from after it.
    bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""
    try:
        return data[len(bom) :].decode("utf-8")
    except UnicodeDecodeError as error:
        start = len(bom) + error.start
        # Lines end at CR, LF or CRLF, as the csv reader counts them.
        line = len(data[: start + 1].splitlines())
        raise DataFormatError(
            f"{name}:{line}: not UTF-8 text (byte {data[start]:#04x}); save it as UTF-8"
        ) from error


def iter_csv_rows(
    data: bytes, name: str, columns: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[int, list[str | None]]]:
    """Read a CSV with a header row, tolerating a BOM, CRLF, quoted fields (after spaces too)
    and extra columns.

    Args:
        data: the raw file contents.
        name: the file name used in error messages.
        columns: required column names (matched case-insensitively, ignoring spaces).
        optional: columns returned as None where the header lacks them.

    Yields:
        ``(line, values)`` for each non-blank row: the row's first line number and its stripped
        values in the order ``columns + optional``.

    Raises:
        DataFormatError: for non-UTF-8 data, bad quoting, a missing column or a short row,
            naming ``name`` and the line.
    """
    # skipinitialspace: ``a.png, "cat"`` is the label cat, not '"cat"'. Values are stripped
    # anyway, so a path or label never starts or ends with a space, quoted or not.
    text = io.StringIO(decode_text(data, name), newline="")
    reader = csv.reader(text, strict=True, skipinitialspace=True)
    indices: list[int | None] = []
    line = 1
    try:
        for row in reader:
            if not any(field.strip() for field in row):
                line = reader.line_num + 1
                continue
            if not indices:
                header = [field.strip().lower() for field in row]
                missing = [column for column in columns if column not in header]
                if missing:
                    raise DataFormatError(
                        f"{name}:{line}: header lacks column(s) {', '.join(missing)}; "
                        f"expected {','.join(columns)}, found {','.join(row)}"
                    )
                wanted = [*columns, *optional]
                repeated = sorted({c for c in header if c in wanted and header.count(c) > 1})
                if repeated:
                    raise DataFormatError(
                        f"{name}:{line}: header repeats column(s) {', '.join(repeated)}"
                    )
                indices = [header.index(column) for column in columns]
                indices += [header.index(c) if c in header else None for c in optional]
                needed = max(index for index in indices if index is not None) + 1
            elif len(row) < needed:
                raise DataFormatError(
                    f"{name}:{line}: expected at least {needed} fields, found {len(row)}"
                )
            else:
                yield line, [None if i is None else row[i].strip() for i in indices]
            line = reader.line_num + 1
    except csv.Error as error:
        # The line the row starts on: an unclosed quote is only found at the end of the data.
        raise DataFormatError(f"{name}:{line}: malformed CSV ({error})") from error
    if not indices:
        raise DataFormatError(f"{name}:1: empty file; expected a header {','.join(columns)}")


class CsvSource:
    """Images listed in a CSV with columns ``path,label`` and optionally ``split``.

    Paths are relative to the CSV's folder (absolute paths must lie inside it, or inside the
    folder of the link it was named by); a path that escapes the folder is refused. Class names
    are the sorted unique labels. Repeated rows are dropped with a warning; one path with two
    labels is an error. Missing image files are reported by the cache with their CSV line.

    Args:
        csv_path: the CSV file.
    """

    def __init__(self, csv_path: str | Path) -> None:
        self.csv_path = Path(csv_path)
        self.root = self.csv_path.resolve().parent
        # An absolute path may name the folder through a symbolic link, as the user sees it.
        seen = self.csv_path.absolute().parent
        self._roots = [str(self.root), str(seen)]
        # A CSV file that is a link lies, as the user sees it, in the link's folder: another
        # folder, whose files are not under self.root where keys are read.
        self._other_root = None if seen.resolve() == self.root else str(seen)
        self._absent: frozenset[str] = frozenset()  # Missing when listed (list_samples).

    def _key(self, path: str, line: int) -> str:
        where = f"{self.csv_path}:{line}"
        if not path:
            raise DataFormatError(f"{where}: empty path")
        if "\0" in path:
            raise DataFormatError(f"{where}: path contains a NUL character")
        if "\\" in path and os.sep == "/" and not os.path.lexists(os.path.join(self.root, path)):
            path = path.replace("\\", "/")  # A CSV written on Windows: images\cat\1.png.
        full = os.path.normpath(os.path.join(self.root, path))
        for root in self._roots:
            if full != root and os.path.commonpath([full, root]) == root:
                # A file of the other folder keeps the full path it is named by, to be read there.
                key = full if root == self._other_root else os.path.relpath(full, root)
                return Path(key).as_posix()
        raise DataFormatError(
            f"{where}: path {path!r} is outside the dataset folder {self.root}; refused"
        )

    def file_of(self, path: str, line: int) -> Path:
        """The file that ``path`` on the CSV's ``line`` names, as :meth:`iter_bytes` reads it
        (a Windows path's backslashes and a linked CSV's folder taken into account).

        Raises:
            DataFormatError: for an empty path, or one outside the dataset folder.
        """
        return Path(self.root, self._key(path, line))

    def _read_rows(self, data: bytes) -> list[tuple[int, str, str, str | None]]:
        rows, seen, duplicates = [], {}, []
        rows_iter = iter_csv_rows(data, str(self.csv_path), ("path", "label"), ("split",))
        for line, (path, label, split) in rows_iter:
            key = self._key(path, line)
            if not label:
                raise DataFormatError(f"{self.csv_path}:{line}: empty label for {path!r}")
            if split is not None:
                split = split.lower() or None
                if split is not None and split not in SPLITS:
                    raise DataFormatError(
                        f"{self.csv_path}:{line}: split must be train or test; got {split!r}"
                    )
            if key in seen:
                first_line, first_label, first_split = seen[key]
                if (first_label, first_split) != (label, split):

                    def said(label: str, split: str | None, differ: bool) -> str:
                        # The splits are named where they differ ("no split": an empty cell).
                        return f'"{label}"' + (f" ({split or 'no split'})" if differ else "")

                    raise DataFormatError(
                        f'{self.csv_path}:{line}: "{path}" is listed as '
                        f"{said(label, split, first_split != split)} but line {first_line} says "
                        f"{said(first_label, first_split, first_split != split)}"
                    )
                duplicates.append(line)
                continue
            seen[key] = (line, label, split)
            rows.append((line, key, label, split))
        if duplicates:
            logger.warning(
                "%s: dropped %d repeated row(s), the first on line %d",
                self.csv_path,
                len(duplicates),
                duplicates[0],
            )
        with_split = [row for row in rows if row[3] is not None]
        if with_split and len(with_split) != len(rows):
            line = next(row[0] for row in rows if row[3] is None)
            raise DataFormatError(f"{self.csv_path}:{line}: empty split while other rows set one")
        return rows

    def list_samples(self) -> Listing:
        """Read the CSV.

        Raises:
            DataFormatError: for a malformed CSV or a refused path, naming file and line.
        """
        try:
            data = read_regular_file(self.csv_path)
        except OSError as error:
            raise DataFormatError(f"{self.csv_path}: cannot read ({error.strerror})") from error
        rows = self._read_rows(data)
        class_names = sorted({label for _, _, label, _ in rows})
        index = {name: label for label, name in enumerate(class_names)}
        origin = self.csv_path.name
        records = [
            SampleRecord(key, index[label], split, f"{origin}:{line}")
            for line, key, label, split in rows
        ]
        digest = hashlib.sha256(data).hexdigest()[:16]
        missing: set[str] = set()
        files = fingerprint_files(self.root, [record.key for record in records], missing)
        self._absent = frozenset(missing)
        return Listing(
            records,
            class_names,
            f"csv-{digest}-{files}",
            f"{self.csv_path.name} ({len(records):,} images, {len(class_names):,} classes)",
        )

    def iter_bytes(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes | ReadError]]:
        """Yield each file's bytes, a ReadError where it cannot be read; missing files are not."""
        yield from iter_file_bytes(self.root, keys, self._absent)
