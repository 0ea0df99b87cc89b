"""HasySource and the streaming tar reader, on tiny synthetic archives and on the dev copy."""

from __future__ import annotations

import bz2
import io
import logging
import lzma
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import non_utf8_path, within_seconds

from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data import archive, decompression
from cnnkit.data.cache import cache_key, load_images
from cnnkit.data.hasy import HasySource
from cnnkit.data.listings import limit_listing
from cnnkit.data.source import DataFormatError
from cnnkit.data.sources import build_splits
from cnnkit.data.tar_reader import iter_archive, normalize_member_name

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HASY_DEV = SHARED_DATA / "HASYv2-dev.tar.bz2"
# Listed out of symbol_id order on purpose: class order must follow symbol_id.
SYMBOLS = [(33, "C"), (31, "A"), (32, r"\alpha")]
PER_CLASS = 4


def png_bytes(shade: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), shade, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def crlf(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


def hasy_files(fold_rows: int = PER_CLASS - 1) -> dict[str, bytes]:
    """The files of a tiny HASYv2: 4 images per symbol, folds 1 and 2 over the first 3 of each.

    The last image of every symbol is in no fold, so a fold's listing leaves it out.
    """
    files: dict[str, bytes] = {}
    labels = ["path,symbol_id,latex,user_id"]
    folds: dict[str, list[str]] = {}
    index = 0
    for symbol_id, latex in SYMBOLS:
        for number in range(PER_CLASS):
            path = f"hasy-data/v2-{index:05d}.png"
            files[path] = png_bytes(10 * index)
            labels.append(f"{path},{symbol_id},{latex},7")
            for fold in (1, 2):
                if number < fold_rows:
                    split = "test" if number == fold - 1 else "train"
                    folds.setdefault(f"classification-task/fold-{fold}/{split}.csv", []).append(
                        f"../../{path},{symbol_id},{latex},7"
                    )
            index += 1
    files["hasy-data-labels.csv"] = crlf(labels)
    files["symbols.csv"] = crlf(
        ["symbol_id,latex,training_samples,test_samples"]
        + [f"{symbol_id},{latex},3,1" for symbol_id, latex in SYMBOLS]
    )
    for name, rows in folds.items():
        files[name] = crlf(["path,symbol_id,latex,user_id", *rows])
    return files


def ordered(files: dict[str, bytes], labels_last: bool) -> list[str]:
    """Member order: CSVs first, or as in the official archive with the labels CSV last."""
    csvs = sorted(name for name in files if name.endswith(".csv"))
    images = sorted(name for name in files if not name.endswith(".csv"))
    if labels_last:
        csvs.remove("hasy-data-labels.csv")
        return csvs + images + ["hasy-data-labels.csv"]
    return csvs + images


def write_tar(
    path: Path,
    files: dict[str, bytes],
    mode: str = "w:bz2",
    prefix: str = "./",
    labels_last: bool = True,
    tar_format: int = tarfile.GNU_FORMAT,
) -> Path:
    with tarfile.open(path, mode, format=tar_format) as archive:
        for name in ordered(files, labels_last):
            info = tarfile.TarInfo(prefix + name)
            info.size = len(files[name])
            archive.addfile(info, io.BytesIO(files[name]))
    return path


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def files() -> dict[str, bytes]:
    return hasy_files()


LAYOUTS = {
    "bz2, ./ prefix, labels last": lambda tmp, files: write_tar(tmp / "h.tar.bz2", files),
    "gz, top folder, csv first": lambda tmp, files: write_tar(
        tmp / "h.tgz", files, "w:gz", "HASYv2/", labels_last=False
    ),
    "xz, pax": lambda tmp, files: write_tar(
        tmp / "h.tar.xz", files, "w:xz", "", tar_format=tarfile.PAX_FORMAT
    ),
    "plain tar": lambda tmp, files: write_tar(tmp / "h.tar", files, "w", ""),
    "folder": lambda tmp, files: write_folder(tmp / "hasy", files),
    "folder with top folder": lambda tmp, files: (
        write_folder(tmp / "hasy" / "HASYv2", files).parent
    ),
}


def test_a_symbol_without_images_is_left_out_with_a_warning(tmp_path, files, caplog):
    """A trimmed copy lists a symbol in symbols.csv that no image has: every split would lack
    it, so it is no class (the error said its images had all been skipped as bad)."""
    files["symbols.csv"] += b"34,\\beta,0,0\r\n"
    root = write_folder(tmp_path / "hasy", files)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        listing = HasySource(root).list_samples()
    assert listing.class_names == ["A", r"\alpha", "C"]
    assert sorted({record.label for record in listing.records}) == [0, 1, 2]
    assert [r.getMessage() for r in caplog.records] == [
        "symbols.csv lists 1 symbol(s) with no image in hasy-data-labels.csv, left out: \\beta"
    ]
    data = build_splits(DataConfig(dataset="hasy", data=str(root), cache_dir=None), Preprocessing())
    assert data.splits.class_names == ["A", r"\alpha", "C"]
    # A symbol with images in neither of a fold's files: no class of that fold.
    for split in ("train", "test"):
        name = f"classification-task/fold-1/{split}.csv"
        rows = files[name].decode().splitlines()
        files[name] = crlf([row for row in rows if ",33,C," not in row])
    root = write_folder(tmp_path / "folded", files)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        listing = HasySource(root, fold=1).list_samples()
    assert listing.class_names == ["A", r"\alpha"]
    assert sorted({record.label for record in listing.records}) == [0, 1]
    assert [r.getMessage() for r in caplog.records] == [
        "symbols.csv lists 2 symbol(s) with no image in fold 1's files, left out: C, \\beta"
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_lists_and_streams_the_same_samples(tmp_path, files, layout):
    source = HasySource(LAYOUTS[layout](tmp_path, files))
    listing = source.list_samples()
    assert listing.class_names == ["A", r"\alpha", "C"]
    assert len(listing.records) == 3 * PER_CLASS
    first = listing.records[0]
    assert (first.key, first.label, first.split) == ("hasy-data/v2-00000.png", 2, None)
    assert first.origin == "hasy-data-labels.csv:2"
    streamed = dict(source.iter_bytes([record.key for record in listing.records]))
    assert streamed == {name: data for name, data in files.items() if name.endswith(".png")}


def test_fold_sets_splits_leaves_out_unlisted_images_and_shares_the_fingerprint(tmp_path, files):
    archive = write_tar(tmp_path / "h.tar.bz2", files)
    listings = {fold: HasySource(archive, fold=fold).list_samples() for fold in (None, 1, 2)}
    assert Counter(r.split for r in listings[None].records) == {None: 12}
    assert Counter(r.split for r in listings[1].records) == {"train": 6, "test": 3}
    assert "hasy-data/v2-00003.png" not in {r.key for r in listings[1].records}
    assert listings[1].records != listings[2].records
    assert len({listing.fingerprint for listing in listings.values()}) == 1
    # Folds over the same images share one decoded cache entry.
    preprocessing = Preprocessing()
    assert cache_key(listings[1], preprocessing) == cache_key(listings[2], preprocessing)


def test_build_splits_uses_the_fold(tmp_path, files):
    archive = write_tar(tmp_path / "h.tar.bz2", files)
    config = DataConfig(dataset="hasy", data=str(archive), fold=1, val_fraction=0)
    loaded = build_splits(config, Preprocessing(), cache_dir=tmp_path / "cache")
    assert (len(loaded.splits.train), len(loaded.splits.test)) == (6, 3)
    assert loaded.splits.train.images.shape == (6, 32, 32, 1)
    assert loaded.problems == []


@pytest.mark.parametrize(
    ("labels_last", "buffer_limit", "passes"),
    [(True, archive.BUFFER_LIMIT, 1), (True, 0, 2), (False, archive.BUFFER_LIMIT, 2)],
)
def test_listing_and_streaming_decompress_at_most_twice(
    tmp_path, files, monkeypatch, labels_last, buffer_limit, passes
):
    archive_path = write_tar(tmp_path / "h.tar.bz2", files, labels_last=labels_last)
    calls = []
    original = decompression._decompress_file

    def counting(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(decompression, "_decompress_file", counting)
    monkeypatch.setattr(archive, "BUFFER_LIMIT", buffer_limit)
    source = HasySource(archive_path, fold=1)
    keys = [record.key for record in source.list_samples().records]
    assert len(dict(source.iter_bytes(keys))) == len(keys)
    assert len(calls) == passes


def test_missing_files_are_named(tmp_path, files):
    with pytest.raises(DataFormatError, match="fold-3/train.csv"):
        HasySource(write_tar(tmp_path / "h.tar.bz2", files), fold=3).list_samples()
    del files["symbols.csv"]
    with pytest.raises(DataFormatError, match="symbols.csv: missing"):
        HasySource(write_folder(tmp_path / "folder", files)).list_samples()
    with pytest.raises(DataFormatError, match="missing hasy-data-labels.csv"):
        HasySource(tmp_path / "folder" / "hasy-data").list_samples()
    with pytest.raises(DataFormatError, match="no such archive or folder"):
        HasySource(tmp_path / "absent.tar.bz2").list_samples()


@pytest.mark.parametrize(
    ("file", "line", "bad", "message"),
    [
        ("hasy-data-labels.csv", 3, "hasy-data/v2-00001.png,x,C,7", "symbol_id must be"),
        ("hasy-data-labels.csv", 3, "hasy-data/v2-00001.png,99,C,7", "99 is not in symbols"),
        ("hasy-data-labels.csv", 3, "hasy-data/v2-00001.png,33,A,7", "disagrees"),
        ("hasy-data-labels.csv", 3, "hasy-data/v2-00000.png,33,C,7", "listed twice"),
        ("hasy-data-labels.csv", 3, "../../etc/passwd,33,C,7", "refused"),
        ("hasy-data-labels.csv", 3, "hasy-data/v2-00001.png", "expected at least 3"),
        ("symbols.csv", 3, "31,C,1,1", "listed twice"),
        ("classification-task/fold-1/train.csv", 2, "../../hasy-data/nope.png,31,A,1", "not in"),
    ],
)
def test_malformed_rows_name_the_file_and_line(tmp_path, files, file, line, bad, message):
    lines = files[file].decode().split("\r\n")
    lines[line - 1] = bad
    files[file] = "\r\n".join(lines).encode()
    source = HasySource(write_tar(tmp_path / "h.tar.bz2", files), fold=1)
    with pytest.raises(DataFormatError, match=rf"{file}:{line}: .*{message}"):
        source.list_samples()


def test_missing_image_is_reported_by_the_cache(tmp_path, files):
    del files["hasy-data/v2-00001.png"]
    archive = write_tar(tmp_path / "h.tar.bz2", files)
    config = DataConfig(dataset="hasy", data=str(archive), on_bad_image="skip")
    loaded = build_splits(config, Preprocessing())
    assert loaded.problems == [
        "hasy-data/v2-00001.png (hasy-data-labels.csv:3): file not found in the source"
    ]


@pytest.mark.parametrize("archived", [True, False], ids=["archive", "folder"])
def test_a_missing_image_is_reported_as_missing_and_the_rest_is_cached(tmp_path, files, archived):
    del files["hasy-data/v2-00001.png"]
    data = (
        write_tar(tmp_path / "h.tar.bz2", files)
        if archived
        else write_folder(tmp_path / "hasy", files)
    )
    config = DataConfig(dataset="hasy", data=str(data), on_bad_image="skip")
    loads = [build_splits(config, Preprocessing(), tmp_path / "cache") for _ in range(2)]
    assert loads[0].problems == [
        "hasy-data/v2-00001.png (hasy-data-labels.csv:3): file not found in the source"
    ]
    assert [load.from_cache for load in loads] == [False, True]


def test_an_image_rewritten_in_an_extracted_folder_is_decoded_again(tmp_path, files):
    """Rewriting a file in place leaves its folder's time as it was."""
    folder = write_folder(tmp_path / "hasy", files)
    source = HasySource(folder)
    listing = source.list_samples()
    first = [record.key for record in listing.records].index("hasy-data/v2-00000.png")
    before = load_images(source, listing, Preprocessing(), tmp_path / "cache", workers=1)
    folder_time = (folder / "hasy-data").stat().st_mtime_ns
    shade = int(before.images[first].min())
    (folder / "hasy-data" / "v2-00000.png").write_bytes(png_bytes(255 - shade))
    os.utime(folder / "hasy-data", ns=(folder_time, folder_time))
    source = HasySource(folder)
    after = load_images(source, source.list_samples(), Preprocessing(), tmp_path / "cache")
    assert not after.from_cache
    assert after.images[first].min() == after.images[first].max() == 255 - shade


def test_folds_share_one_decoded_cache_entry(tmp_path, files):
    archive = write_tar(tmp_path / "h.tar.bz2", files)
    results = [
        build_splits(
            DataConfig(dataset="hasy", data=str(archive), fold=fold), Preprocessing(), tmp_path
        )
        for fold in (1, 2)
    ]
    assert [result.from_cache for result in results] == [False, True]


def test_cache_token_is_cheap_and_names_archive_and_fold(tmp_path, files):
    archive = write_tar(tmp_path / "h.tar.bz2", files)
    tokens = {HasySource(archive, fold=fold).cache_token() for fold in (None, 1, 2)}
    assert len(tokens) == 3 and all(str(archive) in token for token in tokens)
    assert HasySource(write_folder(tmp_path / "folder", files)).cache_token() is None


@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_a_dataset_at_a_path_that_is_not_utf8_is_listed_and_cached(tmp_path, files, layout):
    place = non_utf8_path(tmp_path / "data", b"caf\xe9")
    if layout == "archive":
        data = write_tar(place.with_name(place.name + ".tar.bz2"), files)
    else:
        data = write_folder(place, files)
    config = DataConfig(dataset="hasy", data=str(data), fold=1)
    first = build_splits(config, Preprocessing(), tmp_path / "cache")
    second = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert (first.from_cache, second.from_cache) == (False, True)
    assert sorted(second.splits.test.paths) == [f"hasy-data/v2-{i:05d}.png" for i in (0, 4, 8)]


# The tar reader.


def tricky_members() -> dict[str, bytes]:
    long_folder = "a-very-long-folder-name-" * 4
    return {
        "top/small.txt": b"small",
        f"top/{long_folder}/deep/{'n' * 90}.png": b"long name",
        "top/ünïcødé ñame/ßymbol.png": b"unicode",
        "top/empty.bin": b"",
        "top/exactly-512.bin": bytes(range(256)) * 2,
        "top/odd.bin": b"x" * 1000,
    }


@pytest.mark.parametrize(
    ("mode", "tar_format"),
    [
        ("w:bz2", tarfile.GNU_FORMAT),
        ("w:gz", tarfile.PAX_FORMAT),
        ("w:xz", tarfile.USTAR_FORMAT),
        ("w", tarfile.PAX_FORMAT),
    ],
)
def test_iter_archive_matches_tarfile(tmp_path, mode, tar_format):
    members = tricky_members()
    path = tmp_path / "t.tar"
    with tarfile.open(path, mode, format=tar_format) as archive:
        folder = tarfile.TarInfo("top/folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for index, target in enumerate(["small.txt", "far/" * 40 + "small.txt"]):
            link = tarfile.TarInfo(f"top/link-{index}-{'l' * 100 * index}.png")
            link.type, link.linkname = tarfile.SYMTYPE, target
            if tar_format != tarfile.USTAR_FORMAT or index == 0:
                archive.addfile(link)
    assert dict(iter_archive(path)) == members
    with tarfile.open(path) as archive:
        expected = [normalize_member_name(m.name) for m in archive.getmembers() if m.isfile()]
    assert [name for name, _ in iter_archive(path, lambda name: False)] == expected


def add_hard_link(archive: tarfile.TarFile, name: str, target: str) -> None:
    link = tarfile.TarInfo(name)
    link.type, link.linkname = tarfile.LNKTYPE, target
    archive.addfile(link)


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_iter_archive_reads_hard_links_as_the_files_they_name(tmp_path, tar_format, caplog):
    long_name = f"top/{'f' * 120}/b.png"  # Its link names it in a GNU or pax record.
    path = tmp_path / "links.tar.gz"
    with tarfile.open(path, "w:gz", format=tar_format) as archive:
        for name, data in (("top/a.png", b"first"), (long_name, b"second")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        add_hard_link(archive, "top/copy.png", "top/a.png")
        add_hard_link(archive, "top/copy-of-copy.png", "top/copy.png")
        add_hard_link(archive, "top/long.png", f"./{long_name}")
        add_hard_link(archive, "top/dangling.png", "top/gone.png")
    files = dict(iter_archive(path))
    assert files == {
        "top/a.png": b"first",
        long_name: b"second",
        "top/copy.png": b"first",
        "top/copy-of-copy.png": b"first",
        "top/long.png": b"second",
    }
    assert "hard link top/dangling.png points to top/gone.png, which is not a file" in caplog.text
    only_link = dict(iter_archive(path, {"top/copy-of-copy.png"}.__contains__))
    assert only_link == {
        "top/a.png": None,
        long_name: None,
        "top/copy.png": None,
        "top/copy-of-copy.png": b"first",
        "top/long.png": None,
        "top/dangling.png": None,
    }


@pytest.mark.parametrize("labels_last", [True, False])
def test_hard_linked_images_are_streamed_with_their_bytes(tmp_path, files, labels_last):
    files["hasy-data/v2-00005.png"] = files["hasy-data/v2-00002.png"]
    path = tmp_path / "h.tar.bz2"
    with tarfile.open(path, "w:bz2") as archive:
        for name in ordered(files, labels_last):
            if name == "hasy-data/v2-00005.png":
                add_hard_link(archive, name, "hasy-data/v2-00002.png")
                continue
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            archive.addfile(info, io.BytesIO(files[name]))
    source = HasySource(path)
    streamed = dict(source.iter_bytes([record.key for record in source.list_samples().records]))
    assert streamed == {name: data for name, data in files.items() if name.endswith(".png")}


@pytest.mark.parametrize(
    "record",
    [b"00 path=", b"15_path=", b"99 path=", b"03 path=", b"-5 path="],
    ids=["zero length", "no space", "past the end", "too short", "negative"],
)
def test_a_corrupt_pax_header_is_named_not_looped_on(tmp_path, record):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("ünïcødé.png")  # Not ASCII: the name goes into a pax header.
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    data = buffer.getvalue()
    assert data[512:520] == b"24 path="
    path = tmp_path / "bad-pax.tar"
    path.write_bytes(data[:512] + record + data[520:])
    message = f"{re.escape(str(path))}: corrupt pax header \\(bad record b'{record[:2].decode()}"
    with pytest.raises(DataFormatError, match=message):
        within_seconds(30, lambda: list(iter_archive(path)))


def test_iter_archive_reads_multi_stream_bzip2(tmp_path, files):
    plain = write_tar(tmp_path / "h.tar", files, "w").read_bytes()
    half = len(plain) // 2
    path = tmp_path / "parallel.tar.bz2"
    path.write_bytes(bz2.compress(plain[:half]) + bz2.compress(plain[half:]))
    assert dict(iter_archive(path)) == files


def test_iter_archive_refuses_truncated_and_foreign_files(tmp_path, files):
    plain = write_tar(tmp_path / "h.tar", files, "w").read_bytes()
    truncated = tmp_path / "truncated.tar.xz"
    truncated.write_bytes(lzma.compress(plain[: len(plain) // 2 + 100]))
    with pytest.raises(DataFormatError, match="truncated"):
        list(iter_archive(truncated))
    cut = tmp_path / "cut.tar.bz2"
    cut.write_bytes(bz2.compress(plain)[:-100])
    with pytest.raises(DataFormatError, match="truncated"):
        list(iter_archive(cut))
    foreign = tmp_path / "foreign.bz2"
    foreign.write_bytes(bz2.compress(b"not a tar archive " * 100))
    with pytest.raises(DataFormatError, match="not a tar archive"):
        list(iter_archive(foreign))
    corrupt = tmp_path / "corrupt.tar.bz2"
    corrupt.write_bytes(bz2.compress(plain)[:-200] + b"\0" * 200)
    with pytest.raises(DataFormatError, match="corrupt compressed data|truncated"):
        list(iter_archive(corrupt))


def test_a_plain_tar_cut_between_members_is_read_with_a_warning(tmp_path, files, caplog):
    """No decompressor catches a plain .tar cut at a header: its missing end-of-archive blocks
    are the only sign, so the read warns (tar readers take such archives)."""
    archive = write_tar(tmp_path / "h.tar", files, "w", "")
    with tarfile.open(archive) as complete:
        last = complete.getmembers()[-1]
    archive.write_bytes(archive.read_bytes()[: last.offset])
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        names = [name for name, _ in iter_archive(archive)]
    assert len(names) == len(files) - 1 and last.name not in names
    assert [r.getMessage() for r in caplog.records] == [
        f"{archive}: ends without tar's end-of-archive blocks (truncated download?); images it "
        "lacks are reported as not found"
    ]
    caplog.clear()
    assert len(list(iter_archive(write_tar(tmp_path / "whole.tar", files, "w", "")))) == len(files)
    assert caplog.records == []


def test_archive_truncated_after_its_csvs_fails_loudly_while_decoding(tmp_path, files):
    archive = write_tar(tmp_path / "h.tar.gz", files, "w:gz", labels_last=False)
    archive.write_bytes(archive.read_bytes()[:-300])
    source = HasySource(archive)
    listing = source.list_samples()
    with pytest.raises(DataFormatError, match="truncated"):
        load_images(source, listing, Preprocessing(), None, workers=2)


# The development copy in ../shared/data.

needs_hasy = pytest.mark.skipif(
    not HASY_DEV.is_file(), reason=f"real HASYv2 dev archive not found at {HASY_DEV}"
)


@pytest.mark.realdata
@needs_hasy
def test_real_hasy_listing_and_fold_one():
    source = HasySource(HASY_DEV, fold=1)
    listing = source.list_samples()
    assert len(listing.records) == 151_572
    assert len(listing.class_names) == 369
    assert listing.class_names[0] == "A"
    splits = Counter(record.split for record in listing.records)
    assert (
        splits["train"] > 0 and splits["test"] > 0 and splits["train"] + splits["test"] == 151_572
    )
    # Decode only two classes, from the images the listing pass kept in memory.
    limited = limit_listing(listing, max_classes=2, max_per_class=20)
    decoded = dict(source.iter_bytes([record.key for record in limited.records]))
    assert len(decoded) == len(limited.records)
    assert all(data.startswith(b"\x89PNG") for data in decoded.values())


def test_evaluating_a_fold_model_without_its_fold_warns(tmp_path, files, caplog):
    from cnnkit.evaluation.evaluate import evaluate_model_file
    from cnnkit.inference.artifact import ModelMetadata, save_model
    from cnnkit.models.registry import create_model

    archive = write_tar(tmp_path / "h.tar.bz2", files)
    model = create_model("symbol_cnn", 3, 1, width=4, layers_per_stage=1).eval()
    metadata = ModelMetadata(
        "symbol_cnn",
        ("A", "C", r"\alpha"),
        Preprocessing(),
        {"width": 4, "layers_per_stage": 1},
        training={"dataset": "hasy", "fold": 1},
    )
    path = save_model(tmp_path / "fold1.safetensors", model, metadata)
    data = {"dataset": "hasy", "data": str(archive)}
    evaluate_model_file(path, {**data, "fold": 1}, tmp_path / "with", tmp_path / "cache")
    assert "trained on HASYv2 fold" not in caplog.text
    evaluate_model_file(path, data, tmp_path / "without", tmp_path / "cache")
    assert "trained on HASYv2 fold 1; without --fold 1" in caplog.text
    # Another fold's test images are this fold's training images.
    assert "fold 2's test images are among its training images" not in caplog.text
    evaluate_model_file(path, {**data, "fold": 2}, tmp_path / "other", tmp_path / "cache")
    assert "fold 2's test images are among its training images" in caplog.text
    # A fold the archive lacks is an error, and no warning about its images comes first.
    caplog.clear()
    with pytest.raises(ValueError, match="fold-7"):
        evaluate_model_file(path, {**data, "fold": 7}, tmp_path / "none", tmp_path / "cache")
    assert "fold 7's test images" not in caplog.text


def test_a_small_file_of_another_kind_is_not_a_tar_archive(tmp_path):
    text = tmp_path / "labels.csv"
    text.write_text("path,label\na.png,x\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"labels\.csv: not a tar archive \(19 bytes\)"):
        list(archive.iter_archive(text))


def test_other_limits_on_a_fold_score_test_images_without_a_warning(tmp_path, caplog) -> None:
    """A fold's limits keep at most N images of each class in each of its splits, so other
    limits still score only test images: no warning that the model may have trained on them.
    A drawn split (no fold) would mix the images, and warns."""
    from cnnkit.evaluation.evaluate import trained_split_settings

    data = str((tmp_path / "HASYv2.tar.bz2").resolve())
    training = {"dataset": "hasy", "data": data, "max_per_class": 30, "max_classes": 3}
    fold = {"dataset": "hasy", "data": data, "fold": 1, "max_per_class": 5, "max_classes": 2}
    settings = trained_split_settings("m.safetensors", training, fold, "test")
    assert (settings["max_per_class"], settings["max_classes"]) == (5, 2)
    assert "test split holds other images" not in caplog.text
    drawn = {key: value for key, value in fold.items() if key != "fold"}
    assert trained_split_settings("m.safetensors", training, drawn, "test")["max_per_class"] == 5
    assert "was trained with max per class 30; with 5 its test split holds other" in caplog.text
