"""CubSource on tiny synthetic CUB-200-2011 layouts and on the dev copy."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import non_utf8_path

from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.cache import load_images
from cnnkit.data.cub import CubSource, species_name
from cnnkit.data.listings import limit_listing
from cnnkit.data.source import DataFormatError
from cnnkit.data.sources import build_splits

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CUB_DEV = SHARED_DATA / "CUB_200_2011-dev.tgz"
CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
PHOTO = Preprocessing(
    mode="photo", channels=3, image_size=16, stored_size=16, mean=(0, 0, 0), std=(1, 1, 1)
)


def jpeg_bytes(width: int = 40, height: int = 30, box: tuple[int, ...] | None = None) -> bytes:
    """A white photo; with ``box`` the box area is pure red."""
    array = np.full((height, width, 3), 255, dtype=np.uint8)
    if box is not None:
        x, y, box_width, box_height = box
        array[y : y + box_height, x : x + box_width] = (255, 0, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def cub_files() -> dict[str, bytes]:
    """Classes 1 and 3 of 3 have photos (2 train, 1 test each); class 2 has none."""
    files: dict[str, bytes] = {}
    images, labels, splits, boxes = [], [], [], []
    image_id = 0
    for class_id in (3, 1):
        folder = CLASSES[class_id - 1]
        for number in range(3):
            image_id += 1
            path = f"{folder}/photo_{number}.jpg"
            box = (10, 5, 20, 15)
            files[f"images/{path}"] = jpeg_bytes(box=box)
            images.append(f"{image_id} {path}")
            labels.append(f"{image_id} {class_id}")
            splits.append(f"{image_id} {int(number < 2)}")
            boxes.append(f"{image_id} {' '.join(f'{v}.0' for v in box)}")
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", splits),
        ("bounding_boxes.txt", boxes),
        ("classes.txt", [f"{index} {name}" for index, name in enumerate(CLASSES, 1)]),
    ):
        files[name] = ("\n".join(lines) + "\n").encode()
    return files


def write_tgz(path: Path, files: dict[str, bytes], top: str = "CUB_200_2011/") -> Path:
    # As in the official archive, the photos come before the metadata files.
    names = sorted(files, key=lambda name: (not name.startswith("images/"), name))
    with tarfile.open(path, "w:gz") as archive:
        for name in names:
            info = tarfile.TarInfo(top + name)
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
    return cub_files()


def test_species_name_drops_the_number_and_underscores():
    assert species_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert species_name("Chuck_will_Widow") == "Chuck will Widow"


@pytest.mark.parametrize("layout", ["archive", "archive without top", "folder", "folder/top"])
def test_layouts_list_classes_in_id_order_relabelled_densely(tmp_path, files, layout):
    path = {
        "archive": lambda: write_tgz(tmp_path / "cub.tgz", files),
        "archive without top": lambda: write_tgz(tmp_path / "cub.tgz", files, top=""),
        "folder": lambda: write_folder(tmp_path / "cub", files),
        "folder/top": lambda: write_folder(tmp_path / "cub" / "CUB_200_2011", files).parent,
    }[layout]()
    source = CubSource(path)
    listing = source.list_samples()
    assert listing.class_names == ["Black footed Albatross", "Sooty Albatross"]
    assert [record.label for record in listing.records] == [1, 1, 1, 0, 0, 0]
    assert Counter(record.split for record in listing.records) == {"train": 4, "test": 2}
    first = listing.records[0]
    assert first.key == "images/003.Sooty_Albatross/photo_0.jpg"
    assert (first.origin, first.box) == ("images.txt:1", None)
    streamed = dict(source.iter_bytes([record.key for record in listing.records]))
    assert streamed == {name: data for name, data in files.items() if name.startswith("images/")}


def test_crop_to_bbox_sets_and_applies_the_box(tmp_path, files):
    source = CubSource(write_tgz(tmp_path / "cub.tgz", files), crop_to_bbox=True)
    listing = source.list_samples()
    assert {record.box for record in listing.records} == {(10.0, 5.0, 20.0, 15.0)}
    decoded = load_images(source, listing, PHOTO, None, workers=1)
    red = decoded.images[..., 0].astype(int) - decoded.images[..., 1]
    assert decoded.valid.all() and red.mean() > 200
    uncropped = CubSource(write_tgz(tmp_path / "cub.tgz", files))
    plain = load_images(uncropped, uncropped.list_samples(), PHOTO, None, workers=1)
    assert (plain.images[..., 0].astype(int) - plain.images[..., 1]).mean() < 200


def test_a_bounding_box_mostly_outside_its_photo_is_named_not_cropped_black(tmp_path, files):
    edit(files, "bounding_boxes.txt", 2, "2 30.0 20.0 40.0 30.0")  # On a 40x30 photo.
    edit(files, "bounding_boxes.txt", 3, "3 10.0 10.0 0.4 12.0")  # Under a pixel wide.
    source = CubSource(write_folder(tmp_path / "cub", files), crop_to_bbox=True)
    decoded = load_images(source, source.list_samples(), PHOTO, None, workers=1)
    assert decoded.valid.tolist() == [True, False, False, True, True, True]
    assert len(decoded.problems) == 2
    assert (
        "photo_1.jpg (images.txt:2): the bounding box (x 30, y 20, 40 x 30) lies mostly "
        in (decoded.problems[0])
    )
    assert decoded.problems[0].endswith("outside the 40x30 image")
    assert "photo_2.jpg (images.txt:3): the bounding box" in decoded.problems[1]


def test_trailing_whitespace_in_the_metadata_is_no_value(tmp_path, files):
    for name in ("images.txt", "train_test_split.txt", "image_class_labels.txt"):
        files[name] = files[name].replace(b"\n", b" \t\n")
    listing = CubSource(write_folder(tmp_path / "cub", files)).list_samples()
    assert [record.key for record in listing.records][0] == (
        "images/003.Sooty_Albatross/photo_0.jpg"
    )
    assert [record.split for record in listing.records] == ["train", "train", "test"] * 2


def test_build_splits_follows_the_official_split(tmp_path, files):
    config = DataConfig(dataset="cub", data=str(write_tgz(tmp_path / "c.tgz", files)))
    loaded = build_splits(config, PHOTO, cache_dir=tmp_path / "cache")
    splits = loaded.splits
    assert (len(splits.train) + (len(splits.val) if splits.val else 0), len(splits.test)) == (4, 2)
    assert splits.class_names == ["Black footed Albatross", "Sooty Albatross"]


def test_a_folder_at_a_path_that_is_not_utf8_is_listed_and_cached(tmp_path, files):
    folder = write_folder(non_utf8_path(tmp_path, b"caf\xe9"), files)
    config = DataConfig(dataset="cub", data=str(folder))
    first = build_splits(config, Preprocessing(), tmp_path / "cache")
    second = build_splits(config, Preprocessing(), tmp_path / "cache")
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.splits.test.paths == first.splits.test.paths


def edit(files: dict[str, bytes], name: str, line: int, text: str | None) -> None:
    """Replace (or with None, delete) one line of a metadata file."""
    lines = files[name].decode().splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    files[name] = ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    ("name", "line", "text", "expected"),
    [
        ("image_class_labels.txt", 2, None, r"images\.txt:2: image id 2 has no line in image_"),
        ("train_test_split.txt", 6, None, r"images\.txt:6: image id 6 has no line in train_"),
        ("image_class_labels.txt", 2, "99 3", r"image_class_labels\.txt:2: image id 99 is not"),
        ("image_class_labels.txt", 2, "2 7", r"image_class_labels\.txt:2: class id 7 is not"),
        ("train_test_split.txt", 3, "3 2", r"train_test_split\.txt:3: expected 1 or 0"),
        ("bounding_boxes.txt", 4, "4 1 2 3", r"bounding_boxes\.txt:4: expected an id and 4"),
        ("bounding_boxes.txt", 4, "4 1 2 0 5", r"bounding_boxes\.txt:4: invalid box"),
        ("images.txt", 5, "4 other.jpg", r"images\.txt:5: id 4 repeats line 4"),
        ("images.txt", 5, "x other.jpg", r"images\.txt:5: id must be an integer"),
        ("images.txt", 5, "5 ../../../etc/passwd", r"images\.txt:5: .*refused"),
    ],
)
def test_inconsistent_metadata_names_file_and_line(tmp_path, files, name, line, text, expected):
    edit(files, name, line, text)
    source = CubSource(write_folder(tmp_path / "cub", files), crop_to_bbox=True)
    with pytest.raises(DataFormatError, match=expected):
        source.list_samples()


def test_missing_metadata_and_missing_photos(tmp_path, files):
    del files["bounding_boxes.txt"]
    archive = write_tgz(tmp_path / "cub.tgz", files)
    assert len(CubSource(archive).list_samples().records) == 6
    with pytest.raises(DataFormatError, match="has no bounding_boxes.txt"):
        CubSource(archive, crop_to_bbox=True).list_samples()
    del files["images/001.Black_footed_Albatross/photo_1.jpg"]
    config = DataConfig(
        dataset="cub", data=str(write_tgz(tmp_path / "c.tgz", files)), on_bad_image="skip"
    )
    loaded = build_splits(config, PHOTO)
    assert loaded.problems == [
        "images/001.Black_footed_Albatross/photo_1.jpg (images.txt:5): file not found in the source"
    ]


needs_cub = pytest.mark.skipif(
    not CUB_DEV.is_file(), reason=f"real CUB-200-2011 dev archive not found at {CUB_DEV}"
)


@pytest.mark.realdata
@needs_cub
def test_real_cub_listing_and_a_small_decode():
    source = CubSource(CUB_DEV, crop_to_bbox=True)
    listing = source.list_samples()
    assert len(listing.records) == 1_701
    assert len(listing.class_names) == 30
    assert listing.class_names[0] == "Black footed Albatross"
    assert not any(name[:1].isdigit() or "_" in name for name in listing.class_names)
    assert Counter(record.split for record in listing.records) == {"train": 900, "test": 801}
    assert all(record.box is not None for record in listing.records)
    limited = limit_listing(listing, max_classes=1, max_per_class=5)
    decoded = load_images(source, limited, PHOTO, None, workers=1)
    assert decoded.problems == [] and decoded.images.shape == (10, 16, 16, 3)
