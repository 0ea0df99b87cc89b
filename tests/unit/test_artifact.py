"""Tests for the single-file model format: round trips, fp16, and every way a file can be bad."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cnnkit
from cnnkit.config import Preprocessing
from cnnkit.inference.artifact import (
    ModelFileError,
    ModelMetadata,
    load_model,
    read_metadata,
    save_model,
)
from cnnkit.inference.checksums import metadata_digest, tensor_digest
from cnnkit.models.registry import create_model

OPTIONS = {"width": 4, "layers_per_stage": 1}
PREPROCESSING = Preprocessing("symbol", 1, 32, 32, (0.5,), (0.5,))
CLASS_NAMES = ("\\alpha", "é", "a,b", "$x$")


def _model(num_classes: int = 4, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("symbol_cnn", num_classes, 1, **{**OPTIONS, **options})
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 1, 32, 32))  # Move the batch-norm running statistics off their init.
    return model.eval()


def _metadata(class_names=CLASS_NAMES, architecture="symbol_cnn", options=None) -> ModelMetadata:
    return ModelMetadata(
        architecture,
        tuple(class_names),
        PREPROCESSING,
        dict(OPTIONS if options is None else options),
        training={"dataset": "hasy", "fold": 1, "test_top1": 0.8125, "epochs_run": 3},
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = _model()
    return save_model(tmp_path / "model.safetensors", model, _metadata()), model


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8 : 8 + length])


def _rewrite_metadata(path: Path, edit) -> None:
    """Edit the cnnkit metadata in place, recomputing nothing (no checksum, no tensors)."""
    data = path.read_bytes()
    length, header = _header(path)
    metadata = json.loads(header["__metadata__"]["cnnkit"])
    edit(metadata)
    header["__metadata__"]["cnnkit"] = json.dumps(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])


def _rewrite_metadata_and_checksum(path: Path, edit) -> None:
    """Edit the cnnkit metadata and recompute its checksum, as a deliberate tamperer would."""
    raw = read_metadata(path)
    edit(raw)
    raw["metadata_sha256"] = metadata_digest(raw)
    save_file(load_file(str(path)), str(path), metadata={"cnnkit": json.dumps(raw)})


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _header_offset(path: Path, needle: bytes) -> int:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    offset = data.index(needle, 8)
    assert offset < 8 + length
    return offset


# ----------------------------------------------------------------------------- round trip


def test_round_trip_gives_equal_logits_and_metadata(saved) -> None:
    path, model = saved
    loaded = load_model(path)
    inputs = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))
    assert loaded.metadata == _metadata()
    assert loaded.metadata.num_classes == 4 and loaded.metadata.kind == "symbols"
    assert not loaded.training
    assert cnnkit.load_model(path).metadata == loaded.metadata


def test_header_is_readable_without_loading_tensors(saved) -> None:
    raw = read_metadata(saved[0])
    assert raw["format"] == "cnnkit-model" and raw["architecture"] == "symbol_cnn"
    assert raw["class_names"] == list(CLASS_NAMES)
    assert raw["dtype"] == "float32" and len(raw["tensor_sha256"]) == 64


def test_save_is_atomic_and_leaves_no_temporary_files(saved, monkeypatch) -> None:
    path, model = saved
    save_model(path, model, _metadata())  # Overwrite in place.
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    before = path.read_bytes()

    def crash_mid_write(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    # Overwriting it with another model crashes part-way through the write.
    monkeypatch.setattr("cnnkit.inference.artifact.save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_model(path, _model(seed=1), _metadata())
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    loaded, inputs = load_model(path), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))


def test_model_file_gets_the_usual_permissions(saved) -> None:
    path, _ = saved
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_fp16_file_is_smaller_and_loads_close(saved, tmp_path: Path) -> None:
    path, model = saved
    half = save_model(tmp_path / "half.safetensors", model, _metadata(), half=True)
    assert half.stat().st_size < 0.75 * path.stat().st_size
    assert read_metadata(half)["dtype"] == "float16"
    loaded = load_model(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    inputs = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(inputs), model(inputs), atol=2e-2)
    assert loaded.metadata == _metadata()


def test_metadata_kind_for_photos() -> None:
    photo = Preprocessing("photo", 3, 224, 256, (0.5,) * 3, (0.5,) * 3)
    assert ModelMetadata("efficientnet_lite0", ("a",), photo).kind == "photos"


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nothing.safetensors")


# Both ways in: the module function and the package's lazy wrapper.
LOADERS = pytest.mark.parametrize(
    "load", [load_model, cnnkit.load_model], ids=["artifact", "cnnkit"]
)


@LOADERS
def test_a_run_folder_loads_its_model_and_an_empty_folder_is_named(saved, load) -> None:
    path, _ = saved
    assert load(path.parent).metadata == _metadata()
    empty = path.parent / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match=r"empty: a folder with no model\.safetensors"):
        load(empty)


@LOADERS
def test_an_onnx_file_gets_the_way_to_run_it(tmp_path: Path, load) -> None:
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"model\.onnx: .*cnnkit\.open_predictor\(path\)"):
        load(onnx_file)


@LOADERS
@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        (None, TypeError, "a .safetensors file or a training run's folder.*got NoneType"),
        (3, TypeError, "got int"),
        ("", ValueError, "must not be empty"),
    ],
)
def test_a_path_that_is_not_one_is_refused_clearly(load, path, error, message) -> None:
    with pytest.raises(error, match=message):
        load(path)


@LOADERS
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "unknown device 'gpu': use auto, cpu, cuda"),
        ("cuda", "device 'cuda' requested but CUDA is not available"),
        ("cuda:1", "device 'cuda:1' requested but CUDA is not available"),
    ],
)
def test_a_bad_device_is_a_value_error(saved, monkeypatch, load, device, message) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        load(saved[0], device)


@LOADERS
def test_auto_device_picks_what_is_there(saved, monkeypatch, load) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    model = load(saved[0], "auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.metadata == _metadata()


@pytest.mark.parametrize("keep", [0, 4, 8, 20, "half-header", "half-data", "last-byte"])
def test_truncated_file(saved, keep) -> None:
    path, _ = saved
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    cut = {
        "half-header": 8 + length // 2,
        "half-data": 8 + length + (len(data) - 8 - length) // 2,
        "last-byte": len(data) - 1,
    }.get(keep, keep)
    path.write_bytes(data[:cut])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_model(path)


@pytest.mark.parametrize(
    ("needle", "index"),
    [
        (b'{"__metadata__"', 0),  # the JSON structure itself
        (b'"F32"', 1),  # a tensor's dtype
        (b'"data_offsets":[0,', 16),  # where a tensor's bytes begin
        (b"tensor_sha256", 1),  # a metadata key
        (b"symbol_cnn", 1),  # the architecture name
        (b"alpha", 1),  # a class name: the model would silently print a wrong label
        (b"0.5]", 2),  # the normalisation mean: predictions would silently change
    ],
)
def test_flipped_byte_in_header(saved, needle: bytes, index: int) -> None:
    path, _ = saved
    _flip(path, _header_offset(path, needle) + index)
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_model(path)


@pytest.mark.parametrize("position", [0.1, 0.5, 0.999])
def test_flipped_byte_in_tensor_data_fails_the_checksum(saved, position: float) -> None:
    path, _ = saved
    length, _ = _header(path)
    size = path.stat().st_size
    _flip(path, 8 + length + int((size - 8 - length) * position))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_plain_safetensors_file_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(path))
    with pytest.raises(ModelFileError, match="no cnnkit metadata"):
        load_model(path)


def test_metadata_without_checksum(saved, tmp_path: Path) -> None:
    path, _ = saved
    _rewrite_metadata(path, lambda metadata: metadata.pop("tensor_sha256"))
    with pytest.raises(ModelFileError, match="tensor_sha256|checksum"):
        load_model(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=2), "unsupported model format version 2"),
        (lambda m: m["preprocessing"].update(interpolation="area"), "invalid metadata"),
        (lambda m: m["options"].update(new_option=1), "cannot rebuild the model"),
    ],
)
def test_what_a_newer_cnnkit_wrote_says_to_upgrade(saved, edit, message) -> None:
    """Formats, preprocessing keys and options a later version adds are news to this one."""
    path, _ = saved

    def newer(metadata: dict) -> None:
        edit(metadata)
        metadata["cnnkit_version"] = "99.0.0"

    _rewrite_metadata_and_checksum(path, newer)
    with pytest.raises(ModelFileError, match=rf"{message}.*written by cnnkit 99\.0\.0.*upgrade"):
        load_model(path)
    _rewrite_metadata_and_checksum(path, lambda metadata: metadata.update(cnnkit_version="0.0.1"))
    with pytest.raises(ModelFileError, match=message) as raised:
        load_model(path)
    assert "upgrade" not in str(raised.value)  # An older writer: nothing to upgrade.


def test_metadata_without_its_checksum_is_not_called_corrupt(saved) -> None:
    path, _ = saved
    _rewrite_metadata(path, lambda metadata: metadata.pop("metadata_sha256"))
    with pytest.raises(ModelFileError, match="cnnkit metadata has no metadata_sha256"):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_weights_stored_as_integers_are_refused_even_with_recomputed_checksums(saved, dtype):
    """A float weight stored as int8 converted silently, and the model answered at random."""
    path, _ = saved
    raw = read_metadata(path)
    tensors = load_file(str(path))
    tensors["classifier.weight"] = tensors["classifier.weight"].to(dtype)
    raw["tensor_sha256"] = tensor_digest(tensors)
    raw["metadata_sha256"] = metadata_digest(raw)
    save_file(tensors, str(path), metadata={"cnnkit": json.dumps(raw)})
    dtype_name = str(dtype).removeprefix("torch.")
    with pytest.raises(ModelFileError, match=rf"classifier\.weight is {dtype_name}; a float"):
        load_model(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="keras"), "not a cnnkit model|checksum"),
        (lambda m: m.update(format_version=99), "version|checksum"),
        (lambda m: m.pop("class_names"), "invalid metadata|checksum"),
        (lambda m: m["preprocessing"].update(channels=2), "invalid metadata|checksum"),
        (lambda m: m.update(num_classes=5), "num_classes|checksum"),
    ],
)
def test_invalid_metadata(saved, edit, message: str) -> None:
    path, _ = saved
    _rewrite_metadata(path, edit)
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


def test_metadata_that_is_not_json(saved) -> None:
    path, _ = saved
    length, header = _header(path)
    header["__metadata__"]["cnnkit"] = "{not json"
    data = path.read_bytes()
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(path)


def test_unknown_architecture(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m.safetensors", _model(), _metadata(architecture="resnet9000"))
    with pytest.raises(ModelFileError, match="cannot rebuild.*resnet9000"):
        load_model(path)


def test_unknown_architecture_edited_into_the_header(saved) -> None:
    path, _ = saved
    _rewrite_metadata(path, lambda m: m.update(architecture="resnet9000"))
    with pytest.raises(ModelFileError, match="resnet9000|checksum"):
        load_model(path)


def test_class_count_mismatch_edited_into_the_header(saved) -> None:
    path, _ = saved

    def drop_a_class(metadata: dict) -> None:
        metadata["class_names"] = metadata["class_names"][:3]
        metadata["num_classes"] = 3

    _rewrite_metadata(path, drop_a_class)
    with pytest.raises(ModelFileError, match=r"classifier\.(weight|bias) has shape \(4,|checksum"):
        load_model(path)


def test_class_count_mismatch_between_model_and_metadata(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m.safetensors", _model(num_classes=5), _metadata())
    with pytest.raises(
        ModelFileError, match=r"classifier\.(weight|bias) has shape \(5,.*expects \(4,"
    ):
        load_model(path)


def test_wrong_tensor_shapes_for_the_options(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m.safetensors", _model(width=8), _metadata())
    with pytest.raises(ModelFileError, match="shape"):
        load_model(path)


def test_unknown_option_in_metadata(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m.safetensors", _model(), _metadata(options={"depth": 3}))
    with pytest.raises(ModelFileError, match="cannot rebuild.*depth"):
        load_model(path)


def test_missing_tensor(tmp_path: Path) -> None:
    model = _model()
    model.classifier.bias = None
    path = save_model(tmp_path / "m.safetensors", model, _metadata())
    with pytest.raises(ModelFileError, match=r"missing \['classifier.bias'\]"):
        load_model(path)


def test_extra_tensor(tmp_path: Path) -> None:
    model = _model()
    model.register_buffer("smuggled", torch.zeros(3))
    path = save_model(tmp_path / "m.safetensors", model, _metadata())
    with pytest.raises(ModelFileError, match=r"unexpected \['smuggled'\]"):
        load_model(path)


def test_tensors_replaced_with_a_recomputed_checksum_are_still_shape_checked(saved) -> None:
    path, _ = saved
    raw = read_metadata(path)
    tensors = load_file(str(path))
    tensors["classifier.weight"] = torch.zeros(9, 16)
    raw["tensor_sha256"] = tensor_digest(tensors)
    save_file(tensors, str(path), metadata={"cnnkit": json.dumps(raw)})
    with pytest.raises(ModelFileError, match="shape|checksum"):
        load_model(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["options"].update(num_classes=4), "options name num_classes, which are not"),
        (lambda m: m["options"].update(name="x"), "options name name, which are not"),
        (lambda m: m.update(options=[["width", 4]]), "options and training must be objects"),
        (lambda m: m["options"].update(width=1.5), "width must be a whole number; got 1.5"),
        (lambda m: m["options"].update(width=2**40), "cannot rebuild the model"),
        (lambda m: m["preprocessing"].update(image_size=24.5), "image_size must be a whole"),
        (lambda m: m["preprocessing"].update(stored_size=10**6), "stored_size must be a whole"),
        (lambda m: m["preprocessing"].update(mean=[float("nan")]), "must be finite"),
    ],
)
def test_odd_metadata_with_a_recomputed_checksum_is_a_model_file_error(saved, edit, message):
    path, _ = saved
    _rewrite_metadata_and_checksum(path, edit)
    with pytest.raises(ModelFileError, match=f"{re.escape(str(path))}: .*{re.escape(message)}"):
        load_model(path)


def test_options_that_do_not_fit_the_tensors_allocate_nothing(saved, monkeypatch) -> None:
    """A width (or hidden size) far larger than the file's tensors is refused after building
    the layers on the meta device, before any memory is claimed for them."""
    from cnnkit.models import registry

    path, _ = saved
    _rewrite_metadata_and_checksum(path, lambda m: m["options"].update(width=64))
    devices, create = [], registry.create_model

    def spy(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return create(*args, **kwargs)

    monkeypatch.setattr(registry, "create_model", spy)
    with pytest.raises(ModelFileError, match=r"has shape .* expects"):
        load_model(path)
    assert devices == ["meta"]


def test_metadata_nested_too_deeply_is_a_model_file_error(saved) -> None:
    path, _ = saved
    save_file(load_file(str(path)), str(path), metadata={"cnnkit": "[" * 200_000})
    with pytest.raises(ModelFileError, match="nested too deeply"):
        load_model(path)


def test_book_cnn_files_rebuild_at_their_input_size(tmp_path: Path) -> None:
    preprocessing = Preprocessing("symbol", 3, 48, 48, (0.0,) * 3, (1.0,) * 3)
    model = create_model("book_cnn", 4, 3, dense=8, image_size=48).eval()
    metadata = ModelMetadata("book_cnn", CLASS_NAMES, preprocessing, {"dense": 8, "image_size": 48})
    loaded = load_model(save_model(tmp_path / "m.safetensors", model, metadata))
    inputs = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))
    # A file written before book_cnn took image_size was 32 px, and still loads as such.
    old = create_model("book_cnn", 4, 3, dense=8).eval()
    preprocessing = Preprocessing("symbol", 3, 32, 32, (0.0,) * 3, (1.0,) * 3)
    metadata = ModelMetadata("book_cnn", CLASS_NAMES, preprocessing, {"dense": 8})
    loaded = load_model(save_model(tmp_path / "old.safetensors", old, metadata))
    assert loaded.dense[0].in_features == 6 * 6 * 32


# ----------------------------------------------------------------------------- no pickle


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_named_safetensors_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    torch.save({"payload": _Marker(str(marker))}, path)
    with pytest.raises(ModelFileError, match="evil.safetensors"):
        load_model(path)
    assert not marker.exists()


def test_loading_never_calls_a_pickle_loader(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model file must never be unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_model(saved[0]).metadata.architecture == "symbol_cnn"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ([1, 2], "header is not a JSON object"),
        ({"__metadata__": "x"}, "header is not a JSON object"),
        ({"__metadata__": {"cnnkit": "[1, 2]"}}, "cnnkit metadata is not a JSON object"),
    ],
)
def test_a_header_of_the_wrong_json_shape_is_a_model_file_error(tmp_path, header, message):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 16)
    with pytest.raises(ModelFileError, match=f"odd.safetensors: .*{message}"):
        load_model(path)


def test_an_unwritable_place_is_named_not_the_temporary_file(tmp_path) -> None:
    from cnnkit.atomic import write_atomically

    blocked = tmp_path / "file.txt"
    blocked.write_text("a file where a folder should be", encoding="utf-8")
    target = blocked / "model.onnx"
    with pytest.raises(OSError, match=f"cannot write {target}: {blocked} is a file") as raised:
        write_atomically(target, lambda path: path.write_bytes(b"x"))
    assert ".tmp" not in str(raised.value)


def test_names_that_are_not_utf8_survive_the_model_file_and_its_export(tmp_path: Path) -> None:
    """A data folder (or class folder) whose name is not UTF-8 is held with surrogates; the
    header must still be UTF-8, so it goes as escapes and reads back as the same name."""
    from cnnkit.inference.artifact import ModelMetadata, read_metadata, save_model

    odd = "d\udce9ta"  # os.fsdecode(b"d\xe9ta")
    model = create_model("symbol_cnn", 2, 1, width=4, layers_per_stage=1).eval()
    metadata = ModelMetadata(
        "symbol_cnn",
        (odd, "\u03b1"),
        Preprocessing(),
        {"width": 4, "layers_per_stage": 1},
        training={"dataset": "folder", "data": f"/data/{odd}"},
    )
    path = save_model(tmp_path / "odd.safetensors", model, metadata)
    loaded = load_model(path).metadata
    assert loaded.class_names == (odd, "\u03b1")
    assert loaded.training["data"] == f"/data/{odd}"
    assert read_metadata(path)["class_names"] == [odd, "\u03b1"]
    pytest.importorskip("onnxruntime")
    from cnnkit.inference.export import export_onnx
    from cnnkit.inference.onnx_backend import OnnxPredictor

    exported = OnnxPredictor.from_file(export_onnx(path, tmp_path / "odd.onnx"))
    assert exported.metadata.class_names == (odd, "\u03b1")
    assert exported.metadata.training["data"] == f"/data/{odd}"


@pytest.mark.parametrize("name", ["photo.JPG", "symbol.png", "notes.txt"])
def test_an_image_given_as_the_model_is_named_as_one(tmp_path: Path, name: str) -> None:
    """``cnnkit serve photo.jpg`` said "truncated or not a safetensors file", which reads as a
    broken model."""
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ModelFileError) as refused:
        cnnkit.load_model(path)
    if name == "notes.txt":
        assert str(refused.value) == f"{path}: truncated or not a safetensors file"
    else:
        assert str(refused.value).startswith(f"{path}: an image, not a model file (pass a ")
