"""Tests for the ONNX export and the onnxruntime predictor: parity with torch, metadata, CLI."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cnnkit.cli import main  # noqa: E402
from cnnkit.inference.artifact import ModelFileError, ModelMetadata, save_model  # noqa: E402
from cnnkit.inference.export import (  # noqa: E402
    ARCHITECTURE_KEY,
    CLASS_NAMES_KEY,
    PREPROCESSING_KEY,
    export_onnx,
    metadata_from_properties,
)
from cnnkit.inference.onnx_backend import OnnxPredictor  # noqa: E402
from cnnkit.inference.predictor import Predictor  # noqa: E402
from cnnkit.models.registry import create_model  # noqa: E402

# (architecture, channels, class count): an odd class count catches a hard-coded 369.
CASES = {
    "symbol_cnn": ("symbol_cnn", 1, 7, {"width": 8}),
    "book_cnn": ("book_cnn", 3, 5, {"dense": 32}),
    "efficientnet_lite0": ("efficientnet_lite0", 3, 3, {"hidden": 16}),
}


def _save_random_model(folder: Path, case: str, seed: int = 0) -> tuple[Path, ModelMetadata]:
    architecture, channels, num_classes, options = CASES[case]
    torch.manual_seed(seed)
    model = create_model(architecture, num_classes, channels, **options)
    # Non-trivial batch-norm statistics, so the export must fold them correctly.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    class_names = tuple(f"\\class_{index}" for index in range(num_classes - 1)) + ("é ω",)
    metadata = ModelMetadata(
        architecture, class_names, model.default_preprocessing, options, {"note": "random"}
    )
    return save_model(folder / f"{case}.safetensors", model, metadata), metadata


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory) -> tuple[Path, Path, ModelMetadata]:
    """(model file, exported ONNX file, metadata) for each architecture, built once."""
    folder = tmp_path_factory.mktemp(request.param)
    model_path, metadata = _save_random_model(folder, request.param)
    onnx_path = export_onnx(model_path, folder / "exported" / "model.onnx")
    return model_path, onnx_path, metadata


@pytest.fixture(scope="module")
def symbol_model(tmp_path_factory) -> tuple[Path, ModelMetadata]:
    """A model file for the tests of export's options, which do not depend on the network (each
    architecture's export is checked through ``exported``)."""
    return _save_random_model(tmp_path_factory.mktemp("options"), "symbol_cnn")


def _random_images(metadata: ModelMetadata, count: int, seed: int) -> np.ndarray:
    size, channels = metadata.preprocessing.stored_size, metadata.preprocessing.channels
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, channels), np.uint8)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnx_logits_match_torch(exported, batch_size: int) -> None:
    model_path, onnx_path, metadata = exported
    reference = Predictor.from_file(model_path)
    predictor = OnnxPredictor.from_file(onnx_path)
    images = _random_images(metadata, batch_size, seed=batch_size)
    with torch.inference_mode():
        expected = reference.model(reference.model_input(images)).numpy()
    logits = predictor.logits(images)
    assert logits.shape == (batch_size, metadata.num_classes)
    assert np.abs(logits - expected).max() < 1e-4
    assert np.array_equal(logits.argmax(axis=1), expected.argmax(axis=1))
    # Predictor takes HxW arrays for one channel (PIL has no HxWx1 mode).
    arrays = [image.squeeze(axis=-1) if image.shape[-1] == 1 else image for image in images]
    ranked = predictor.predict(arrays, top_k=3)
    expected_ranked = reference.predict(arrays, top_k=3)
    assert [[p.index for p in row] for row in ranked] == [
        [p.index for p in row] for row in expected_ranked
    ]
    np.testing.assert_allclose(
        predictor.probabilities(images), reference.probabilities(images), atol=1e-5
    )


def test_onnx_file_is_valid_with_dynamic_batch_and_metadata(exported) -> None:
    _, onnx_path, metadata = exported
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    batch_dimension = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dimension.dim_param and not batch_dimension.dim_value
    properties = {prop.key: prop.value for prop in proto.metadata_props}
    assert json.loads(properties[CLASS_NAMES_KEY]) == list(metadata.class_names)
    assert json.loads(properties[PREPROCESSING_KEY])["channels"] == metadata.preprocessing.channels
    assert properties[ARCHITECTURE_KEY] == metadata.architecture
    assert ModelMetadata.from_dict(metadata_from_properties(properties)) == metadata
    assert OnnxPredictor.from_file(onnx_path).metadata == metadata


def test_idle_onnxruntime_threads_sleep_instead_of_spinning(exported) -> None:
    """Spinning threads take the cores a server's event loop needs between batches."""
    _, onnx_path, _ = exported
    options = OnnxPredictor.from_file(onnx_path).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_each_server_process_runs_onnxruntime_on_its_share_of_cores(exported, monkeypatch) -> None:
    """``cnnkit serve --workers N`` gives each process ``cores // N`` threads; onnxruntime's
    default (one per core) would run N times as many threads as cores."""
    from cnnkit.web.server import _WORKER_SETTINGS, app_from_environment

    _, onnx_path, _ = exported
    torch_threads = torch.get_num_threads()
    try:
        for threads in (1, 2):
            settings = {"model": str(onnx_path), "max_upload_bytes": 1000, "threads": threads}
            monkeypatch.setenv(_WORKER_SETTINGS, json.dumps(settings))
            session = app_from_environment().state.serving.service.predictor.session
            assert session.get_session_options().intra_op_num_threads == threads
    finally:
        torch.set_num_threads(torch_threads)


def test_batch_norm_is_folded_into_plain_convolutions(exported) -> None:
    """The exporter folds batch norm into the convolutions' weights. EfficientNet-Lite folds
    its frozen batch norm by hand while training; traced into the graph, that fold left a Mul
    before each large convolution, so the export keeps the layers for the exporter."""
    _, onnx_path, _ = exported
    operators = {node.op_type for node in onnx.load(onnx_path).graph.node}
    assert "Conv" in operators
    assert not operators & {"Mul", "BatchNormalization"}, operators


def test_empty_batch_gives_empty_probabilities(exported) -> None:
    _, onnx_path, metadata = exported
    predictor = OnnxPredictor.from_file(onnx_path)
    assert predictor.predict([]) == []
    assert predictor.probabilities(_random_images(metadata, 0, 0)).shape == (
        0,
        metadata.num_classes,
    )


def test_safetensors_file_is_exported_once_and_cached(tmp_path: Path) -> None:
    model_path, metadata = _save_random_model(tmp_path / "model", "symbol_cnn")
    predictor = OnnxPredictor.from_file(model_path, cache_dir=tmp_path / "cache")
    [cached] = (tmp_path / "cache" / "onnx").iterdir()
    assert predictor.metadata == metadata
    assert sorted(p.name for p in model_path.parent.iterdir()) == [model_path.name]
    modified = cached.stat().st_mtime_ns
    again = OnnxPredictor.from_file(model_path, cache_dir=tmp_path / "cache")
    assert again.metadata == metadata and cached.stat().st_mtime_ns == modified


def test_a_retrained_model_at_the_same_path_is_exported_again(tmp_path: Path) -> None:
    model_path, metadata = _save_random_model(tmp_path / "model", "symbol_cnn", seed=0)
    images = _random_images(metadata, 3, 1)
    OnnxPredictor.from_file(model_path, cache_dir=tmp_path / "cache")
    _save_random_model(tmp_path / "model", "symbol_cnn", seed=1)  # Same classes and options.
    fresh = OnnxPredictor.from_file(model_path, cache_dir=tmp_path / "cache")
    expected = Predictor.from_file(model_path).probabilities(images)
    np.testing.assert_allclose(fresh.probabilities(images), expected, atol=1e-5)
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2


def test_an_edited_cached_export_is_not_used(tmp_path: Path) -> None:
    model_path, metadata = _save_random_model(tmp_path / "model", "symbol_cnn")
    images = _random_images(metadata, 3, 2)
    OnnxPredictor.from_file(model_path, cache_dir=tmp_path / "cache")
    [cached] = (tmp_path / "cache" / "onnx").iterdir()
    proto = onnx.load(str(cached))
    bias = next(t for t in proto.graph.initializer if t.dims == [metadata.num_classes])
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] += 100.0  # The first class would win every image.
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(cached))
    predictor = OnnxPredictor.from_file(model_path, cache_dir=tmp_path / "cache")
    expected = Predictor.from_file(model_path).probabilities(images)
    np.testing.assert_allclose(predictor.probabilities(images), expected, atol=1e-5)


def test_the_model_folder_is_not_written_without_a_cache(tmp_path: Path) -> None:
    model_path, metadata = _save_random_model(tmp_path / "model", "symbol_cnn")
    predictor = OnnxPredictor.from_file(model_path, cache=False, cache_dir=tmp_path / "cache")
    assert predictor.metadata == metadata
    assert not (tmp_path / "cache").exists()
    assert sorted(p.name for p in model_path.parent.iterdir()) == [model_path.name]


def test_onnx_file_without_cnnkit_metadata_is_rejected(exported, tmp_path: Path) -> None:
    _, onnx_path, _ = exported
    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(proto, str(stripped))
    with pytest.raises(ModelFileError, match="no cnnkit metadata"):
        OnnxPredictor.from_file(stripped)


def test_an_onnx_file_with_edited_metadata_is_refused(symbol_model, tmp_path: Path) -> None:
    """As a model file is: relabelled classes would otherwise be used without a word."""
    from cnnkit.inference.export import METADATA_KEY

    onnx_path = export_onnx(symbol_model[0], tmp_path / "model.onnx")
    proto = onnx.load(str(onnx_path))
    (entry,) = (p for p in proto.metadata_props if p.key == METADATA_KEY)
    raw = json.loads(entry.value)
    raw["class_names"][0] = "zero"
    entry.value = json.dumps(raw)
    relabelled = tmp_path / "relabelled.onnx"
    onnx.save(proto, str(relabelled))
    with pytest.raises(ModelFileError, match=r"relabelled\.onnx: metadata checksum mismatch"):
        OnnxPredictor.from_file(relabelled)


def test_missing_and_corrupt_files_raise_model_file_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        OnnxPredictor.from_file(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(ModelFileError, match="not a valid ONNX file"):
        OnnxPredictor.from_file(corrupt)
    with pytest.raises(ValueError, match="CPU only"):
        OnnxPredictor.from_file(corrupt, device="cuda")


def test_cli_export_writes_the_file(symbol_model, tmp_path: Path, capsys) -> None:
    model_path, metadata = symbol_model
    out = tmp_path / "cli" / "model.onnx"
    assert main(["export", str(model_path), "--format", "onnx", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    assert OnnxPredictor.from_file(out).metadata == metadata


def test_cli_export_without_a_model_exports_the_bundled_one_here(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Into the current folder: never into the installed package."""
    from cnnkit.inference.bundled import bundled_model_path

    monkeypatch.chdir(tmp_path)
    assert main(["export"]) == 0
    out = tmp_path / bundled_model_path().with_suffix(".onnx").name
    assert capsys.readouterr().out.strip() == out.name
    assert OnnxPredictor.from_file(out).metadata.kind == "symbols"
    assert not bundled_model_path().with_suffix(".onnx").exists()


def test_cli_predict_onnx_backend_prints_the_same_lines(exported, tmp_path: Path, capsys) -> None:
    model_path, onnx_path, metadata = exported
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for index, image in enumerate(_random_images(metadata, 3, seed=7)):
        Image.fromarray(image.squeeze()).save(image_dir / f"image_{index}.png")
    outputs = {}
    runs = [("torch", model_path), ("onnx", onnx_path), (None, onnx_path)]
    if metadata.architecture != "efficientnet_lite0":
        # A model file under the ONNX backend is exported on the fly, by the same code for every
        # architecture (here on the two small ones): Lite0's export alone takes 20 s.
        runs.append(("onnx", model_path))
    for backend, model in runs:
        arguments = ["predict", str(model), str(image_dir), "--top-k", "3"]
        assert main(arguments + (["--backend", backend] if backend else [])) == 0
        outputs[(backend, model.suffix)] = capsys.readouterr().out
    torch_output = outputs.pop(("torch", ".safetensors"))
    assert torch_output.count("Prediction:") == 3
    # (None, ".onnx") among them: a .onnx file picks the ONNX backend.
    assert len(outputs) == len(runs) - 1
    for run, output in outputs.items():
        assert output == torch_output, run


class _TinyBackbone(torch.nn.Module):
    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, self.num_features, 3, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Position-dependent pooling, so mirrored and enlarged views give different outputs.
        weights = torch.linspace(0, 1, x.shape[-1])
        return (torch.relu(self.conv(x)) * weights).mean(dim=(2, 3))


@pytest.mark.parametrize("members", [1, 2])
def test_test_time_augmentation_exports_with_the_same_output(members: int) -> None:
    from cnnkit.config import Preprocessing
    from cnnkit.inference.export import _torch_export_quietly
    from cnnkit.inference.onnx_backend import create_session
    from cnnkit.models.transfer_classifier import TransferClassifier, TransferEnsemble

    torch.manual_seed(0)
    preprocessing = Preprocessing("photo", 3, 20, 24, (0.5,) * 3, (0.5,) * 3)
    parts = [
        TransferClassifier(_TinyBackbone(), 4, 8, 0.0, preprocessing, tta=True)
        for _ in range(members)
    ]
    model = (parts[0] if members == 1 else TransferEnsemble(parts)).eval()
    program = _torch_export_quietly(model, torch.zeros(2, 3, 20, 20), opset=18)
    session = create_session(program.model_proto.SerializeToString(), threads=1)
    x = torch.randn(3, 3, 20, 20)
    (output,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x)
        first = parts[0](x)
        model.tta = False
        plain = model(x)
    np.testing.assert_allclose(output, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.exp(output), plain.softmax(1).numpy(), atol=1e-4)
    if members > 1:  # The average of the members, not just the first.
        assert not np.allclose(output, first.numpy(), atol=1e-4)


@pytest.mark.parametrize("opset", [3, 17, 999])
def test_an_opset_out_of_range_is_refused_before_exporting(symbol_model, opset, tmp_path) -> None:
    model_path = symbol_model[0]
    with pytest.raises(ValueError, match=f"opset must be between 18 .*; got {opset}"):
        export_onnx(model_path, tmp_path / "out.onnx", opset=opset)
    assert not (tmp_path / "out.onnx").exists()


def test_the_file_holds_the_opset_asked_for(symbol_model, tmp_path) -> None:
    import onnx

    path = export_onnx(symbol_model[0], tmp_path / "out.onnx", opset=20)
    versions = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert versions.get("", versions.get("ai.onnx")) == 20


def test_the_newest_opset_exports_without_the_converters_notice(tmp_path, caplog) -> None:
    """onnxscript announces that onnx's converter reaches opsets it lacks: noise to a user."""
    import onnx

    from cnnkit.inference.bundled import bundled_model_path

    newest = onnx.defs.onnx_opset_version()
    with caplog.at_level(logging.INFO):
        path = export_onnx(bundled_model_path(), tmp_path / "newest.onnx", opset=newest)
    versions = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert versions.get("", versions.get("ai.onnx")) == newest
    assert not [r for r in caplog.records if r.name.startswith(("onnxscript", "torch.onnx"))]


def test_a_cached_export_that_does_not_load_gives_way_to_a_good_one(tmp_path: Path) -> None:
    from cnnkit.inference.artifact import read_metadata
    from cnnkit.inference.onnx_backend import _export_key

    model_path, metadata = _save_random_model(tmp_path / "model", "symbol_cnn")
    OnnxPredictor.from_file(model_path, cache_dir=tmp_path / "cache")
    folder = tmp_path / "cache" / "onnx"
    [good] = folder.iterdir()
    # Not an ONNX model, but named after its own checksum and sorted before the good export,
    # so it is tried first.
    key = _export_key(read_metadata(model_path))
    junk = next(
        data
        for data in (f"not an onnx model {n}".encode() for n in range(1000))
        if f"{key}-{hashlib.sha256(data).hexdigest()[:16]}.onnx" < good.name
    )
    (folder / f"{key}-{hashlib.sha256(junk).hexdigest()[:16]}.onnx").write_bytes(junk)
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    predictor = OnnxPredictor.from_file(model_path, cache_dir=tmp_path / "cache")
    assert predictor.metadata == metadata
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before
    assert good.exists()


def test_evaluate_scores_an_onnx_export_like_its_model(tmp_path: Path, tiny_model_saver) -> None:
    import json as json_module

    model = tiny_model_saver(tmp_path / "digits.safetensors", tuple(str(d) for d in range(10)))
    onnx_file = export_onnx(model, tmp_path / "digits.onnx")
    metrics = {}
    for path in (model, onnx_file):
        out = tmp_path / f"report-{path.suffix[1:]}"
        argv = ["evaluate", str(path), "--dataset", "digits", "--out", str(out), "--json"]
        assert main(argv) == 0
        metrics[path.suffix] = json_module.loads((out / "metrics.json").read_text())
    assert metrics[".onnx"]["top1"] == pytest.approx(metrics[".safetensors"]["top1"], abs=1e-9)
    assert metrics[".onnx"]["count"] == metrics[".safetensors"]["count"] > 300


def test_a_search_folder_is_not_taken_for_a_model_or_images(tmp_path: Path, capsys) -> None:
    search = tmp_path / "search"
    (search / "trials" / "trial-000").mkdir(parents=True)
    (search / "search.yaml").write_text("study_name: s\n", encoding="utf-8")
    (search / "results.png").write_bytes(b"not used")
    for argv in (
        ["predict", str(search), "x.png"],
        ["evaluate", str(search), "--dataset", "digits"],
        ["export", str(search)],
    ):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert f"{search} is a search folder, not a model: pass " in error
        assert "trial-NNN" in error and "--retrain-best" in error


def _exporter_raising(error: BaseException):
    def export(*args, **kwargs):
        raise error

    return export


def _failure_after_interrupt() -> Exception:
    """What torch.onnx raises when Ctrl-C stopped its import of torch._dynamo: an
    AttributeError met while handling the interrupt, wrapped in its coloured advice."""
    half_imported = AttributeError("module 'torch._dynamo' has no attribute 'exc'")
    half_imported.__context__ = KeyboardInterrupt()
    wrapper = RuntimeError("Failed to export.\n- submit a PR to PyTorch")
    wrapper.__cause__ = half_imported
    return wrapper


def test_an_interrupted_export_is_an_interruption_not_a_model_failure(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    model_path, _ = _save_random_model(tmp_path, "symbol_cnn")
    exporter = _exporter_raising(_failure_after_interrupt())
    monkeypatch.setattr("cnnkit.inference.export._torch_export_quietly", exporter)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model_path, tmp_path / "model.onnx")
    assert main(["export", str(model_path), "--out", str(tmp_path / "model.onnx")]) == 130
    assert capsys.readouterr().err.strip() == "Interrupted."
    assert not (tmp_path / "model.onnx").exists()


def test_an_exporter_failure_is_one_line_without_colour_codes(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    model_path, _ = _save_random_model(tmp_path, "symbol_cnn")
    cause = ValueError("Unsupported operator aten::foo\nSee the exportdb for more.")
    wrapper = RuntimeError(
        "Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m of "
        "exporting the model to ONNX. Next steps:\n- submit a PR to PyTorch"
    )
    wrapper.__cause__ = cause
    monkeypatch.setattr("cnnkit.inference.export._torch_export_quietly", _exporter_raising(wrapper))
    assert main(["export", str(model_path), "--out", str(tmp_path / "model.onnx")]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"cnnkit export: error: {model_path}: ONNX export failed "
        "(ValueError: Unsupported operator aten::foo)\n"
    )
