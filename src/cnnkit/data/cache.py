"""Decode a source's images once, in parallel, into a memory-mapped uint8 array on disk.

The cache key covers the source fingerprint, the sample keys and the preprocessing, so a change
in any of them decodes again. Entries are written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnkit.atomic import current_umask
from cnnkit.config import Preprocessing
from cnnkit.data.image import BadImageError, decode_image
from cnnkit.data.prepare import prepare_image
from cnnkit.data.source import Listing, ReadError, Source, encode_name
from cnnkit.data.workers import map_unordered
from cnnkit.progress import bar_disabled

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs each decode
    fcntl = None

logger = logging.getLogger(__name__)
# 2: 16-bit images span 0-65535; float images in 0-1 are scaled by 255. 3: colour-key
# transparency goes onto white, EXIF orientation applies to symbols too, "I" spans 0-65535.
CACHE_FORMAT = 3
_CHUNK = 256


@dataclass
class DecodedImages:
    """Decoded images in listing order.

    Attributes:
        images: ``uint8`` ``[N, S, S, C]``; rows of bad images are zero.
        valid: ``bool`` ``[N]``, False where the image could not be decoded.
        problems: one message per bad image, naming its path and the problem.
        from_cache: whether the array was read from an existing cache entry.
        unreadable: files that are there but could not be read for a reason that may pass
            (an I/O error, a permission), as opposed to missing files, paths that are no
            regular files and files read but not decodable; see ``ReadError.lasting``.
    """

    images: np.ndarray
    valid: np.ndarray
    problems: list[str]
    from_cache: bool
    unreadable: int = 0


def cache_key(listing: Listing, preprocessing: Preprocessing) -> str:
    """Hash of everything that decides the decoded array's contents."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_FORMAT}|{listing.fingerprint}|".encode())
    digest.update(json.dumps(asdict(preprocessing), sort_keys=True).encode())
    for record in listing.records:
        digest.update(encode_name(f"{record.key}|{record.box}"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _display(record) -> str:
    return f"{record.key} ({record.origin})" if record.origin else record.key


def _decode_chunk(args: tuple[list[tuple], Preprocessing]):
    items, preprocessing = args
    results = []
    for index, name, data, box in items:
        if isinstance(data, ReadError):
            problem = f"{name}: cannot read ({data.reason})"
            results.append((index, None, problem, not data.lasting))
            continue
        try:
            image = decode_image(data, name)
            if box is not None:
                image = image.crop(_box_inside(box, image.size, name))
            try:
                results.append((index, prepare_image(image, preprocessing), None, False))
            except BadImageError as error:
                raise BadImageError(f"{name}: {error}") from error
        except BadImageError as error:
            results.append((index, None, str(error), False))
    return results


def _box_inside(
    box: tuple[float, float, float, float], size: tuple[int, int], name: str
) -> tuple[int, int, int, int]:
    """The pixel box ``(left, top, right, bottom)`` of a ``(x, y, width, height)`` bounding box,
    clipped to the image; one that is mostly outside it is an error, not a black crop."""
    x, y, width, height = box
    left, top = max(0, round(x)), max(0, round(y))
    right, bottom = min(size[0], round(x + width)), min(size[1], round(y + height))
    inside = max(0, right - left) * max(0, bottom - top)
    if inside == 0 or inside < 0.5 * width * height:
        raise BadImageError(
            f"{name}: the bounding box (x {x:g}, y {y:g}, {width:g} x {height:g}) lies mostly "
            f"outside the {size[0]}x{size[1]} image"
        )
    return left, top, right, bottom


def _chunks(
    stream: Iterable[tuple[str, bytes | ReadError]],
    listing: Listing,
    positions: dict[str, list[int]],
) -> Iterator[list[tuple]]:
    chunk: list[tuple] = []
    for key, data in stream:
        for index in positions.get(key, ()):
            record = listing.records[index]
            chunk.append((index, _display(record), data, record.box))
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode_all(
    source: Source,
    listing: Listing,
    preprocessing: Preprocessing,
    workers: int,
    progress: bool,
) -> DecodedImages:
    size, channels = preprocessing.stored_size, preprocessing.channels
    count = len(listing.records)
    images = np.zeros((count, size, size, channels), dtype=np.uint8)
    valid = np.zeros(count, dtype=bool)
    problems: dict[int, str] = {}
    positions: dict[str, list[int]] = {}
    for index, record in enumerate(listing.records):
        positions.setdefault(record.key, []).append(index)
    seen: set[int] = set()
    unreadable = 0
    stream = source.iter_bytes(list(positions))
    jobs = ((chunk, preprocessing) for chunk in _chunks(stream, listing, positions))
    bar = tqdm(total=count, desc="decoding images", unit="img", disable=bar_disabled(progress))
    if workers > 1:
        results = map_unordered(_decode_chunk, jobs, workers)
    else:
        results = (_decode_chunk(job) for job in jobs)
    # Closing stops the workers at once on Ctrl-C, kill or an error, not after the queue.
    with bar, contextlib.closing(results):
        for chunk_results in results:
            for index, array, problem, passing in chunk_results:
                seen.add(index)
                unreadable += passing
                if array is None:
                    problems[index] = problem
                else:
                    images[index] = array
                    valid[index] = True
            bar.update(len(chunk_results))
    for index in set(range(count)) - seen:
        problems[index] = f"{_display(listing.records[index])}: file not found in the source"
    return DecodedImages(images, valid, [problems[i] for i in sorted(problems)], False, unreadable)


def load_images(
    source: Source,
    listing: Listing,
    preprocessing: Preprocessing,
    cache_dir: str | Path | None,
    workers: int | None = None,
    progress: bool = False,
) -> DecodedImages:
    """Return the decoded images of ``listing``, from the cache when possible.

    Args:
        source: streams the encoded bytes.
        listing: the samples, in the order of the returned array.
        preprocessing: decides the stored size and channels.
        cache_dir: root of the cache; ``None`` decodes without caching.
        workers: decoding processes (default: all cores).
        progress: show a progress bar.
    """
    workers = workers or os.cpu_count() or 1
    if cache_dir is None:
        return _decode_all(source, listing, preprocessing, workers, progress)
    entry = Path(cache_dir) / cache_key(listing, preprocessing)
    size = preprocessing.stored_size
    shape = (len(listing.records), size, size, preprocessing.channels)
    cached = _read_entry(entry, shape, warn=False)  # Read again, and reported, under the lock.
    if cached is not None:
        return cached
    # Two runs on the same data (a search's workers, two terminals) would both decode and then
    # race to rename their entries into place; the second waits here and reads the first's.
    with _entry_lock(entry) as held:
        cached = _read_entry(entry, shape)
        if cached is not None:
            return cached
        if held:
            _remove_abandoned_staging(entry)
        decoded = _decode_all(source, listing, preprocessing, workers, progress)
        if decoded.unreadable:
            # A read can fail for a moment (a network share, a file being copied); a cache
            # entry would keep that failure until the files change, so none is written.
            logger.warning(
                "%d file(s) could not be read; the decoded images are not cached, so the next "
                "run reads them again",
                decoded.unreadable,
            )
            return decoded
        if not _write_entry(entry, listing, preprocessing, decoded):
            return decoded
    images = np.load(entry / "images.npy", mmap_mode="r")
    return DecodedImages(images, decoded.valid, decoded.problems, False)


def _read_entry(entry: Path, shape: tuple[int, ...], warn: bool = True) -> DecodedImages | None:
    """The cache entry's images (memory-mapped), or None if it is absent, unreadable or not of
    ``shape`` (``[N, S, S, C]`` for the listing and preprocessing it is keyed by), with a
    warning when ``warn``: the images are then decoded again."""
    images_path, meta_path = entry / "images.npy", entry / "meta.json"
    try:
        if not (images_path.exists() and meta_path.exists()):
            return None
        meta = json.loads(meta_path.read_text())
        images = np.load(images_path, mmap_mode="r")
        if images.shape != shape or images.dtype != np.uint8:
            raise ValueError(f"holds {images.dtype} images of shape {images.shape}, not {shape}")
        valid = np.zeros(len(images), dtype=bool)
        valid[_image_indices(meta["valid"], len(images))] = True
        problems = meta["problems"]
        if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
            raise ValueError("its problems are not a list of texts")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        if warn:
            logger.warning("ignoring unreadable cache entry %s: %s", entry, error)
        return None
    logger.info("loaded %d decoded images from cache %s", len(images), entry)
    return DecodedImages(images, valid, problems, True)


def _image_indices(indices: object, count: int) -> np.ndarray:
    """A cache entry's list of valid images as an index array, checked: whole numbers from 0
    to ``count - 1`` (a negative one would count from the end, and mark the wrong image).

    Raises:
        ValueError: for anything else.
    """
    # type() is int: JSON's true and false are Python bools, which are ints too.
    if not isinstance(indices, list) or not all(type(i) is int for i in indices):
        raise ValueError("its valid images are not a list of image numbers")
    if indices and (min(indices) < 0 or max(indices) >= count):  # Before numpy: 10**20 fits.
        raise ValueError(f"its valid images are not all numbers from 0 to {count - 1}")
    return np.asarray(indices, dtype=np.int64)


def _write_entry(
    entry: Path, listing: Listing, preprocessing: Preprocessing, decoded: DecodedImages
) -> bool:
    """Write ``decoded`` to a staging folder and rename it to ``entry``; False on a write
    failure. An interrupt removes the staging folder and propagates."""
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        np.save(staging / "images.npy", decoded.images)
        meta = {
            "description": listing.description,
            "preprocessing": asdict(preprocessing),
            "count": len(decoded.images),
            "valid": np.flatnonzero(decoded.valid).tolist(),
            "problems": decoded.problems,
        }
        (staging / "meta.json").write_text(json.dumps(meta))
        # mkdtemp makes the folder private (0700); a cache folder others share must let them
        # read what this run decoded, as any file written under the umask would.
        umask = current_umask()
        os.chmod(staging, 0o777 & ~umask)
        for path in staging.iterdir():
            os.chmod(path, 0o666 & ~umask)
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(staging, entry)
    except BaseException as error:  # Ctrl-C and kill too: no hidden staging folder stays.
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(error, OSError):
            raise
        logger.warning("could not write the image cache %s: %s", entry, error)
        return False
    return True


def _remove_abandoned_staging(entry: Path) -> None:
    """Remove the staging folders of ``entry`` that a process killed while writing it left
    (``kill -9``, a power cut: Ctrl-C removes its own). Only the holder of the entry's lock
    writes one, so while it is held any other is abandoned."""
    for leftover in entry.parent.glob(f".{glob.escape(entry.name)}-*"):
        # mkdtemp's names: the prefix and 8 random characters.
        mine = len(leftover.name) == len(entry.name) + 10
        if mine and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
            logger.info("removed %s, left by a run stopped while writing it", leftover)


@contextlib.contextmanager
def _entry_lock(entry: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``entry`` across processes (where the OS and folder allow);
    yields whether it is held."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle = open(entry.parent / f".{entry.name}.lock", "a+b")  # noqa: SIM115
    except OSError:
        yield False
        return
    with handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process to finish decoding into %s", entry)
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield fcntl is not None
