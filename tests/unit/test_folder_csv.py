"""FolderSource and CsvSource: listings, CSV quirks, refused paths and bad images."""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tests.conftest import within_seconds

from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data import files
from cnnkit.data.cache import load_images
from cnnkit.data.csv_source import CsvSource, iter_csv_rows
from cnnkit.data.folder import FolderSource
from cnnkit.data.source import DataFormatError
from cnnkit.data.sources import BadDataError, build_splits
from cnnkit.data.splits import duplicate_groups, stratified_split

MODES = ("L", "RGB", "RGBA", "P", "I;16", "CMYK")
PROPERTY_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Class names that survive as folder names and as stripped CSV fields: any printable unicode
# without path separators, not hidden, no surrounding spaces.
class_names = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="/\\\0"
    ),
    min_size=1,
    max_size=10,
).filter(lambda name: name == name.strip() and name and not name.startswith("."))


def make_image(mode: str, size: tuple[int, int], shade: int = 90) -> Image.Image:
    """A small image in ``mode`` with a dark square on a light background."""
    array = np.full((size[1], size[0], 3), 230, dtype=np.uint8)
    array[: max(1, size[1] // 2), : max(1, size[0] // 2)] = shade
    image = Image.fromarray(array, "RGB")
    if mode == "I;16":
        return Image.fromarray(array[:, :, 0].astype(np.uint16) * 257)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(200)
        return image
    return image.convert(mode)


def write_image(
    path: Path, mode: str = "RGB", size: tuple[int, int] = (6, 5), shade: int = 90
) -> Path:
    """Save an image in a format that supports ``mode`` (JPEG for CMYK, PNG otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(mode, size, shade).save(path, format="JPEG" if mode == "CMYK" else "PNG")
    return path


def write_csv(path: Path, rows: list[list[str]], newline: str = "\n", bom: bool = False) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=newline).writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode())
    return path


def folder_dataset(root: Path, per_class: int = 4) -> Path:
    for offset, name in enumerate(("cat", "dog")):
        for index in range(per_class):  # Distinct images: copies stay in one split.
            write_image(root / name / f"{index}.png", shade=2 * index + offset)
    return root


def folder_config(root: Path, **options) -> DataConfig:
    return DataConfig(dataset="folder", data=str(root), **options)


# FolderSource.


def test_folder_lists_classes_recursively_with_any_extension_case(tmp_path, caplog):
    write_image(tmp_path / "zebra" / "a.PNG")
    write_image(tmp_path / "zebra" / "deep" / "er" / "b.JpEg", mode="CMYK")
    write_image(tmp_path / "Äpfel und Birnen" / "c.png")
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    (tmp_path / "zebra" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "README.md").write_text("stray")
    with caplog.at_level(logging.WARNING):
        listing = FolderSource(tmp_path).list_samples()
    assert listing.class_names == ["zebra", "Äpfel und Birnen"]
    assert [(r.key, r.label, r.split) for r in listing.records] == [
        ("zebra/a.PNG", 0, None),
        ("zebra/deep/er/b.JpEg", 0, None),
        ("Äpfel und Birnen/c.png", 1, None),
    ]
    assert "notes.txt" in caplog.text and "README.md" in caplog.text
    assert ".DS_Store" not in caplog.text


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_linked_folders_inside_a_class_are_listed_once_even_in_a_cycle(tmp_path):
    root = folder_dataset(tmp_path / "data", per_class=1)
    write_image(tmp_path / "elsewhere" / "x.png")
    (root / "cat" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "cat" / "more" / "loop").symlink_to(root / "cat", target_is_directory=True)
    (root / "dog" / "again").symlink_to(root / "dog", target_is_directory=True)
    listing = FolderSource(root).list_samples()
    assert [(r.key, r.label) for r in listing.records] == [
        ("cat/0.png", 0),
        ("cat/more/x.png", 0),
        ("dog/0.png", 1),
    ]


def test_the_data_summary_says_what_a_class_limit_kept(tmp_path):
    root = folder_dataset(tmp_path / "data", per_class=6)
    whole = build_splits(folder_config(root), Preprocessing()).splits.description
    assert whole.startswith("data (12 images, 2 classes): ")
    limited = build_splits(folder_config(root, max_classes=1), Preprocessing()).splits
    assert limited.description.startswith("data (12 images, 2 classes), 6 images of 1 class kept: ")
    total = len(limited.train) + len(limited.test) + (len(limited.val) if limited.val else 0)
    assert total == 6 and f"{len(limited.test)} test" in limited.description


def test_folder_reports_empty_classes_by_name(tmp_path):
    write_image(tmp_path / "full" / "a.png")
    (tmp_path / "empty one").mkdir()
    (tmp_path / "only text").mkdir()
    (tmp_path / "only text" / "x.txt").write_text("no image")
    with pytest.raises(DataFormatError, match="empty one, only text"):
        FolderSource(tmp_path).list_samples()


def test_folder_without_class_folders_or_missing_is_refused(tmp_path):
    with pytest.raises(DataFormatError, match="no class folders"):
        FolderSource(tmp_path).list_samples()
    with pytest.raises(DataFormatError, match="absent: no such folder$"):
        FolderSource(tmp_path / "absent").list_samples()
    (tmp_path / "file").write_text("not images\n")
    with pytest.raises(DataFormatError, match="file: not a folder$"):
        FolderSource(tmp_path / "file").list_samples()


def test_a_folder_split_into_train_and_test_folders_keeps_that_split(tmp_path):
    """``train/<class>/`` beside ``test/<class>/``: the classes are the inner folders, and
    the test split is test/'s images (not a "train" against "test" classifier)."""
    for split, count in (("train", 5), ("test", 2)):
        for name in ("cat", "dog"):
            for index in range(count):
                write_image(tmp_path / split / name / f"{index}.png", shade=40 * index)
    write_image(tmp_path / "train" / "cat" / "more" / "deep.png")  # Recursive, as before.
    listing = FolderSource(tmp_path).list_samples()
    assert listing.class_names == ["cat", "dog"]
    assert listing.description.endswith(
        "(15 images, 2 classes; test split: test/; training split: train/)"
    )
    split_of = {
        record.key: (record.split, listing.class_names[record.label]) for record in listing.records
    }
    assert split_of["test/dog/1.png"] == ("test", "dog")
    assert split_of["train/cat/more/deep.png"] == ("train", "cat")
    splits = build_splits(folder_config(tmp_path, val_fraction=0.0), Preprocessing()).splits
    assert (len(splits.train), len(splits.test)) == (11, 4)
    # A test share is for a seeded split: this one is kept (training says the share is unused).
    loaded = build_splits(
        folder_config(tmp_path, val_fraction=0.0, test_fraction=0.5), Preprocessing()
    )
    assert (len(loaded.splits.train), len(loaded.splits.test), loaded.split_given) == (11, 4, True)
    assert not build_splits(folder_config(tmp_path / "train"), Preprocessing()).split_given
    # Without test/, val/ is the test split; with both, val/ trains with train/.
    (tmp_path / "test").rename(tmp_path / "Val")
    assert (
        FolderSource(tmp_path)
        .list_samples()
        .description.endswith("test split: Val/; training split: train/)")
    )
    for name in ("cat", "dog"):
        write_image(tmp_path / "test" / name / "0.png")
    assert (
        FolderSource(tmp_path)
        .list_samples()
        .description.endswith("test split: test/; training split: Val/, train/)")
    )
    # A folder of unlabelled images beside split folders would make every folder a class.
    write_image(tmp_path / "predict" / "0.png")
    with pytest.raises(DataFormatError) as refused:
        FolderSource(tmp_path).list_samples()
    assert str(refused.value) == (
        f"{tmp_path}: Val/, test/, train/ hold the same class folders, but predict/ beside them "
        f"is no split folder (train/, val/ or test/); move it out of {tmp_path}, or pass --data "
        f"{tmp_path / 'train'} to train on train/ alone"
    )
    (tmp_path / "predict" / "0.png").unlink()
    (tmp_path / "predict").rmdir()
    # Classes named like splits that hold images themselves are classes.
    write_image(tmp_path / "test" / "stray.png")
    listing = FolderSource(tmp_path).list_samples()
    assert listing.class_names == ["Val", "test", "train"]
    assert {record.split for record in listing.records} == {None}


def test_classes_named_like_splits_stay_classes_and_unlabelled_test_images_are_refused(
    tmp_path,
):
    # Classes "train" and "test" whose images sit in subfolders of their own names.
    write_image(tmp_path / "plain" / "train" / "engines" / "0.png")
    write_image(tmp_path / "plain" / "test" / "probes" / "0.png", shade=30)
    assert FolderSource(tmp_path / "plain").list_samples().class_names == ["test", "train"]
    # Kaggle's layout: labelled train/, unlabelled test/.
    for name in ("cat", "dog"):
        write_image(tmp_path / "kaggle" / "train" / name / "0.png", shade=len(name))
    write_image(tmp_path / "kaggle" / "test" / "17.png")
    root = tmp_path / "kaggle"
    with pytest.raises(DataFormatError) as refused:
        FolderSource(root).list_samples()
    assert str(refused.value) == (
        f"{root}: train/ holds class folders, and test/ images without any (unlabelled, so "
        f"they cannot be scored); pass --data {root / 'train'}, whose test split is then drawn "
        "from it"
    )


def test_the_same_image_under_two_classes_is_named_in_a_warning(tmp_path, caplog):
    root = folder_dataset(tmp_path / "data")
    (root / "cat" / "again.png").write_bytes((root / "cat" / "1.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        build_splits(folder_config(root), Preprocessing())
    assert "identical images carry different labels" not in caplog.text  # One class: fine.
    (root / "dog" / "copy.png").write_bytes((root / "cat" / "0.png").read_bytes())
    for split_folders in (False, True):  # A seeded split, and one the folders give.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cnnkit"):
            build_splits(folder_config(root, val_fraction=0.2), Preprocessing())
        assert caplog.text.count("identical images carry different labels") == 1
        at = "train/" * split_folders
        assert (
            "1 set(s) of identical images carry different labels, such as "
            f"{at}cat/0.png (cat) and {at}dog/copy.png (dog)"
        ) in caplog.text
        if not split_folders:
            (root / "train").mkdir()
            for name in ("cat", "dog"):
                (root / name).rename(root / "train" / name)
            write_image(root / "test" / "cat" / "0.png", shade=200)


def test_folder_fingerprint_changes_when_a_file_changes(tmp_path):
    folder_dataset(tmp_path, per_class=2)
    before = FolderSource(tmp_path).list_samples().fingerprint
    assert FolderSource(tmp_path).list_samples().fingerprint == before
    (tmp_path / "cat" / "0.png").write_bytes(b"rewritten, and corrupt")
    assert FolderSource(tmp_path).list_samples().fingerprint != before


@PROPERTY_SETTINGS
@given(
    names=st.lists(class_names, min_size=1, max_size=4, unique=True),
    modes=st.lists(st.sampled_from(MODES), min_size=1, max_size=3),
    sizes=st.lists(st.tuples(st.integers(1, 80), st.integers(1, 80)), min_size=1, max_size=3),
)
def test_folder_property_odd_names_modes_and_sizes(tmp_path_factory, names, modes, sizes):
    root = tmp_path_factory.mktemp("folder")
    expected = {}
    for class_index, name in enumerate(names):
        for index, mode in enumerate(modes):
            size = sizes[(class_index + index) % len(sizes)]
            suffix = ".jpg" if mode == "CMYK" else ".png"
            write_image(root / name / f"{index}{suffix}", mode, size)
            expected[f"{name}/{index}{suffix}"] = name
    source = FolderSource(root)
    listing = source.list_samples()
    assert listing.class_names == sorted(names)
    assert {r.key: listing.class_names[r.label] for r in listing.records} == expected
    decoded = load_images(source, listing, Preprocessing(), None, workers=1)
    assert decoded.problems == []
    assert decoded.images.shape == (len(expected), 32, 32, 1)
    assert decoded.valid.all()


@pytest.mark.parametrize(
    ("name", "contents", "problem"),
    [
        ("zero.png", b"", "empty file"),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n garbage", "truncated"),
        ("text.jpg", b"plain text, not a JPEG", "not a readable image"),
        ("truncated.png", None, "cat/truncated.png"),
    ],
)
def test_bad_images_are_reported_with_their_path_or_skipped(tmp_path, name, contents, problem):
    folder_dataset(tmp_path)
    bad = tmp_path / "cat" / name
    if contents is None:
        whole = io.BytesIO()
        make_image("RGB", (40, 40)).save(whole, format="PNG")
        contents = whole.getvalue()[: len(whole.getvalue()) // 2]
    bad.write_bytes(contents)
    with pytest.raises(BadDataError, match="1 bad image") as error:
        build_splits(folder_config(tmp_path), Preprocessing())
    assert f"cat/{name}" in str(error.value) and problem in str(error.value)
    loaded = build_splits(folder_config(tmp_path, on_bad_image="skip"), Preprocessing())
    assert len(loaded.problems) == 1 and f"cat/{name}" in loaded.problems[0]
    splits = loaded.splits
    total = len(splits.train) + len(splits.test) + (len(splits.val) if splits.val else 0)
    assert total == 8
    assert splits.description.endswith(" test, 1 bad image(s) skipped")


def test_a_class_whose_images_are_all_skipped_is_an_error(tmp_path):
    folder_dataset(tmp_path)
    (tmp_path / "owl").mkdir()
    for index in range(3):
        (tmp_path / "owl" / f"{index}.png").write_bytes(b"not an image")
    config = folder_config(tmp_path, on_bad_image="skip")
    with pytest.raises(ValueError, match=r"1 class\(es\) have no readable image left .*\(owl\)"):
        build_splits(config, Preprocessing())


# iter_csv_rows and CsvSource.


def test_iter_csv_rows_names_file_and_line_for_short_rows():
    data = b"path,label,split\r\na.png,cat,train\r\n\r\nb.png\r\n"
    with pytest.raises(DataFormatError, match=r"list\.csv:4: expected at least 2 fields"):
        list(iter_csv_rows(data, "list.csv", ("path", "label")))


def test_iter_csv_rows_counts_lines_of_quoted_multiline_fields():
    data = b'path,label\n"a.png","two\nlines"\nb.png,dog\n'
    rows = list(iter_csv_rows(data, "list.csv", ("path", "label")))
    assert rows == [(2, ["a.png", "two\nlines"]), (4, ["b.png", "dog"])]


def test_iter_csv_rows_reads_a_quoted_field_after_a_space_and_strips_every_value():
    data = b'path, label\na.png, "cat"\n b.png ,cat\n" c.png ",  "cat, tabby"\n'
    rows = list(iter_csv_rows(data, "list.csv", ("path", "label")))
    assert rows == [(2, ["a.png", "cat"]), (3, ["b.png", "cat"]), (4, ["c.png", "cat, tabby"])]


def csv_dataset(root: Path, labels: list[str], **csv_options) -> Path:
    rows = [["path", "label"]]
    for index, label in enumerate(labels):
        write_image(root / "images" / f"{index}.png", shade=index)  # Distinct: see duplicates.
        rows.append([f"images/{index}.png", label])
    return write_csv(root / "labels.csv", rows, **csv_options)


def test_a_csv_written_on_windows_names_its_images_with_backslashes(tmp_path):
    write_image(tmp_path / "images" / "cat" / "a.jfif")  # A JPEG-family name, as Windows saves.
    write_image(tmp_path / "images" / "dog" / "b.png")
    weird = tmp_path / "back\\slash.png"  # On POSIX a backslash may be part of a name.
    write_image(weird)
    rows = [["path", "label"], ["images\\cat\\a.jfif", "cat"], ["images\\dog\\b.png", "dog"]]
    rows.append([weird.name, "dog"])
    listing = CsvSource(write_csv(tmp_path / "labels.csv", rows)).list_samples()
    assert [record.key for record in listing.records] == [
        "images/cat/a.jfif",
        "images/dog/b.png",
        "back\\slash.png",
    ]


def test_csv_quirks_bom_crlf_quotes_extra_columns_and_column_order(tmp_path):
    for index in range(3):
        write_image(tmp_path / "sub dir" / f"{index}.png")
    rows = [
        ["note", "Label ", " PATH"],
        ["x", "b, with comma", "sub dir/0.png"],
        ["y", 'quote "q"', "./sub dir/../sub dir/1.png"],
        ["z", "b, with comma", str(tmp_path / "sub dir" / "2.png")],
    ]
    path = write_csv(tmp_path / "labels.csv", rows, newline="\r\n", bom=True)
    listing = CsvSource(path).list_samples()
    assert listing.class_names == ["b, with comma", 'quote "q"']
    assert [(r.key, r.label, r.origin) for r in listing.records] == [
        ("sub dir/0.png", 0, "labels.csv:2"),
        ("sub dir/1.png", 1, "labels.csv:3"),
        ("sub dir/2.png", 0, "labels.csv:4"),
    ]


@pytest.mark.parametrize(
    "path", ["../../etc/passwd", "/etc/passwd", "images/../../outside.png", "..", "."]
)
def test_csv_path_escaping_the_dataset_is_refused(tmp_path, path):
    (tmp_path / "data").mkdir()
    csv_path = write_csv(
        tmp_path / "data" / "labels.csv", [["path", "label"], ["ok.png", "a"], [path, "b"]]
    )
    with pytest.raises(DataFormatError, match=r"labels\.csv:3: .*outside the dataset"):
        CsvSource(csv_path).list_samples()


@pytest.mark.parametrize(
    ("contents", "where"),
    [
        (b"file,label\na.png,cat\n", r"labels\.csv:1: header lacks column\(s\) path"),
        (b"path,label,path\na.png,cat,b.png\n", r"labels\.csv:1: header repeats column\(s\) path"),
        (b"path,label\na.png,cat\nb.png,\n", r"labels\.csv:3: empty label"),
        (b"path,label\na.png,cat\n,dog\n", r"labels\.csv:3: empty path"),
        (b"path,label\na.png,cat\nb.png,caf\xe9\n", r"labels\.csv:3: not UTF-8"),
        (b'path,label\na.png,cat\n"b.png,dog\nc.png,cat\nd.png,dog\n', r"labels\.csv:3: malformed"),
        (b"", r"labels\.csv:1: empty file"),
        (b"path,label,split\na.png,cat,train\nb.png,dog,val\n", r"labels\.csv:3: split"),
        (b"path,label,split\na.png,cat,train\nb.png,dog,\n", r"labels\.csv:3: empty split"),
        (b"path,label\na.png,cat\nb.png,dog\na.png,dog\n", r"labels\.csv:4: .*line 2"),
    ],
)
def test_csv_bad_rows_name_file_and_line(tmp_path, contents, where):
    path = tmp_path / "labels.csv"
    path.write_bytes(contents)
    with pytest.raises(DataFormatError, match=where):
        CsvSource(path).list_samples()


def test_csv_repeated_rows_are_dropped_with_a_warning(tmp_path, caplog):
    path = csv_dataset(tmp_path, ["cat", "dog"])
    path.write_text(path.read_text() + "images/0.png,cat\n./images/0.png,cat\n")
    with caplog.at_level(logging.WARNING):
        listing = CsvSource(path).list_samples()
    assert [r.key for r in listing.records] == ["images/0.png", "images/1.png"]
    assert "dropped 2 repeated row(s)" in caplog.text


def _two_folders_of_images(tmp_path: Path) -> tuple[Path, Path]:
    """Folders ``a`` and ``b`` with the same image names and different pixels."""
    for shade, folder in ((40, "a"), (200, "b")):
        for index in range(2):
            write_image(tmp_path / folder / f"{index}.png", shade=shade + index)
    return tmp_path / "a", tmp_path / "b"


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_a_linked_csv_reads_the_files_its_absolute_paths_name(tmp_path):
    seen, real = _two_folders_of_images(tmp_path)
    rows = [["path", "label"]] + [[str(seen / f"{i}.png"), "ab"[i]] for i in range(2)]
    write_csv(real / "labels.csv", rows)
    (seen / "labels.csv").symlink_to(real / "labels.csv")
    source = CsvSource(seen / "labels.csv")
    keys = [record.key for record in source.list_samples().records]
    assert keys == [(seen / f"{i}.png").as_posix() for i in range(2)]
    streamed = dict(source.iter_bytes(keys))
    assert streamed == {key: Path(key).read_bytes() for key in keys}


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_absolute_paths_may_name_the_csv_folder_through_a_linked_folder(tmp_path):
    _, real = _two_folders_of_images(tmp_path)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    rows = [["path", "label"]] + [[str(tmp_path / "link" / f"{i}.png"), "ab"[i]] for i in (0, 1)]
    write_csv(real / "labels.csv", rows)
    source = CsvSource(tmp_path / "link" / "labels.csv")
    keys = [record.key for record in source.list_samples().records]
    assert keys == ["0.png", "1.png"]
    assert dict(source.iter_bytes(keys)) == {key: (real / key).read_bytes() for key in keys}


def test_csv_split_column_is_honoured(tmp_path):
    rows = [["path", "label", "split"]]
    for index in range(6):
        write_image(tmp_path / f"{index}.png")
        rows.append([f"{index}.png", "ab"[index % 2], "Train" if index < 4 else "test"])
    listing = CsvSource(write_csv(tmp_path / "labels.csv", rows)).list_samples()
    assert [r.split for r in listing.records] == ["train"] * 4 + ["test"] * 2
    config = DataConfig(dataset="csv", data=str(tmp_path / "labels.csv"), val_fraction=0)
    splits = build_splits(config, Preprocessing()).splits
    assert (len(splits.train), len(splits.test)) == (4, 2)


def _split_csv(tmp_path, rows: list[tuple[str, str]]):
    lines = [["path", "label", "split"]]
    for index, (label, split) in enumerate(rows):
        write_image(tmp_path / f"{index}.png")
        lines.append([f"{index}.png", label, split])
    path = write_csv(tmp_path / "labels.csv", lines)
    return DataConfig(dataset="csv", data=str(path), val_fraction=0)


def test_a_class_with_test_images_only_is_reported(tmp_path, caplog):
    rows = [("a", "train"), ("a", "train"), ("b", "train"), ("a", "test"), ("c", "test")]
    with caplog.at_level(logging.WARNING):
        splits = build_splits(_split_csv(tmp_path, rows), Preprocessing()).splits
    assert (len(splits.train), len(splits.test)) == (3, 2)
    assert (
        "1 class(es) have test images but no training image, so the model cannot learn them: c"
    ) in caplog.text


def test_no_test_rows_is_one_line_that_says_why(tmp_path):
    config = _split_csv(tmp_path, [("a", "train"), ("b", "train")])
    with pytest.raises(ValueError, match=r"the test split is empty \(none of its images is "):
        build_splits(config, Preprocessing())


def test_too_few_images_for_the_test_share_says_what_to_raise(tmp_path):
    path = csv_dataset(tmp_path, ["cat", "dog"])
    config = DataConfig(dataset="csv", data=str(path), val_fraction=0, test_fraction=0.2)
    with pytest.raises(ValueError, match=r"raise --test-fraction or --max-per-class"):
        build_splits(config, Preprocessing())
    none = dataclasses.replace(config, test_fraction=0.0)
    with pytest.raises(ValueError, match=r"a test share of 0 holds no images: give --test-"):
        build_splits(none, Preprocessing())


def test_csv_missing_image_is_reported_with_its_line(tmp_path):
    path = csv_dataset(tmp_path, ["cat", "dog", "cat", "dog"])
    (tmp_path / "images" / "2.png").unlink()
    with pytest.raises(BadDataError, match=r"images/2\.png \(labels\.csv:4\): file not found"):
        build_splits(DataConfig(dataset="csv", data=str(path)), Preprocessing())


def test_csv_missing_image_skipped_is_cached_until_it_comes_back(tmp_path):
    path = csv_dataset(tmp_path, ["cat", "dog"] * 5)
    image = tmp_path / "images" / "2.png"
    data = image.read_bytes()
    image.unlink()
    config = DataConfig(dataset="csv", data=str(path), on_bad_image="skip", val_fraction=0)
    first = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert first.problems == ["images/2.png (labels.csv:4): file not found in the source"]
    second = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert second.from_cache and second.problems == first.problems
    image.write_bytes(data)  # Back again: the listing changes, so the images are decoded.
    third = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert not third.from_cache and third.problems == []


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_a_dangling_link_in_a_folder_skipped_is_cached_until_it_is_mended(tmp_path):
    root = folder_dataset(tmp_path / "data")
    target = tmp_path / "elsewhere.png"
    (root / "cat" / "link.png").symlink_to(target)  # Its file is not there.
    config = folder_config(root, on_bad_image="skip", val_fraction=0)
    first = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert [problem.split(": ")[-1] for problem in first.problems] == [
        "file not found in the source"
    ]
    second = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert second.from_cache and second.problems == first.problems
    write_image(target)  # The link leads to an image now: the images are decoded again.
    third = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert not third.from_cache and third.problems == []


def test_csv_image_gone_for_a_moment_is_not_cached_as_missing(tmp_path):
    path = csv_dataset(tmp_path, ["cat", "dog"] * 5)
    image = tmp_path / "images" / "2.png"
    moved = tmp_path / "2.png.moving"
    source = CsvSource(path)
    listing = source.list_samples()  # The file is there when listed...
    image.rename(moved)  # ...and gone while the images are read.
    first = load_images(source, listing, Preprocessing(), tmp_path / "cache", workers=1)
    assert first.unreadable == 1 and not first.valid[2]
    moved.rename(image)  # Back, with the same size and time: the listing is the same.
    second = load_images(source, source.list_samples(), Preprocessing(), tmp_path / "cache")
    assert not second.from_cache and second.valid.all()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
@pytest.mark.parametrize("dataset", ["folder", "csv"])
def test_fifos_and_folders_named_like_images_are_reported_not_waited_on(tmp_path, dataset):
    if dataset == "folder":
        folder_dataset(tmp_path)
        pipe, folder = tmp_path / "cat" / "pipe.png", tmp_path / "dog" / "folder.png"
        config = folder_config(tmp_path)
    else:
        path = csv_dataset(tmp_path, ["cat", "dog"] * 5)
        pipe, folder = tmp_path / "images" / "0.png", tmp_path / "images" / "1.png"
        pipe.unlink()
        folder.unlink()
        config = DataConfig(dataset="csv", data=str(path))
    os.mkfifo(pipe)
    folder.mkdir()
    if dataset == "folder":  # a folder named like an image is walked into, not listed
        (folder / "inner.png").write_bytes(b"")
    with pytest.raises(BadDataError, match="bad image") as error:
        within_seconds(30, lambda: build_splits(config, Preprocessing()))
    assert pipe.relative_to(tmp_path).as_posix() in str(error.value)
    skipped = within_seconds(
        30, lambda: build_splits(dataclasses.replace(config, on_bad_image="skip"), Preprocessing())
    )
    assert len(skipped.problems) == 2
    assert len(skipped.splits.train) + len(skipped.splits.test) == 8


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_paths_that_are_no_files_are_named_with_the_reason_and_cached(tmp_path):
    path = csv_dataset(tmp_path, ["cat", "dog"] * 5)
    pipe, folder = tmp_path / "images" / "0.png", tmp_path / "images" / "1.png"
    pipe.unlink()
    folder.unlink()
    os.mkfifo(pipe)
    folder.mkdir()
    config = DataConfig(dataset="csv", data=str(path), on_bad_image="skip", val_fraction=0)
    first = within_seconds(30, lambda: build_splits(config, Preprocessing(), tmp_path / "cache"))
    assert first.problems == [
        "images/0.png (labels.csv:2): cannot read (not a regular file)",
        "images/1.png (labels.csv:3): cannot read (not a regular file)",
    ]
    second = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert second.from_cache and second.problems == first.problems


def test_a_permission_denied_is_named_and_not_cached(tmp_path, monkeypatch):
    path = csv_dataset(tmp_path, ["cat", "dog"] * 5)
    denied = (tmp_path / "images" / "2.png").resolve()
    read = files.read_regular_file

    def refuse(file):  # chmod would not stop root, who may run the tests.
        if Path(file).resolve() == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return read(file)

    monkeypatch.setattr(files, "read_regular_file", refuse)
    config = DataConfig(dataset="csv", data=str(path), on_bad_image="skip", val_fraction=0)
    first = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert first.problems == ["images/2.png (labels.csv:4): cannot read (Permission denied)"]
    monkeypatch.undo()  # Permission granted: the file is read, as nothing was cached.
    second = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert not second.from_cache and second.problems == []


@PROPERTY_SETTINGS
@given(
    labels=st.lists(class_names, min_size=1, max_size=6),
    newline=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
    extra=st.booleans(),
    bad_row=st.one_of(st.none(), st.integers(0, 5)),
)
def test_csv_property_quirks_and_bad_rows(tmp_path_factory, labels, newline, bom, extra, bad_row):
    root = tmp_path_factory.mktemp("csv")
    rows = [["path", "label"] + (["comment, quoted"] if extra else [])]
    for index, label in enumerate(labels):
        rows.append([f"./{index}.png", label] + (["x,y"] if extra else []))
    if bad_row is not None:
        position = 1 + min(bad_row, len(labels))
        rows.insert(position, ["../escape.png", "bad"] + (["z"] if extra else []))
    path = write_csv(root / "list.csv", rows, newline=newline, bom=bom)
    source = CsvSource(path)
    if bad_row is not None:
        with pytest.raises(DataFormatError, match=rf"list\.csv:{position + 1}: "):
            source.list_samples()
        return
    listing = source.list_samples()
    assert listing.class_names == sorted(set(labels))
    assert [listing.class_names[r.label] for r in listing.records] == labels
    assert [r.origin for r in listing.records] == [f"list.csv:{i + 2}" for i in range(len(labels))]


def test_a_path_listed_twice_with_two_labels_names_both_as_written(tmp_path):
    write_image(tmp_path / "0.png")
    path = write_csv(
        tmp_path / "labels.csv", [["path", "label"], ["0.png", "\\pi"], ["0.png", "\\alpha"]]
    )
    with pytest.raises(DataFormatError) as raised:
        CsvSource(path).list_samples()
    assert str(raised.value) == (f'{path}:3: "0.png" is listed as "\\alpha" but line 2 says "\\pi"')
    # Listed twice with one label, and a split cell left empty the second time.
    rows = [["path", "label", "split"], ["0.png", "A", "train"], ["0.png", "A", ""]]
    path = write_csv(tmp_path / "splits.csv", rows)
    with pytest.raises(DataFormatError) as raised:
        CsvSource(path).list_samples()
    assert str(raised.value) == (
        f'{path}:3: "0.png" is listed as "A" (no split) but line 2 says "A" (train)'
    )


# Splits.


@pytest.mark.parametrize(("fraction", "held"), [(0.05, 0), (0.15, 2), (0.25, 2), (0.35, 4)])
def test_a_class_share_rounds_half_to_even(fraction, held) -> None:
    labels = np.repeat([0, 1], 10)
    _, second = stratified_split(labels, fraction, seed=0)
    assert np.bincount(labels[second], minlength=2).tolist() == [held, held]


def test_without_copies_grouping_leaves_the_split_as_it_was() -> None:
    labels = np.repeat(np.arange(5), 9)
    plain = stratified_split(labels, 0.3, seed=4)
    grouped = stratified_split(labels, 0.3, seed=4, groups=np.arange(len(labels)))
    for a, b in zip(plain, grouped, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(np.concatenate(plain).tolist()) == list(range(len(labels)))


def test_copies_of_an_image_stay_in_one_split(tmp_path, caplog) -> None:
    """Byte-identical files (downloaded twice, re-exported) would score the model on images
    it trained on."""
    for offset, name in enumerate(("cat", "dog")):
        for index in range(10):
            write_image(tmp_path / name / f"{index}.png", shade=2 * index + offset)
            copy = tmp_path / name / f"{index}_copy.png"
            copy.write_bytes((tmp_path / name / f"{index}.png").read_bytes())
    config = folder_config(tmp_path, test_fraction=0.2, val_fraction=0.2)
    with caplog.at_level(logging.INFO, logger="cnnkit.data.sources"):
        splits = build_splits(config, Preprocessing()).splits
    assert any(
        "20 image(s) repeat another pixel for pixel" in r.getMessage() for r in caplog.records
    )
    seen = [
        {image.tobytes() for image in np.asarray(part.images)}
        for part in (splits.train, splits.val, splits.test)
    ]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(splits.test) == 8 and len(splits.val) == 8 and len(splits.train) == 24


def test_duplicate_groups_name_the_first_copy() -> None:
    images = np.array([[1], [2], [1], [3], [2]], dtype=np.uint8)
    assert duplicate_groups(images).tolist() == [0, 1, 0, 3, 1]
    assert duplicate_groups(images, np.array([1, 2, 4])).tolist() == [0, 1, 0]
    photos = np.zeros((3, 5, 7, 3), dtype=np.uint8)  # 105 bytes: not whole 8-byte words
    photos[1, 4, 6, 2] = 1
    assert duplicate_groups(photos).tolist() == [0, 1, 0]


def test_a_split_that_copies_leave_empty_says_so(tmp_path, caplog) -> None:
    """A class of copies of one image counts as one image: no share can move it to test."""
    for offset, name in enumerate(("cat", "dog")):
        write_image(tmp_path / name / "0.png", shade=offset)
        for index in range(1, 6):
            (tmp_path / name / f"{index}.png").write_bytes((tmp_path / name / "0.png").read_bytes())
    with pytest.raises(ValueError, match="10 image.s. are copies of others.*or add distinct"):
        build_splits(folder_config(tmp_path, test_fraction=0.9), Preprocessing())
    rows = [["path", "label", "split"]]
    for name in ("cat", "dog"):
        rows += [[f"{name}/{i}.png", name, "test" if i == 0 else "train"] for i in range(6)]
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    config = DataConfig(dataset="csv", data=str(csv_path), val_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="cnnkit.data.sources"):
        splits = build_splits(config, Preprocessing()).splits
    assert splits.val is None or len(splits.val) == 0
    assert any(
        "the validation split is empty" in r.getMessage() and "no early stopping" in r.getMessage()
        for r in caplog.records
    )
