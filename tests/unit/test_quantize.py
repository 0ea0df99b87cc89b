"""Int8 ONNX export: calibrated on real images, metadata kept, predictions agree with float."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cnnkit.cli import main
from cnnkit.config import DataConfig
from cnnkit.data.sources import build_splits
from cnnkit.inference import bundled
from cnnkit.inference.artifact import ModelFileError, read_metadata
from cnnkit.inference.bundled import bundled_int8_path, bundled_model_path
from cnnkit.inference.export import METADATA_KEY
from cnnkit.inference.onnx_backend import OnnxPredictor
from cnnkit.inference.predictor import Predictor
from cnnkit.inference.quantize import QUANTIZATION_KEY, calibration_inputs, quantize_onnx

pytest.importorskip("onnxruntime")
DIGITS = DataConfig(dataset="digits")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = bundled_model_path()
    inputs = calibration_inputs(model, DIGITS, count=128)
    return quantize_onnx(model, tmp_path_factory.mktemp("int8") / "symbols-int8.onnx", inputs)


def assert_int8_ranks_as_float(int8: np.ndarray, float_: np.ndarray) -> None:
    """The int8 probabilities ``int8`` rank classes as the float ones do.

    The digits are not the bundled HASYv2 model's own data, so many of its answers are unsure
    and a small change in the logits flips them; where it is sure (top probability over 0.5),
    the int8 copy must agree, and the float top-1 must be in the int8 top-5 almost always.
    Weights in full 8 bits on an AVX2 CPU without VNNI (saturating products) fail both: 48% and
    90%.
    """
    expected = float_.argmax(1)
    sure = float_.max(1) > 0.5
    assert sure.sum() >= 100
    assert np.mean(int8.argmax(1)[sure] == expected[sure]) >= 0.97
    top5 = np.argsort(-int8, axis=1)[:, :5]
    assert np.mean((top5 == expected[:, None]).any(1)) >= 0.99


def test_calibration_inputs_are_normalised_training_images() -> None:
    inputs = calibration_inputs(bundled_model_path(), DIGITS, count=64, seed=1)
    assert inputs.shape == (64, 1, 32, 32) and inputs.dtype == np.float32
    assert -1.0 <= inputs.min() < 0 < inputs.max() <= 1.0  # (x / 255 - 0.5) / 0.5
    again = calibration_inputs(bundled_model_path(), DIGITS, count=64, seed=1)
    assert np.array_equal(inputs, again)


def test_int8_model_keeps_the_metadata_and_agrees_with_float(quantized: Path) -> None:
    import onnx

    float_predictor = Predictor.from_file(bundled_model_path())
    int8 = OnnxPredictor.from_file(quantized)
    assert int8.metadata.class_names == float_predictor.metadata.class_names
    assert int8.metadata.preprocessing == float_predictor.metadata.preprocessing
    properties = {p.key: p.value for p in onnx.load(quantized).metadata_props}
    assert json.loads(properties[QUANTIZATION_KEY])["images"] == 128
    operators = {node.op_type for node in onnx.load(quantized).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators

    preprocessing = float_predictor.metadata.preprocessing
    test = np.asarray(build_splits(DIGITS, preprocessing).splits.test.images)
    assert_int8_ranks_as_float(int8.probabilities(test), float_predictor.probabilities(test))


def test_the_shipped_int8_copy_is_the_shipped_model_quantized() -> None:
    """``cnnkit serve`` runs the int8 copy: it must be an export of the very same weights (the
    metadata it keeps holds their SHA-256) and rank digits as the float model does."""
    import onnx

    int8_path = bundled_int8_path()
    assert int8_path is not None and int8_path.parent == bundled_model_path().parent
    properties = {p.key: p.value for p in onnx.load(int8_path).metadata_props}
    assert json.loads(properties[METADATA_KEY]) == read_metadata(bundled_model_path())
    assert json.loads(properties[QUANTIZATION_KEY])["images"] == 512
    # onnxruntime 1.17, the oldest cnnkit[web] allows, reads IR versions up to 9.
    model = onnx.load(int8_path)
    assert model.ir_version <= 9 and [o.domain for o in model.opset_import] == [""]

    float_predictor = Predictor.from_file(bundled_model_path())
    int8 = OnnxPredictor.from_file(int8_path)
    assert int8.runtime == "onnxruntime int8" and float_predictor.runtime == "pytorch"
    test = np.asarray(
        build_splits(DIGITS, float_predictor.metadata.preprocessing).splits.test.images
    )
    # Calibrated on HASYv2 images, where both score 85.7% on fold 1 (the README's results).
    assert_int8_ranks_as_float(int8.probabilities(test), float_predictor.probabilities(test))


def test_serve_runs_the_int8_copy_when_given_no_model(monkeypatch, caplog) -> None:
    from cnnkit.web import server as server_module
    from cnnkit.web.server import load_predictor

    served = load_predictor(None, threads=1)
    assert served.runtime == "onnxruntime int8"
    assert served.session.get_session_options().intra_op_num_threads == 1
    assert served.metadata == Predictor.from_file(bundled_model_path()).metadata
    # Without onnxruntime, the float model in PyTorch.
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    assert bundled_int8_path() is None
    assert load_predictor(None).runtime == "pytorch"
    # An int8 copy this onnxruntime cannot load gives way to the float model, with a warning.
    monkeypatch.undo()

    real_open = server_module.open_predictor

    def refuse_onnx(path=None, *args, **kwargs):
        if str(path).endswith(".onnx"):
            raise ModelFileError("x.onnx: not a valid ONNX file (Unsupported model IR version)")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(server_module, "open_predictor", refuse_onnx)
    with caplog.at_level(logging.WARNING, logger="cnnkit.web.server"):
        assert load_predictor(None).runtime == "pytorch"
    assert "serving the float bundled model in PyTorch: x.onnx" in caplog.text
    # A model file given by path is served as it is.
    monkeypatch.undo()
    assert load_predictor(str(bundled_model_path())).runtime == "pytorch"


def test_bad_calibration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        quantize_onnx(bundled_model_path(), tmp_path / "x.onnx", np.zeros((0, 1, 32, 32)))
    with pytest.raises(ValueError, match="at least one"):
        calibration_inputs(bundled_model_path(), DIGITS, count=0)
    assert not (tmp_path / "x.onnx").exists()


def test_cli_quantize_needs_data_the_model_file_does_not_record(tmp_path: Path, capsys) -> None:
    assert main(["export", str(bundled_model_path()), "--quantize", "int8"]) != 0
    assert capsys.readouterr().err.strip() == (
        "cnnkit export: error: --quantize int8 calibrates on training images: --data is "
        f"required: {bundled_model_path()} was trained on hasy but does not record where that "
        "data is"
    )
    # Without a model (the bundled one), the line says where its int8 export already is.
    assert main(["export", "--quantize", "int8"]) != 0
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"data is (the bundled model's int8 export ships with cnnkit: {bundled_int8_path()})"
        )
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("val_fraction", ["0.1", "0"])
def test_cli_quantize_calibrates_on_the_runs_own_training_images(
    tmp_path: Path, capsys, val_fraction: str
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--max-steps-per-epoch", "1"]
    argv += ["--max-per-class", "30", "--seed", "3", "--val-fraction", val_fraction]
    assert main([*argv, "--quiet", "--out", str(run)]) == 0
    described = json.loads((run / "run.json").read_text())["data"]  # "... 220 train, 20 val..."
    trained = int(described.split(" train,")[0].rsplit(" ", 1)[1])
    assert trained == (240 if val_fraction == "0" else 220)
    capsys.readouterr()
    assert main(["export", str(run), "--quantize", "int8"]) == 0
    err = capsys.readouterr().err
    assert "Data: digits, as the model file records" in err
    # Not 512 of all 1,797 digits: the run's 30 a class, less its test and validation shares
    # (with no validation share, all of them: the default share left out a tenth).
    assert f"Calibrating int8 ranges on {trained} training images of digits" in err


def test_cli_quantize_writes_the_int8_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "int8.onnx"
    arguments = ["export", str(bundled_model_path()), "--quantize", "int8", "--dataset", "digits"]
    assert main([*arguments, "--calibration-images", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out)
    assert "Calibrating int8 ranges on 32 training images of digits" in printed.err
    assert OnnxPredictor.from_file(out).metadata.num_classes == 369


def test_calibrating_on_another_datasets_classes_is_reported(tiny_model_saver, tmp_path, caplog):
    model = tiny_model_saver(tmp_path / "greek.safetensors", ("alpha", "beta", "gamma"))
    calibration_inputs(model, DIGITS, count=8)
    assert "none of its 10 classes is one of greek.safetensors's 3" in caplog.text
    caplog.clear()
    calibration_inputs(bundled_model_path(), DIGITS, count=8)  # Digits are HASYv2 classes.
    assert "none of its" not in caplog.text


def test_a_folder_too_small_for_a_test_split_still_calibrates(tmp_path: Path, caplog) -> None:
    from PIL import Image

    for name, shade in (("alpha", 0), ("beta", 255)):
        (tmp_path / name).mkdir()
        Image.new("L", (32, 32), shade).save(tmp_path / name / "one.png")
    data = DataConfig(dataset="folder", data=str(tmp_path))
    with pytest.raises(ValueError, match="the test split is empty"):
        build_splits(data, Predictor.from_file(bundled_model_path()).metadata.preprocessing)
    caplog.clear()
    inputs = calibration_inputs(bundled_model_path(), data, count=8)
    # Both images (the only ones), as the model sees them: white is +1, black -1.
    assert inputs.shape == (2, 1, 32, 32)
    assert sorted(float(image.mean()) for image in inputs) == [-1.0, 1.0]
    assert "validation split is empty" not in caplog.text


def test_calibrating_a_train_on_all_model_says_nothing_of_scoring(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--max-steps-per-epoch", "1"]
    assert (
        main([*argv, "--max-per-class", "20", "--train-on-all", "--quiet", "--out", str(run)]) == 0
    )
    caplog.clear()
    assert main(["export", str(run), "--quantize", "int8", "--calibration-images", "8"]) == 0
    assert "Calibrating int8 ranges on 8 training images of digits" in capsys.readouterr().err
    assert "test images were training images" not in caplog.text


def int8_weight_range(path: Path) -> tuple[int, int]:
    """The smallest and largest of the int8 tensors stored in the ONNX file ``path`` (its
    quantized weights and their zero points)."""
    import onnx
    from onnx import numpy_helper

    stored = [
        numpy_helper.to_array(tensor)
        for tensor in onnx.load(path).graph.initializer
        if tensor.data_type == onnx.TensorProto.INT8
    ]
    assert stored
    return min(int(a.min()) for a in stored), max(int(a.max()) for a in stored)


def quantization_details(path: Path) -> dict:
    import onnx

    properties = {p.key: p.value for p in onnx.load(path).metadata_props}
    return json.loads(properties[QUANTIZATION_KEY])


@pytest.mark.parametrize("which", ["exported", "shipped"])
def test_int8_weights_keep_to_7_bits(which: str, quantized: Path) -> None:
    path = quantized if which == "exported" else bundled_int8_path()
    low, high = int8_weight_range(path)
    assert low >= -64 and high <= 64 and high - low > 64
    details = quantization_details(path)
    assert "7-bit" in details["method"] and details["weight_bits"] == 7


def runs_exact_int8(predictor: OnnxPredictor) -> bool:
    """Whether ``predictor``'s session runs onnxruntime's exact (non-saturating) int8 kernels."""
    try:
        entry = predictor.session.get_session_options().get_session_config_entry(
            "session.x64quantprecision"
        )
    except RuntimeError:  # onnxruntime's answer for an entry never set
        return False
    return entry == "1"


@pytest.fixture(scope="module")
def quantized_8_bit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = bundled_model_path()
    inputs = calibration_inputs(model, DIGITS, count=128)
    out = tmp_path_factory.mktemp("int8") / "symbols-8-bit.onnx"
    return quantize_onnx(model, out, inputs, weight_bits=8)


def test_8_bit_weights_fill_the_int8_range(quantized_8_bit: Path) -> None:
    low, high = int8_weight_range(quantized_8_bit)
    assert max(-low, high) > 64
    details = quantization_details(quantized_8_bit)
    assert "8-bit" in details["method"] and details["weight_bits"] == 8
    with pytest.raises(ValueError, match="weight_bits must be 7 or 8; got 6"):
        quantize_onnx(
            bundled_model_path(),
            quantized_8_bit.with_name("x.onnx"),
            np.zeros((1, 1, 32, 32), np.float32),
            weight_bits=6,
        )


def test_8_bit_weights_run_exactly_and_are_warned_of_where_they_saturate(
    quantized_8_bit: Path, quantized: Path, monkeypatch, caplog
) -> None:
    """On a CPU where they saturate, 8-bit weights run in onnxruntime's exact kernels and still
    rank as the float model does (a real check on an AVX2 CPU without VNNI)."""
    from cnnkit.inference import onnx_backend

    float_predictor = Predictor.from_file(bundled_model_path())
    test = np.asarray(
        build_splits(DIGITS, float_predictor.metadata.preprocessing).splits.test.images
    )
    monkeypatch.setattr(onnx_backend, "int8_products_saturate", lambda: True)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        seven = OnnxPredictor.from_file(quantized)
        assert not caplog.records
        eight = OnnxPredictor.from_file(quantized_8_bit)
        [record] = caplog.records
        assert str(quantized_8_bit) in record.getMessage()
        assert "exact kernels" in record.getMessage()
        assert "--quantize int8" in record.getMessage()
        assert runs_exact_int8(eight) and not runs_exact_int8(seven)
        assert_int8_ranks_as_float(eight.probabilities(test), float_predictor.probabilities(test))

        caplog.clear()
        monkeypatch.setattr(onnx_backend, "int8_products_saturate", lambda: False)
        fast = OnnxPredictor.from_file(quantized_8_bit)
        assert not caplog.records
        assert not runs_exact_int8(fast)


@pytest.mark.parametrize(
    "method",
    [[1], 3, "x", None, {"method": None}, {"weight_bits": 8}, {"method": "7-bit weights"}],
)
def test_an_int8_export_of_unknown_weights_runs_exactly_where_they_may_saturate(
    method, quantized: Path, tmp_path: Path, monkeypatch
) -> None:
    import onnx

    from cnnkit.inference import onnx_backend

    model = onnx.load(quantized)
    for prop in model.metadata_props:
        if prop.key == QUANTIZATION_KEY:
            prop.value = json.dumps(method)
    path = tmp_path / "unknown.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(onnx_backend, "int8_products_saturate", lambda: True)
    assert runs_exact_int8(OnnxPredictor.from_file(path))


@pytest.mark.parametrize(
    "text, flags",
    [
        (
            "processor\t: 0\nvmx flags\t: ept\nflags\t\t: fpu avx2 avx512_vnni\n\n"
            "processor\t: 1\nflags\t\t: fpu\n",
            {"fpu", "avx2", "avx512_vnni"},
        ),
        ("processor\t: 0\nFeatures\t: fp asimd asimddp\n", {"fp", "asimd", "asimddp"}),
        ("processor\t: 0\n", None),
    ],
)
def test_cpu_flags_are_read_from_the_kernels_list(text, flags, tmp_path: Path) -> None:
    from cnnkit.runtime import cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_flags(cpuinfo) == flags
    assert cpu_flags(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "flags, machine, saturate",
    [
        ({"avx2", "fma"}, "x86_64", True),
        ({"avx2"}, "AMD64", True),
        ({"avx2", "avx512f", "avx512bw"}, "x86_64", True),  # Skylake-SP: AVX-512, no VNNI
        ({"avx2", "avx512_vnni"}, "x86_64", False),
        ({"avx2", "avx_vnni"}, "x86_64", False),
        ({"sse4_1", "avx"}, "x86_64", False),  # no AVX2: kernels widen to 32 bits first
        ({"asimd"}, "aarch64", False),
    ],
)
def test_int8_products_saturate_on_x86_without_vnni(flags, machine, saturate) -> None:
    from cnnkit.runtime import int8_products_saturate

    assert int8_products_saturate(frozenset(flags), machine) is saturate


def test_unknown_flags_are_not_taken_for_saturation(monkeypatch) -> None:
    from cnnkit import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: None)
    assert runtime.int8_products_saturate(machine="x86_64") is False
