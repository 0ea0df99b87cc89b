"""A folder with one subfolder of images per class; class names are the subfolder names."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cnnkit.data.files import iter_file_bytes
from cnnkit.data.image import IMAGE_SUFFIXES
from cnnkit.data.source import DataFormatError, Listing, ReadError, SampleRecord, encode_name

logger = logging.getLogger(__name__)

_SHOWN = 5

# Top-level folder names (in lower case) of a dataset split into folders of class folders.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def fingerprint_files(
    root: str | Path, keys: Iterable[str], missing: set[str] | None = None
) -> str:
    """Hash the relative path, size and modification time of each file under ``root``.

    Cheap (one ``stat`` per file) and changes whenever a file is added, removed or rewritten.
    The folder's location counts too: two copies with equal names, sizes and times (``cp -p``,
    an archive extracted twice) may hold different pixels. ``missing``, when given, receives
    the keys that could not be found: the hash records them as missing, so reading them may
    count them absent for good (see ``iter_file_bytes``).
    """
    digest = hashlib.sha256(encode_name(f"{Path(root).resolve()}\n"))
    for key in keys:
        try:
            stat = os.stat(os.path.join(root, key))
            digest.update(encode_name(f"{key}|{stat.st_size}|{stat.st_mtime_ns}\n"))
        except OSError:
            digest.update(encode_name(f"{key}|missing\n"))
            if missing is not None:
                missing.add(key)
    return digest.hexdigest()[:16]


def walk_images(class_dir: str, ignored: list[str], limit: int | None = None) -> list[str]:
    """Return the image paths under ``class_dir`` relative to it, recursively, sorted; with
    ``limit``, stop walking once that many are found (a sample, not the whole listing).

    Linked folders are followed, as a linked class folder is; each real folder is walked once,
    so a link to a folder above (a cycle) or to one already walked adds nothing.
    """
    found = []
    walked: set[str] = set()
    for current, folders, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(current)
        if real in walked:
            folders[:] = []
            continue
        walked.add(real)
        folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
        relative = os.path.relpath(current, class_dir)
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = name if relative == "." else os.path.join(relative, name)
            (found if is_image_name(name) else ignored).append(path)
        if limit is not None and len(found) >= limit:
            break
    return sorted(Path(path).as_posix() for path in found)[:limit]


def split_folders(root: Path) -> dict[str, str] | None:
    """``{folder name: split}`` where ``root`` is split into folders of class folders
    (``train/<class>/...`` beside ``test/<class>/...`` or ``val/<class>/...``): its folders
    are all named like splits, one of them ``train`` and another ``test`` or ``val``, each
    holds folders and no images of its own, and they share a class name. None for a plain
    folder of class folders (classes named ``train`` and ``test`` whose images sit in
    subfolders of other names stay classes).

    ``test/`` holds the test split; without one, ``val/`` does. With both, ``val/``'s images
    join ``train/``'s, from which the run draws its own validation share (``--val-fraction``).

    Raises:
        DataFormatError: for ``train/`` of class folders beside a ``test/`` (or ``val/``) of
            images with no class folders: unlabelled images, which no split can score; and
            for split folders that share their classes beside another folder (``predict/``),
            which would otherwise make every top-level folder a class.
    """
    every = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    others = sorted(e.name for e in every if e.name.lower() not in SPLIT_FOLDERS)
    folders = [e for e in every if e.name not in others]
    kinds = {folder.name: SPLIT_FOLDERS[folder.name.lower()] for folder in folders}
    found = set(kinds.values())
    if "train" not in found or not found & {"test", "val"}:
        return None
    classes, loose = {}, []
    for folder in folders:
        inside = [e for e in os.scandir(folder.path) if not e.name.startswith(".")]
        classes[folder.name] = {e.name for e in inside if e.is_dir()}
        if any(not e.is_dir() and is_image_name(e.name) for e in inside):
            loose.append(folder.name)
    trains = [name for name in folders_of(kinds, "train") if name not in loose]
    unlabelled = [name for name in loose if kinds[name] != "train" and not classes[name]]
    if unlabelled and trains and all(classes[name] for name in trains):
        raise DataFormatError(
            f"{root}: {trains[0]}/ holds class folders, and {unlabelled[0]}/ images without "
            f"any (unlabelled, so they cannot be scored); pass --data {root / trains[0]}, whose "
            "test split is then drawn from it"
        )
    names = list(classes.values())
    if loose or not all(names) or not set.intersection(*names):
        return None
    if others:
        splits = ", ".join(f"{name}/" for name in sorted(kinds))
        raise DataFormatError(
            f"{root}: {splits} hold the same class folders, but {others[0]}/ beside them is no "
            f"split folder (train/, val/ or test/); move it out of {root}, or pass --data "
            f"{root / trains[0]} to train on {trains[0]}/ alone"
        )
    held_out = "test" if "test" in found else "val"
    return {name: "test" if kind == held_out else "train" for name, kind in kinds.items()}


def folders_of(kinds: dict[str, str | None], split: str) -> list[str]:
    """The folder names of ``kinds`` (folder name: split) that hold ``split``, sorted."""
    return sorted(name for name, kind in kinds.items() if kind == split)


class FolderSource:
    """``root/<class name>/**/<image>``: every image under a class folder, recursively; or
    ``root/train/<class name>/**/<image>`` beside ``root/test/...`` (or ``val/``), whose
    split the run then keeps (see :func:`split_folders`).

    Class names are the subfolder names in sorted order; keys are paths relative to ``root``.
    Files without an image extension and hidden files are skipped (the former with a warning);
    files with an image extension are always listed, so corrupt ones are reported by the cache.

    Args:
        root: the dataset folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        # Images gone when listed (a link to a deleted file): see list_samples.
        self._absent: frozenset[str] = frozenset()

    def list_samples(self) -> Listing:
        """Walk the class folders.

        Raises:
            DataFormatError: if ``root`` is not a folder, has no class folders, or a class
                folder holds no images.
        """
        if not self.root.is_dir():
            problem = "not a folder" if self.root.exists() else "no such folder"
            raise DataFormatError(f"{self.root}: {problem}")
        splits = split_folders(self.root)
        # (prefix of the keys, split) of each folder of class folders.
        parts = sorted(splits.items()) if splits else [("", None)]
        class_folders = {prefix: self._class_folders(prefix) for prefix, _ in parts}
        class_names = sorted({name for names in class_folders.values() for name in names})
        if not class_names:
            raise DataFormatError(
                f"{self.root}: no class folders; expected one subfolder of images per class"
            )
        index = {name: label for label, name in enumerate(class_names)}
        records: list[SampleRecord] = []
        ignored: list[str] = []
        empty: list[str] = []
        for prefix, split in parts:
            for name in class_folders[prefix]:
                where = f"{prefix}/{name}" if prefix else name
                class_ignored: list[str] = []
                images = walk_images(os.path.join(self.root, where), class_ignored)
                ignored += [f"{where}/{path}" for path in class_ignored]
                if not images:
                    empty.append(where)
                records += [
                    SampleRecord(f"{where}/{path}", index[name], split, str(self.root))
                    for path in images
                ]
        if ignored:
            logger.warning(
                "%s: ignored %d file(s) without an image extension, such as %s",
                self.root,
                len(ignored),
                ", ".join(ignored[:_SHOWN]),
            )
        if empty:
            raise DataFormatError(
                f"{self.root}: class folder(s) with no images: {', '.join(empty)} "
                "(a class needs images to be trained; remove the folder or add images)"
            )
        # A listed image that is gone (a dangling link) is recorded as missing in the
        # fingerprint, so the cache may remember it as absent, as a CSV's missing file is.
        missing: set[str] = set()
        fingerprint = fingerprint_files(self.root, (record.key for record in records), missing)
        self._absent = frozenset(missing)
        split_by = ""
        if splits:
            test, train = (
                ", ".join(f"{n}/" for n in folders_of(splits, s)) for s in ("test", "train")
            )
            split_by = f"; test split: {test}; training split: {train}"
        return Listing(
            records,
            class_names,
            f"folder-{fingerprint}",
            f"{self.root.name or self.root} "
            f"({len(records):,} images, {len(class_names):,} classes{split_by})",
        )

    def _class_folders(self, prefix: str) -> list[str]:
        """The class folder names in ``root/prefix``, sorted; files beside them are ignored,
        with a warning."""
        folder = self.root / prefix if prefix else self.root
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        stray = [e.name for e in entries if not e.is_dir() and not e.name.startswith(".")]
        if stray:
            logger.warning(
                "%s: ignored %d file(s) outside the class folders, such as %s",
                folder,
                len(stray),
                ", ".join(stray[:_SHOWN]),
            )
        return [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]

    def iter_bytes(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes | ReadError]]:
        """Yield each file's bytes, a ReadError where it cannot be read; missing files are not."""
        yield from iter_file_bytes(self.root, keys, self._absent)
