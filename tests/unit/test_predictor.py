"""Tests for the Predictor: any input kind, ranking, and preprocessing identical to training."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnkit.config import DataConfig, Preprocessing
from cnnkit.data.image import BadImageError
from cnnkit.data.loader import BatchLoader, build_eval_transform
from cnnkit.data.prepare import prepare_image
from cnnkit.data.sources import build_splits
from cnnkit.inference.artifact import ModelFileError, ModelMetadata
from cnnkit.inference.predictor import Prediction, Predictor, open_predictor
from cnnkit.models.registry import create_model

CLASS_NAMES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def predictor(symbol_model_file: Path) -> Predictor:
    return Predictor.from_file(symbol_model_file)


def _image(mode: str, size: tuple[int, int] = (20, 30), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        deep = (rng.integers(0, 65536, (size[1], size[0]))).astype(np.uint16)
        return Image.fromarray(deep)
    return rgb.convert(mode)


def _check_ranking(ranked: list[Prediction], top_k: int) -> None:
    assert len(ranked) == top_k
    confidences = [p.confidence for p in ranked]
    assert confidences == sorted(confidences, reverse=True)
    assert all(0 <= c <= 1 for c in confidences)
    for prediction in ranked:
        assert prediction.label == CLASS_NAMES[prediction.index]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "LA"])
@pytest.mark.parametrize("size", [(1, 1), (20, 30), (300, 7)])
def test_predicts_pil_images_of_any_mode_and_size(predictor, mode, size) -> None:
    image = _image(mode, size)
    ranked = predictor.predict([image], top_k=3)
    assert len(ranked) == 1
    _check_ranking(ranked[0], 3)
    assert sum(p.confidence for p in ranked[0]) == pytest.approx(1.0, abs=1e-5)
    # The ranking is the model's for this very image, converted as training stored it.
    prepared = prepare_image(image, predictor.metadata.preprocessing)
    assert prepared.shape == (32, 32, 1) and prepared.dtype == np.uint8
    probabilities = predictor.probabilities(np.stack([prepared]))[0]
    assert [p.index for p in ranked[0]] == list(np.argsort(-probabilities, kind="stable"))
    # The tiny model's classes differ by about 1e-4: the tolerance is well below that.
    assert [p.confidence for p in ranked[0]] == pytest.approx(
        sorted(probabilities.tolist(), reverse=True), abs=1e-7
    )
    # And the model does look at its input: the negative image scores otherwise.
    negative = predictor.probabilities(np.stack([255 - prepared]))[0]
    assert np.abs(negative - probabilities).max() > 1e-6


def test_paths_pil_images_and_arrays_agree(predictor, tmp_path: Path) -> None:
    image = _image("RGB")
    path = tmp_path / "symbol.png"
    image.save(path)
    inputs = [path, str(path), image, np.asarray(image), np.asarray(image.convert("L"))]
    results = predictor.predict(inputs, top_k=2)
    assert len(results) == 5
    for ranked in results[1:4]:
        assert ranked == results[0]
    gray = predictor.predict([image.convert("L")], top_k=2)[0]
    assert results[4] == gray
    # H x W x 1, the shape of a stored grayscale image, is the same grayscale image.
    assert predictor.predict([np.asarray(image.convert("L"))[:, :, None]], top_k=2)[0] == gray
    rgba = np.dstack([np.asarray(image), np.full((30, 20), 255, np.uint8)])
    assert predictor.predict([rgba], top_k=2)[0] == results[0]


def test_top_k_beyond_the_classes_gives_all_and_below_one_is_refused(predictor) -> None:
    image = _image("L")
    _check_ranking(predictor.predict([image], top_k=100)[0], 3)
    for bad in (0, -4, 2.5, None, True):
        with pytest.raises(ValueError, match="top_k must be a whole number >= 1"):
            predictor.predict([image], top_k=bad)


def test_a_single_image_of_any_kind_is_one_image(predictor, tmp_path: Path) -> None:
    image = _image("RGB")
    path = tmp_path / "symbol.png"
    image.save(path)
    expected = predictor.predict([image], top_k=2)
    array = np.asarray(image)
    for single in (path, str(path), path.read_bytes(), image, array):
        assert predictor.predict(single, top_k=2) == expected
    channel = array[:, :, :1]  # H x W x 1 is one grayscale image.
    assert predictor.predict(channel, top_k=2) == predictor.predict([channel[:, :, 0]], top_k=2)
    gray = np.asarray(image.convert("L"))
    assert predictor.predict(gray, top_k=2) == predictor.predict([gray], top_k=2)
    # An N x H x W x C array is a batch of N.
    assert predictor.predict(np.stack([array, array]), top_k=2) == expected * 2
    with pytest.raises(ValueError, match=r"shape \(2, 30, 20\).*pass a list"):
        predictor.predict(np.stack([gray, gray]))


def test_arrays_follow_their_type(predictor) -> None:
    gray = np.asarray(_image("L", seed=3))
    expected = predictor.prepare(gray)
    assert np.array_equal(predictor.prepare(gray / 255.0), expected)  # floats span 0-1
    as_float_image = Image.fromarray((gray / 255.0).astype(np.float32))  # PIL mode F
    assert np.array_equal(predictor.prepare(as_float_image), expected)
    on_255_scale = Image.fromarray(gray.astype(np.float32))  # mode F holding 0-255
    assert np.array_equal(predictor.prepare(on_255_scale), expected)
    assert np.array_equal(predictor.prepare(gray.astype(np.int64)), expected)
    assert np.array_equal(predictor.prepare(gray.astype(np.uint16) * 257), expected)
    big_endian = (gray.astype(np.uint16) * 257).astype(">u2")
    assert np.array_equal(predictor.prepare(big_endian), expected)
    white = predictor.prepare(np.ones((4, 4), dtype=bool))
    assert (white == 255).all()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.full((8, 8), 2.0), r"image 0: a float image must lie in 0-1; got 2 to 2"),
        (np.full((8, 8), np.nan), r"image 0: the array holds NaN"),
        (np.full((8, 8), 300), r"image 0: integer pixels must lie in 0-255"),
        (np.zeros((8, 8, 2), np.uint8), r"image 0: an image array must be H x W or H x W x 1"),
        (np.zeros(8, np.uint8), r"image 0: an image array must be H x W"),
        (np.zeros((0, 8), np.uint8), r"image 0: empty image"),
        (Image.new("L", (0, 0)), r"image 0: empty image \(0x0 pixels\)"),
        (np.zeros((8, 8), np.complex64), r"image 0: unsupported array type complex64"),
    ],
)
def test_bad_arrays_get_one_clear_line(predictor, value, message) -> None:
    with pytest.raises(BadImageError, match=message):
        predictor.predict([value])


def test_other_inputs_are_refused_by_type_and_position(predictor) -> None:
    with pytest.raises(TypeError, match="image 1: expected a path.*got NoneType"):
        predictor.predict([_image("L"), None])


@pytest.mark.parametrize(
    "images", [5, None, 2.5, {"a.png": 1}, {"a.png"}], ids=["int", "None", "float", "dict", "set"]
)
def test_what_is_neither_an_image_nor_a_list_of_them_is_refused_by_type(predictor, images) -> None:
    expected = (
        r"^images: expected a path, image bytes, a binary file, a PIL image or a numpy array, "
        rf"or a list of them; got {type(images).__name__}$"
    )
    with pytest.raises(TypeError, match=expected):
        predictor.predict(images)
    with pytest.raises(TypeError, match=expected):
        predictor.prepare(images)


def test_any_bytes_like_object_is_one_encoded_image(predictor, tmp_path: Path) -> None:
    path = tmp_path / "symbol.png"
    _image("RGB").save(path)
    data = path.read_bytes()
    expected = predictor.predict(data, top_k=2)
    for encoded in (bytearray(data), memoryview(data)):
        assert predictor.predict(encoded, top_k=2) == expected
        assert predictor.predict([encoded, data], top_k=2) == expected * 2
    # An iterator is still a list of images, in order.
    assert predictor.predict(iter([data, path]), top_k=2) == expected * 2


def test_an_open_binary_file_is_one_image_and_a_text_file_is_refused(
    predictor, tmp_path: Path
) -> None:
    path = tmp_path / "symbol.png"
    _image("RGB").save(path)
    expected = predictor.predict(path, top_k=2)
    # Not a list of its lines of bytes: the file is read as one encoded image.
    assert predictor.predict(io.BytesIO(path.read_bytes()), top_k=2) == expected
    with path.open("rb") as first, path.open("rb") as second:
        assert predictor.predict([first, second], top_k=2) == expected * 2
        with pytest.raises(BadImageError, match="symbol.png: nothing left to read \\(the file"):
            predictor.predict(first)  # Read already.
    with path.open("rb") as partly_read:
        partly_read.read(8)  # What is left is no image, and the error names the file.
        with pytest.raises(BadImageError, match=f"^{re.escape(str(path))}: not a readable"):
            predictor.predict(partly_read)
    refused = pytest.raises(TypeError, match=r"symbol.png: a file opened as text; open it in")
    with path.open(encoding="latin-1") as text, refused:
        predictor.predict(text)


def test_a_name_no_file_can_have_is_a_bad_image_naming_it(predictor) -> None:
    with pytest.raises(BadImageError, match=r"^'a\\x00.png': cannot read \(embedded null"):
        predictor.predict("a\x00.png")
    with pytest.raises(BadImageError, match=r"^'': cannot read \(No such file"):
        predictor.predict("")


def test_sixteen_bit_images_span_the_full_range(predictor) -> None:
    dark = np.full((8, 8), 255, dtype=np.uint16)  # Nearly black on a 0-65535 scale.
    brighter = dark.copy()
    brighter[0, 0] = 256
    first = predictor.prepare(Image.fromarray(dark))
    second = predictor.prepare(Image.fromarray(brighter))
    assert first.max() == 1 and np.abs(first.astype(int) - second).max() <= 1


def test_from_file_takes_a_run_folder_or_nothing_and_refuses_onnx(
    symbol_model_file: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(symbol_model_file.read_bytes())
    assert Predictor.from_file(run).class_names == CLASS_NAMES
    assert len(Predictor.from_file().class_names) == 369  # The bundled symbol model.
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"model\.onnx: an ONNX file runs on ONNX Runtime"):
        Predictor.from_file(onnx_file)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Predictor.from_file(symbol_model_file, device="gpu")


@pytest.mark.parametrize("backend", ["tensorflow", "ONNX", "Torch", "", 1])
def test_open_predictor_refuses_an_unknown_backend(symbol_model_file: Path, backend) -> None:
    with pytest.raises(ValueError, match=r"unknown backend .*: use 'torch' or 'onnx'"):
        open_predictor(symbol_model_file, backend=backend)


def test_open_predictor_runs_the_backend_it_is_given(symbol_model_file: Path) -> None:
    assert type(open_predictor(symbol_model_file)) is Predictor
    assert type(open_predictor(symbol_model_file, backend="torch")) is Predictor


def test_a_column_of_paths_or_files_is_a_list_of_images(predictor, tmp_path: Path) -> None:
    """``df["path"].values``: a 1-D array of paths (or of encoded files) is one image each."""
    paths = []
    for index, shade in enumerate((0, 255)):
        paths.append(tmp_path / f"{index}.png")
        Image.new("L", (32, 32), shade).save(paths[-1])
    expected = predictor.predict([str(path) for path in paths])
    assert predictor.predict(np.array([str(path) for path in paths])) == expected
    encoded = np.array([path.read_bytes() for path in paths], dtype=object)
    assert predictor.predict(encoded) == expected


def test_a_closed_pil_image_is_named_as_closed(predictor) -> None:
    image = Image.new("L", (32, 32), 255)
    image.close()
    with pytest.raises(BadImageError, match=r"^image 0: the PIL image is closed"):
        predictor.predict(image)


@pytest.mark.parametrize("threads", ["2", 0, -1, 1.5, True])
def test_open_predictor_refuses_a_thread_count_that_is_not_a_whole_number(
    symbol_model_file: Path, threads
) -> None:
    """Before any file is opened: a bad count is not a broken model file."""
    for backend in ("torch", "onnx"):
        with pytest.raises(ValueError, match=r"threads must be a whole number >= 1"):
            open_predictor(symbol_model_file, backend=backend, threads=threads)


def test_empty_input_and_bad_files(predictor, tmp_path: Path) -> None:
    assert predictor.predict([]) == []
    assert predictor.probabilities(predictor.prepare([])).shape == (0, 3)
    with pytest.raises(BadImageError, match="missing.png"):
        predictor.predict([tmp_path / "missing.png"])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="junk.png"):
        predictor.predict([junk])


def test_an_image_turned_upright_is_not_turned_again() -> None:
    """An export from a photo editor carries its orientation in EXIF and in XMP: once turned,
    the image holds neither, so a second look (the web path's, then prepare_image's) leaves it."""
    from PIL import PngImagePlugin

    from cnnkit.data.prepare import upright

    text = PngImagePlugin.PngInfo()
    text.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta tiff:Orientation="6"/>')
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("L", (30, 20), 255).save(buffer, "PNG", pnginfo=text, exif=exif.tobytes())
    for without_exif in (False, True):
        with Image.open(io.BytesIO(buffer.getvalue())) as image:
            image.load()
            if without_exif:
                del image.info["exif"]  # The XMP alone still turns it.
            turned = upright(image)
        assert turned.size == (20, 30)
        assert upright(turned).size == (20, 30)


def test_a_png_with_a_corrupt_exif_block_is_predicted_from_its_pixels(predictor, tmp_path) -> None:
    plain, corrupt = tmp_path / "plain.png", tmp_path / "corrupt-exif.png"
    _image("RGB").save(plain)
    data = plain.read_bytes()
    garbage = b"garbage!garbage!"  # Pillow reads it as TIFF: "not a TIFF file".
    chunk = struct.pack(">I", len(garbage)) + b"eXIf" + garbage
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + garbage))
    corrupt.write_bytes(data[:33] + chunk + data[33:])
    ranked = predictor.predict([corrupt, plain], top_k=3)
    assert ranked[0] == ranked[1] == predictor.predict([plain], top_k=3)[0]


def test_probabilities_are_the_softmax_of_the_model(predictor) -> None:
    prepared = predictor.prepare([_image("L", seed=1), _image("RGB", seed=2)])
    assert prepared.shape == (2, 32, 32, 1) and prepared.dtype == np.uint8
    with torch.no_grad():
        logits = predictor.model(predictor.model_input(prepared))
    expected = torch.softmax(logits, dim=1).numpy()
    assert np.allclose(predictor.probabilities(prepared), expected, atol=1e-6)
    assert predictor.class_names == CLASS_NAMES
    assert Prediction("a", 0, 0.5).to_dict() == {"label": "a", "index": 0, "confidence": 0.5}


def _write_folder_dataset(root: Path) -> None:
    """Two classes of awkward files: modes, sizes, alpha, 16-bit and JPEG."""
    rng = np.random.default_rng(7)
    for label, name in enumerate(["cats", "dogs"]):
        folder = root / name
        folder.mkdir(parents=True)
        for index, mode in enumerate(["RGB", "L", "RGBA", "P", "I;16", "CMYK"]):
            size = (int(rng.integers(5, 70)), int(rng.integers(5, 70)))
            image = _image(mode, size, seed=label * 10 + index)
            extension = "jpg" if mode in ("CMYK", "L") and label == 0 else "png"
            if mode == "CMYK" and extension == "png":
                image = image.convert("RGB")
            image.save(folder / f"{index}-{mode.replace(';', '')}.{extension}")


# Every model kind: symbols at 1 and 3 channels, the book's bird CNN, and each pretrained
# backbone with its own input size and normalisation.
MODEL_KINDS = [
    ("symbol_cnn", 1),
    ("symbol_cnn", 3),
    ("book_cnn", 3),
    ("book_bird_cnn", 3),
    ("efficientnet_lite0", 3),
    ("efficientnet_lite1", 3),
    ("efficientnet_lite2", 3),
]


@pytest.mark.parametrize(
    ("architecture", "channels"), MODEL_KINDS, ids=[f"{a}-{c}ch" for a, c in MODEL_KINDS]
)
@pytest.mark.parametrize("cached", [False, True], ids=["decoded", "cached"])
def test_file_preprocessing_equals_the_training_pipeline(
    tmp_path: Path, architecture: str, channels: int, cached: bool
) -> None:
    preprocessing = create_model(architecture, 2, channels).default_preprocessing
    assert preprocessing.channels == channels
    root = tmp_path / "data"
    _write_folder_dataset(root)
    config = DataConfig(dataset="folder", data=str(root), val_fraction=0.0, test_fraction=0.3)
    cache_dir = tmp_path / "cache" if cached else None
    splits = build_splits(config, preprocessing, cache_dir=cache_dir).splits
    if cached:  # Read the entry back from the cache, as a second run would.
        splits = build_splits(config, preprocessing, cache_dir=cache_dir).splits
    images = splits.train
    loader = BatchLoader(images, 64, build_eval_transform(preprocessing))
    training_inputs = torch.cat([inputs for inputs, _ in loader])

    metadata = ModelMetadata(architecture, tuple(splits.class_names), preprocessing)
    predictor = Predictor(nn.Identity(), metadata)
    paths = [root / key for key in images.paths]
    prepared = predictor.prepare(paths)
    assert np.array_equal(prepared, np.asarray(images.images))
    predictor_inputs = predictor.model_input(prepared)
    assert predictor_inputs.shape == training_inputs.shape
    assert torch.equal(predictor_inputs, training_inputs)


def test_eval_batches_shrink_for_large_inputs() -> None:
    from cnnkit.data.loader import eval_batch_size

    assert eval_batch_size(512, Preprocessing("symbol", 1, 32, 32, (0.5,), (0.5,))) == 512
    photo = Preprocessing("photo", 3, 240, 272, (0.5,) * 3, (0.5,) * 3)
    assert eval_batch_size(512, photo) == 4_000_000 // (240 * 240)
    assert eval_batch_size(8, photo) == 8
    huge = Preprocessing("photo", 3, 4096, 4096, (0.5,) * 3, (0.5,) * 3)
    assert eval_batch_size(512, huge) == 1


def test_many_images_go_through_in_chunks_with_equal_results(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cnnkit.data.loader as loader

    images = np.random.default_rng(3).integers(0, 256, (10, 32, 32, 1), dtype=np.uint8)
    whole = predictor.probabilities(images)
    calls = []
    forward = predictor.model.forward
    monkeypatch.setattr(predictor.model, "forward", lambda x: calls.append(len(x)) or forward(x))
    monkeypatch.setattr(loader, "MAX_EVAL_BATCH_PIXELS", 4 * 32 * 32)
    chunked = predictor.probabilities(images)
    assert calls == [4, 4, 2]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def test_a_bad_image_is_named_by_its_position_in_the_whole_call(predictor) -> None:
    good = np.asarray(_image("L"))
    images = [good] * 600 + [np.zeros((8, 8, 2), np.uint8)]
    with pytest.raises(BadImageError, match=r"^image 600: "):
        predictor.predict(images)


def test_a_loaded_model_runs_in_channels_last_memory_with_the_same_outputs(
    tmp_path: Path, tiny_model_saver
) -> None:
    """The trainer's layout, and on a CPU the faster one (benchmarks/inference_layout.py)."""
    from cnnkit.evaluation.evaluate import _load_for_evaluation
    from cnnkit.inference.artifact import load_model

    path = tiny_model_saver(tmp_path / "m.safetensors")
    predictor = Predictor.from_file(path)
    evaluated, _ = _load_for_evaluation(path, "cpu")
    for model in (predictor.model, evaluated):
        convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convolutions and not model.training
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convolutions)
    plain = load_model(path).eval()
    inputs = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(predictor.model(inputs), plain(inputs), rtol=1e-4, atol=1e-5)
    # A caller's own module keeps its layout: a forward that calls .view would fail in another.
    Predictor(plain, plain.metadata)
    last = [m for m in plain.modules() if isinstance(m, nn.Conv2d)][-1]
    assert last.in_channels > 1 and last.weight.is_contiguous()


def test_evaluation_passes_large_photos_in_bounded_batches() -> None:
    """512 photos of 320 px in one batch would take gigabytes, and a minute with no progress."""
    from cnnkit.data.dataset import ImageSet
    from cnnkit.data.loader import eval_batch_size
    from cnnkit.evaluation.evaluate import predict_logits

    seen: list[int] = []

    class Counting(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            seen.append(len(inputs))
            return torch.zeros(len(inputs), 2)

    photo = Preprocessing("photo", 3, 320, 320, (0.5,) * 3, (0.5,) * 3)
    images = ImageSet(np.zeros((50, 320, 320, 3), np.uint8), np.zeros(50, np.int64), ["a", "b"])
    logits = predict_logits(Counting(), images, photo, torch.device("cpu"))
    assert logits.shape == (50, 2) and sum(seen) == 50
    assert max(seen) == eval_batch_size(512, photo) < 50


def test_the_public_names_come_from_the_package_itself() -> None:
    """``cnnkit.Prediction``, ``cnnkit.BadImageError`` and the rest, as the README writes them,
    are the classes the modules define, imported on first use."""
    import cnnkit
    from cnnkit.data.image import BadImageError
    from cnnkit.inference.model_metadata import ModelFileError
    from cnnkit.inference.predictor import Prediction, Predictor

    assert (cnnkit.Prediction, cnnkit.Predictor) == (Prediction, Predictor)
    assert (cnnkit.BadImageError, cnnkit.ModelFileError) == (BadImageError, ModelFileError)
    assert issubclass(cnnkit.ModelFileError, ValueError)
    assert set(cnnkit.__all__) >= {"Prediction", "BadImageError", "ModelFileError", "load_model"}
    with pytest.raises(AttributeError, match="no attribute 'Predictions'"):
        cnnkit.Predictions  # noqa: B018


def test_the_public_names_show_in_dir_and_load_models_help() -> None:
    """Tab completion and help(cnnkit) list the names imported on first use; help on
    cnnkit.load_model says what it raises, as the function it wraps does."""
    import cnnkit
    from cnnkit.inference import artifact

    assert set(cnnkit.__all__) <= set(dir(cnnkit))
    for section in ("Raises:", "ModelFileError", "model.metadata", '"cuda:N"'):
        assert section in cnnkit.load_model.__doc__ and section in artifact.load_model.__doc__
