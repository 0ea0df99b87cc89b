"""The decoded-image cache: hits, what changes its key, and bad images kept in its metadata."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import non_utf8_path, subprocess_env

from cnnkit.config import Preprocessing
from cnnkit.data.cache import cache_key, load_images
from cnnkit.data.folder import FolderSource
from cnnkit.data.listings import limit_listing, list_samples_cached
from cnnkit.data.source import Listing, ReadError, SampleRecord
from cnnkit.data.workers import map_unordered

RGB = Preprocessing(channels=3, mean=(0, 0, 0), std=(1, 1, 1))


def write_dataset(root: Path) -> Path:
    """Two classes of three small images each; one image of ``b`` is corrupt."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(3):
            pixels = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    (root / "b" / "2.png").write_bytes(b"corrupt")
    return root


@pytest.fixture
def dataset(tmp_path) -> FolderSource:
    return FolderSource(write_dataset(tmp_path / "data"))


def test_second_load_comes_from_the_cache_with_equal_contents(tmp_path, dataset):
    listing = dataset.list_samples()
    first = load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=2)
    second = load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=1)
    assert (first.from_cache, second.from_cache) == (False, True)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.valid, second.valid)
    assert first.problems == second.problems
    assert len(second.problems) == 1 and "b/2.png" in second.problems[0]
    assert isinstance(second.images, np.memmap)
    uncached = load_images(dataset, listing, Preprocessing(), None, workers=1)
    np.testing.assert_array_equal(uncached.images, second.images)


def test_preprocessing_changes_the_key_and_the_arrays(tmp_path, dataset):
    listing = dataset.list_samples()
    gray = load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=1)
    color = load_images(dataset, listing, RGB, tmp_path / "cache", workers=1)
    assert cache_key(listing, Preprocessing()) != cache_key(listing, RGB)
    assert not color.from_cache
    assert (gray.images.shape[-1], color.images.shape[-1]) == (1, 3)


def test_listing_changes_change_the_key(dataset):
    listing = dataset.list_samples()
    key = cache_key(listing, Preprocessing())
    assert cache_key(dataset.list_samples(), Preprocessing()) == key
    changed = [
        limit_listing(listing, max_classes=1, max_per_class=None),
        Listing(listing.records[:-1], listing.class_names, listing.fingerprint),
        Listing(listing.records[::-1], listing.class_names, listing.fingerprint),
        Listing(listing.records, listing.class_names, listing.fingerprint + "x"),
        Listing(
            [dataclasses.replace(listing.records[0], box=(0, 0, 2, 2)), *listing.records[1:]],
            listing.class_names,
            listing.fingerprint,
        ),
    ]
    assert len({cache_key(other, Preprocessing()) for other in changed} | {key}) == 6


def test_rewritten_file_misses_the_cache(tmp_path, dataset):
    listing = dataset.list_samples()
    load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=1)
    Image.new("RGB", (5, 5), (255, 255, 255)).save(dataset.root / "b" / "2.png")
    fixed_listing = dataset.list_samples()
    fixed = load_images(dataset, fixed_listing, Preprocessing(), tmp_path / "cache", workers=1)
    assert not fixed.from_cache
    assert fixed.problems == [] and fixed.valid.all()
    assert fixed.images[-1].min() == 255


def _edit_meta(entry: Path, edit) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps(edit(meta)))


CORRUPTIONS = {
    "meta.json not JSON": lambda entry: (entry / "meta.json").write_text("{not json"),
    "meta.json a list": lambda entry: (entry / "meta.json").write_text("[1]"),
    "no problems key": lambda entry: _edit_meta(
        entry, lambda meta: {k: v for k, v in meta.items() if k != "problems"}
    ),
    "an index past the images": lambda entry: _edit_meta(
        entry, lambda meta: {**meta, "valid": [*meta["valid"], 999]}
    ),
    "a negative index": lambda entry: _edit_meta(
        entry, lambda meta: {**meta, "valid": [-1, *meta["valid"][1:]]}
    ),
    "an index that is text": lambda entry: _edit_meta(
        entry, lambda meta: {**meta, "valid": ["0", *meta["valid"][1:]]}
    ),
    "an index past any integer type": lambda entry: _edit_meta(
        entry, lambda meta: {**meta, "valid": [10**20, *meta["valid"][1:]]}
    ),
    "an index that is true": lambda entry: _edit_meta(
        entry, lambda meta: {**meta, "valid": [True, *meta["valid"][1:]]}
    ),
    "problems as text": lambda entry: _edit_meta(entry, lambda meta: {**meta, "problems": "oops"}),
    "fewer images": lambda entry: np.save(entry / "images.npy", np.load(entry / "images.npy")[:3]),
    "images of another size": lambda entry: np.save(
        entry / "images.npy", np.zeros((5, 8, 8, 1), np.uint8)
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_unreadable_cache_entry_is_decoded_again(tmp_path, dataset, caplog, corruption):
    """Whatever is wrong with an entry (it was edited, or another version wrote it), it is
    named in a warning and decoded again: never a traceback, never wrong images used."""
    listing = dataset.list_samples()
    load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=1)
    entry = tmp_path / "cache" / cache_key(listing, Preprocessing())
    CORRUPTIONS[corruption](entry)
    with caplog.at_level(logging.WARNING, logger="cnnkit.data.cache"):
        again = load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=1)
    assert not again.from_cache and again.valid.sum() == 5
    assert again.images.shape[1:] == (Preprocessing().stored_size,) * 2 + (1,)
    warnings = [
        r.getMessage() for r in caplog.records if "unreadable cache entry" in r.getMessage()
    ]
    assert len(warnings) == 1 and entry.name in warnings[0]
    # The entry was rewritten: the next load reads it, quietly.
    caplog.clear()
    assert load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=1).from_cache
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cache_entries_follow_the_umask_so_a_shared_cache_serves_others(tmp_path, dataset):
    listing = dataset.list_samples()
    old = os.umask(0o022)
    try:
        load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=1)
    finally:
        os.umask(old)
    entry = tmp_path / "cache" / cache_key(listing, Preprocessing())
    assert entry.stat().st_mode & 0o777 == 0o755
    assert {path.stat().st_mode & 0o777 for path in entry.iterdir()} == {0o644}


def test_an_unwritable_cache_location_still_loads_the_images(tmp_path, dataset, caplog):
    listing = dataset.list_samples()
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with caplog.at_level(logging.WARNING, logger="cnnkit.data.cache"):
        loaded = load_images(dataset, listing, Preprocessing(), not_a_folder, workers=1)
    assert loaded.valid.sum() == 5 and not loaded.from_cache
    assert any("could not write the image cache" in r.getMessage() for r in caplog.records)


def test_two_copies_of_a_folder_with_equal_names_sizes_and_times_do_not_share_an_entry(
    tmp_path,
):
    """``cp -p`` or an archive extracted twice: same names, sizes and times, other pixels."""
    roots = []
    for name, shade in (("white", 255), ("black", 0)):
        root = tmp_path / name
        (root / "a").mkdir(parents=True)
        path = root / "a" / "0.bmp"
        Image.new("L", (4, 4), shade).save(path)
        os.utime(path, ns=(10**18, 10**18))
        roots.append(FolderSource(root))
    loads = [
        load_images(source, source.list_samples(), Preprocessing(), tmp_path / "cache")
        for source in roots
    ]
    assert [load.from_cache for load in loads] == [False, False]
    assert [int(load.images.max()) for load in loads] == [255, 0]


def test_a_file_name_that_is_not_utf8_is_decoded_and_cached(tmp_path):
    root = write_dataset(tmp_path / "data")
    renamed = non_utf8_path(root / "a", b"caf\xe9.png")
    (root / "a" / "0.png").rename(renamed)
    source = FolderSource(root)
    listing = source.list_samples()
    assert listing.records[2].key == "a/caf\udce9.png"
    first = load_images(source, listing, Preprocessing(), tmp_path / "cache", workers=1)
    second = load_images(source, listing, Preprocessing(), tmp_path / "cache", workers=1)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.valid.tolist() == [True] * 5 + [False]
    np.testing.assert_array_equal(first.images, second.images)


class _ListedOnce:
    """A source with a listing cache token whose one key came from a non-UTF-8 file name."""

    def __init__(self) -> None:
        self.listed = 0

    def cache_token(self) -> str:
        return "archive|/data/caf\udce9.tar|1|2"

    def list_samples(self) -> Listing:
        self.listed += 1
        record = SampleRecord("images/caf\udce9.png", 0, "train", "labels.csv:2")
        return Listing([record], ["a"], "fingerprint", "one image")


def test_a_listing_with_a_key_that_is_not_utf8_is_cached_as_it_is(tmp_path):
    source = _ListedOnce()
    first = list_samples_cached(source, tmp_path / "cache")
    second = list_samples_cached(source, tmp_path / "cache")
    assert source.listed == 1
    assert second == first and second.records[0].key == "images/caf\udce9.png"


class _FlakySource(FolderSource):
    """A folder source whose first read of ``a/0.png`` fails, as on a network share."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failed = False

    def iter_bytes(self, keys):
        for key, data in super().iter_bytes(keys):
            if key == "a/0.png" and not self.failed:
                self.failed = True
                data = ReadError("Input/output error")
            yield key, data


def test_a_read_that_failed_once_is_not_cached(tmp_path, caplog):
    source = _FlakySource(write_dataset(tmp_path / "data"))
    listing = source.list_samples()
    first = load_images(source, listing, Preprocessing(), tmp_path / "cache", workers=1)
    assert first.unreadable == 1
    assert first.problems[0] == f"a/0.png ({source.root}): cannot read (Input/output error)"
    assert "not cached" in caplog.text
    second = load_images(source, listing, Preprocessing(), tmp_path / "cache", workers=1)
    assert not second.from_cache and second.valid.sum() == 5  # Only the corrupt b/2.png.
    assert load_images(source, listing, Preprocessing(), tmp_path / "cache", workers=1).from_cache


class _SlowLoggedSource(FolderSource):
    """A folder source that records each full read in a file and reads slowly."""

    def __init__(self, root: Path, log: Path) -> None:
        super().__init__(root)
        self.log = log

    def iter_bytes(self, keys):
        with self.log.open("a") as stream:
            stream.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        yield from super().iter_bytes(keys)


def _load_into(source: FolderSource, cache: Path, out: Path) -> None:
    decoded = load_images(source, source.list_samples(), Preprocessing(), cache, workers=1)
    np.save(out, np.asarray(decoded.images))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to share the test's source")
def test_two_processes_filling_one_entry_decode_once_and_agree(tmp_path, dataset):
    log = tmp_path / "reads.log"
    source = _SlowLoggedSource(dataset.root, log)
    context = multiprocessing.get_context("fork")
    runs = [
        context.Process(target=_load_into, args=(source, tmp_path / "cache", tmp_path / f"{i}.npy"))
        for i in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
    assert [run.exitcode for run in runs] == [0, 0]
    assert len(log.read_text().split()) == 1  # the second process read the first one's entry
    np.testing.assert_array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy"))
    entries = [path for path in (tmp_path / "cache").iterdir() if not path.name.startswith(".")]
    assert len(entries) == 1


def test_an_interrupt_while_writing_the_entry_leaves_no_staging_folder(
    tmp_path, dataset, monkeypatch
):
    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cnnkit.data.cache.np.save", interrupted_save)
    listing = dataset.list_samples()
    with pytest.raises(KeyboardInterrupt):
        load_images(dataset, listing, Preprocessing(), tmp_path / "cache", workers=1)
    left = [path.name for path in (tmp_path / "cache").iterdir() if path.is_dir()]
    assert left == []


def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next_write(tmp_path, dataset):
    """``kill -9`` mid-write leaves ``.<key>-xxxxxxxx/`` (as large as the entry); the next run
    to write that entry, holding its lock, removes it, and leaves other entries' alone."""
    listing = dataset.list_samples()
    key = cache_key(listing, Preprocessing())
    cache = tmp_path / "cache"
    abandoned, other = cache / f".{key}-k1ll3d_x", cache / ".other-key-abcdefgh"
    for folder in (abandoned, other):
        folder.mkdir(parents=True)
        (folder / "images.npy").write_bytes(b"\0" * 128)
    load_images(dataset, listing, Preprocessing(), cache, workers=1)
    assert sorted(path.name for path in cache.iterdir() if path.is_dir()) == [other.name, key]


# Run in a child process, which the test can kill if it hangs. Workers are kept busy (their jobs
# are slow to unpickle) while a large job is being fed to them, and Ctrl-C arrives in the middle
# of that job's pickling: multiprocessing.Pool.terminate() then waited forever on its feeder
# thread, blocked writing the job into a pipe that no worker would read any more.
_INTERRUPTED_FEED = """
import signal, sys, threading, time
from cnnkit.config import Preprocessing
from cnnkit.data.cache import load_images
from cnnkit.data.source import Listing, SampleRecord

def restore(data, slow):
    if slow:
        time.sleep(3)
    return bytes(data)

class Payload(bytes):
    def __reduce__(self):
        if self.role == "interrupt":
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(1)
        return restore, (bytes(self), self.role == "slow")

class Source:
    def iter_bytes(self, keys):
        for number, key in enumerate(keys):
            role = {0: "slow", 256: "slow", 512: "interrupt"}.get(number, "")
            payload = Payload(bytes(4_000_000 if role == "interrupt" else 10))
            payload.role = role
            yield key, payload

listing = Listing([SampleRecord(f"{n}.png", 0) for n in range(513)], ["a"], "test")
start = time.monotonic()
try:
    load_images(Source(), listing, Preprocessing(), None, workers=2)
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - start:.1f} s")
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_an_interrupt_while_a_large_job_is_fed_to_busy_workers_returns(tmp_path):
    script = tmp_path / "interrupted_feed.py"
    script.write_text(_INTERRUPTED_FEED, encoding="utf-8")
    command = [sys.executable, str(script)]
    try:
        done = subprocess.run(command, env=subprocess_env(), capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("decoding did not stop within 60 s of Ctrl-C")
    assert done.returncode == 0, done.stderr.decode()
    seconds = float(re.fullmatch(rb"interrupted after (\S+) s\n", done.stdout)[1])
    assert seconds < 15


def _square_or_fail(number: int) -> int:
    if number == 7:
        raise ValueError("seven is not welcome")
    if number == -1:
        os.kill(os.getpid(), signal.SIGKILL)
    return number * number


def test_worker_processes_answer_every_job_and_raise_a_workers_error():
    assert sorted(map_unordered(_square_or_fail, range(7), processes=3)) == [
        n * n for n in range(7)
    ]
    with pytest.raises(ValueError, match="seven is not welcome"):
        list(map_unordered(_square_or_fail, range(10), processes=2))
    with pytest.raises(ChildProcessError, match="died before it answered"):
        list(map_unordered(_square_or_fail, [1, -1, 2], processes=2))
    assert multiprocessing.active_children() == []


# Ctrl-C raised in fork's at-fork callbacks is printed as ignored and lost unless held back.
_INTERRUPTED_START = """
import os, signal
from cnnkit.data.workers import map_unordered

def interrupt_once():
    if not fired:
        fired.append(True)
        signal.raise_signal(signal.SIGINT)

fired = []
os.register_at_fork(after_in_parent=interrupt_once)
try:
    print(sorted(map_unordered(abs, range(-3, 0), processes=2)))
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs fork")
def test_ctrl_c_while_the_workers_start_is_not_lost(tmp_path):
    script = tmp_path / "interrupted_start.py"
    script.write_text(_INTERRUPTED_START, encoding="utf-8")
    command = [sys.executable, str(script)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, timeout=60)
    assert (done.stdout, done.stderr) == (b"interrupted\n", b"")
