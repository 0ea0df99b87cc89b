"""Tests for the command line: config precedence, predict output formats, and error handling."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from tests.conftest import within_seconds, write_bird_folder

from cnnkit import __version__
from cnnkit.cli import build_parser, main
from cnnkit.cli.predict import format_prediction
from cnnkit.cli.settings import resolve_run_config
from cnnkit.cli.train import _print_history
from cnnkit.data.photos import looks_like_photos
from cnnkit.inference.predictor import Prediction, Predictor
from cnnkit.models.registry import create_model, model_options
from cnnkit.presets import PRESETS

SYMBOL_LINE = re.compile(r"^Prediction: (alpha|beta|gamma), confidence: [01]\.\d\d$")
PHOTO_LINE = re.compile(r"^Prediction: (Cardinal|Blue Jay) \(\d{1,3}\.\d\d%\)$")


def _resolve(*argv: str):
    return resolve_run_config(build_parser().parse_args(["train", *argv]))


def _complete(config):
    """``config`` with every model option spelled out, defaults included."""
    options = {**model_options(config.model.name), **config.model.options}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, options=options))


def _write_images(folder: Path, count: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"image-{index}.png"
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- configuration


def test_dataset_picks_its_preset() -> None:
    digits = _resolve("--dataset", "digits")
    assert digits.model.name == PRESETS["digits"]["model"]["name"]
    assert digits.model.options == PRESETS["digits"]["model"].get("options", {})
    assert digits.train.epochs == PRESETS["digits"]["train"]["epochs"]
    hasy = _resolve("--dataset", "hasy", "--data", "HASYv2.tar.bz2", "--fold", "2")
    assert hasy.train.epochs == PRESETS["hasy"]["train"]["epochs"]
    assert hasy.data.fold == 2 and hasy.data.data == "HASYv2.tar.bz2"
    # No folder preset: the symbol (hasy) defaults.
    folder = _resolve("--dataset", "folder", "--data", "images")
    assert folder.train == hasy.train and folder.model == hasy.model


def test_model_picks_its_preset() -> None:
    book = _resolve("--dataset", "hasy", "--data", "h.tar.bz2", "--model", "book_cnn")
    assert book.data.channels == 3 and book.train.optimizer == "adam"
    assert not book.augment.enabled
    bird = _resolve("--dataset", "cub", "--data", "c.tgz", "--model", "book_bird_cnn")
    assert bird.data.image_size == 256 and bird.augment.max_rotation == 45.0
    lite = _resolve("--dataset", "cub", "--data", "c.tgz", "--model", "efficientnet_lite0")
    assert lite.train.schedule == "cosine" and lite.data.stored_size == 256
    # The default trio's options (320 px, test-time augmentation) do not carry over to lite0.
    assert lite.model.options == {}
    trio = _resolve("--dataset", "cub", "--data", "c.tgz")
    assert trio.model.name == "efficientnet_lite_trio"
    assert trio.model.options == {"image_size": 320, "tta": True} and trio.train.bf16_cpu
    assert trio.train.backbone_lr_scale == 0.3


def test_preset_then_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "train:\n  epochs: 7\n  batch_size: 16\n"
        "model:\n  options:\n    dropout: 0.3\n"
        "augment:\n  max_rotation: 4\n",
        encoding="utf-8",
    )
    config = _resolve("--dataset", "digits", "--config", str(path), "--epochs", "3", "--lr", "0.01")
    assert config.train.epochs == 3  # flag
    assert config.train.batch_size == 16  # file over preset
    assert config.train.learning_rate == 0.01  # flag
    assert config.train.weight_decay == 5e-4  # dataclass default
    assert config.model.options == {**PRESETS["digits"]["model"]["options"], "dropout": 0.3}
    assert config.augment.max_rotation == 4.0
    assert _resolve("--dataset", "digits", "--config", str(path), "--rotation", "2").augment == (
        config.augment.__class__(max_rotation=2.0)
    )
    sized = _resolve("--dataset", "digits", "--config", str(path), "--train-size", "24")
    assert sized.augment.train_size == 24 and sized.augment.max_rotation == 4.0
    split = _resolve("--dataset", "digits", "--micro-batch", "16")
    assert split.train.micro_batch_size == 16 and config.train.micro_batch_size is None


def test_model_named_in_the_config_file_picks_its_preset(tmp_path: Path) -> None:
    path = tmp_path / "book.yaml"
    path.write_text("model:\n  name: book_cnn\n", encoding="utf-8")
    config = _resolve("--dataset", "hasy", "--data", "h.tar.bz2", "--config", str(path))
    assert config.model.name == "book_cnn" and config.data.channels == 3


def test_explicit_preset_wins_over_the_dataset_preset() -> None:
    config = _resolve("--dataset", "digits", "--preset", "book-hasy")
    assert config.model.name == "book_cnn" and config.train.batch_size == 32


def test_flags_reach_every_section() -> None:
    config = _resolve(
        "--dataset",
        "digits",
        "--seed",
        "5",
        "--no-augment",
        "--option",
        "stages=2",
        "--option",
        "dropout=0.1",
        "--width",
        "8",
        "--patience",
        "2",
        "--max-steps-per-epoch",
        "3",
        "--val-fraction",
        "0.25",
        "--out",
        "runs/mine",
        "--phases",
        "frozen",
        "--no-amp",
        "--mixup",
        "0.2",
        "--cutmix",
        "1",
        "--ema",
        "0.995",
    )
    assert config.data.seed == config.train.seed == 5
    assert config.train.mixup_alpha == 0.2 and config.train.cutmix_alpha == 1.0
    assert config.train.ema_decay == 0.995
    assert not config.augment.enabled
    assert config.model.options == {"width": 8, "stages": 2, "dropout": 0.1}
    assert config.train.early_stopping_patience == 2 and config.train.max_steps_per_epoch == 3
    assert config.data.val_fraction == 0.25 and config.out == "runs/mine"
    assert config.transfer.phases == ("frozen",) and config.train.amp is False


def test_another_model_does_not_inherit_the_presets_model_options() -> None:
    # The digits preset sets symbol_cnn's width; an explicitly chosen book_cnn has no width.
    config = _resolve("--dataset", "digits", "--preset", "digits", "--model", "book_cnn")
    assert _resolve("--dataset", "digits", "--preset", "digits").model.options == {"width": 32}
    assert config.model.name == "book_cnn"
    assert "width" not in config.model.options
    assert config.model.options == {"image_size": 32}  # Only what the data settings give it.
    # The preset's other settings stay.
    assert (config.train.epochs, config.train.learning_rate) == (12, 3e-3)
    model = create_model(config.model.name, 10, config.data.channels, **config.model.options)
    assert model(torch.zeros(2, config.data.channels, 32, 32)).shape == (2, 10)
    # Nor an option book_cnn takes too: the hasy preset's dropout was set for symbol_cnn.
    assert _resolve("--dataset", "digits", "--preset", "hasy").model.options["dropout"] == 0.3
    config = _resolve("--dataset", "digits", "--preset", "hasy", "--model", "book_cnn")
    assert config.model.options == {"image_size": 32}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--option", "width"], "KEY=VALUE"),
        (["--preset", "imagenet"], "imagenet"),
        (["--fold", "1"], "--dataset digits has no folds"),
        (["--lr", "inf"], "learning_rate must be a finite number"),
        (["--image-size", "3"], "image_size must be at least 8 pixels"),
        (["--option", "width=abc"], "width must be a whole number; got 'abc'"),
        (["--phases", "frozen"], "symbol_cnn has no pretrained backbone"),
        (["--option", "=3"], "--option needs KEY=VALUE; got '=3' (no key)"),
        (["--data", "some/folder"], "--dataset digits is built in"),
        (["--crop-to-bbox"], "--dataset digits has none"),
    ],
)
def test_invalid_train_arguments_exit_2_with_one_line(capsys, argv, message) -> None:
    assert main(["train", "--dataset", "digits", *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith("cnnkit train: error:") and message in error[0]


def test_config_file_errors_exit_2(capsys, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n", encoding="utf-8")
    assert main(["train", "--dataset", "digits", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{path}: invalid YAML (line 2" in error[0]
    path.write_text("train:\n  epochs: three\n", encoding="utf-8")
    assert main(["train", "--dataset", "digits", "--config", str(path)]) == 2
    assert "train.epochs must be a whole number; got 'three'" in capsys.readouterr().err
    path.write_text("model: efficientnet_lite0\n", encoding="utf-8")
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "section 'model' must be a mapping of fields" in error[0]
    # The settings that pick the preset are checked before they are used to pick it.
    path.write_text("model: {name: [efficientnet_lite0]}\n", encoding="utf-8")
    assert main(["train", "--dataset", "digits", "--config", str(path), "--print-config"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        f"cnnkit train: error: {path}: model.name must be text; got ['efficientnet_lite0']"
    ]


def test_config_file_settings_errors_name_the_file(capsys, tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epoch: 3\n", encoding="utf-8")
    assert main(["train", "--dataset", "digits", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{path}: unknown field(s) in train: epoch" in error[0]
    # Misspelt names and flag spellings get a suggestion; a misspelt section is named as one.
    path.write_text("train: {lr: 0.1, epoch: 3, batch-size: 4, zzz: 1}\n", encoding="utf-8")
    assert main(["train", "--dataset", "digits", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cnnkit train: error: {path}: unknown field(s) in train: batch-size (did you mean "
        "batch_size?), epoch (did you mean epochs?), lr (did you mean learning_rate?), zzz"
    )
    # In the data and model sections too, where the file also names the dataset.
    for section, said in (
        ("data: {dataset: digits, val_fracton: 0.1}", "unknown field(s) in data: val_fracton"),
        ("data: {dataset: digits, on_bad_image: skp}", "on_bad_image must be one of error,"),
        ("data: {dataset: digits}\nmodel: {name: symbl_cnn}", "unknown model 'symbl_cnn'"),
        ("data: {dataset: digits}\nmodel: {options: {widht: 8}}", "model option(s) widht"),
    ):
        path.write_text(section + "\n", encoding="utf-8")
        assert main(["train", "--config", str(path), "--print-config"]) == 2
        assert capsys.readouterr().err.startswith(f"cnnkit train: error: {path}: {said}")
    path.write_text("outt: runs/x\n", encoding="utf-8")
    assert main(["train", "--dataset", "digits", "--config", str(path)]) == 2
    assert f"{path}: unknown section 'outt' (did you mean out?); expected one of [" in (
        capsys.readouterr().err
    )
    # Settings split between the file and the flags are checked together.
    path.write_text("data:\n  data: somewhere/hasy.tar.bz2\n  fold: 2\n", encoding="utf-8")
    assert main(["train", "--dataset", "hasy", "--config", str(path), "--print-config"]) == 0
    assert "fold: 2" in capsys.readouterr().out
    path.write_text("data:\n  dataset: hasy\n", encoding="utf-8")
    argv = ["train", "--data", "h.tar.bz2", "--config", str(path), "--print-config"]
    assert main(argv) == 0
    assert "dataset: hasy" in capsys.readouterr().out
    # A flag's own error does not blame the file.
    assert main([*argv, "--lr", "inf"]) == 2
    error = capsys.readouterr().err
    assert "learning_rate must be a finite number" in error and str(path) not in error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--option", "tta=maybe"], "model option tta must be true or false; got 'maybe'"),
        (
            ["--option", "foo=1"],
            "foo given without a model (--model, or model.name in a --config file) went to "
            "efficientnet_lite_trio",
        ),
        (["--model", "efficientnet_lite_trio", "--option", "foo=1"], "has no option(s) foo"),
        (["--model", "symbol_cnn", "--dense", "64"], "has no option(s) dense"),
    ],
)
def test_print_config_refuses_what_training_would(capsys, options, message) -> None:
    """--print-config writes a file for --config: one training would refuse is an error."""
    argv = ["train", "--dataset", "cub", "--data", "c.tgz", *options, "--print-config"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_a_run_folder_inside_its_folder_dataset_is_refused(capsys, tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    for name in ("a", "b"):
        _write_images(data / name, count=2)
    argv = ["train", "--dataset", "folder", "--data", str(data), "--epochs", "1"]
    for out in (data, data / "runs" / "x"):
        assert main([*argv, "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "is inside the training data folder" in error[0]
    assert sorted(p.name for p in data.iterdir()) == ["a", "b"]  # Nothing written there.


def test_a_run_too_short_to_learn_says_so(capsys, tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    for name in ("a", "b"):
        _write_images(data / name, count=4)
    argv = ["train", "--dataset", "folder", "--data", str(data), "--quiet", "--seed", "1"]
    assert main([*argv, "--epochs", "2", "--out", str(tmp_path / "short")]) == 0
    out = capsys.readouterr().out
    train = int(re.search(r": (\d+) train, ", out).group(1))
    assert (
        f"Note: 2 optimizer step(s) in all ({train} training images in batches of 128, "
        "2 epoch(s)): too few for a network trained from scratch"
    ) in out
    # Enough steps: no note.
    argv += ["--epochs", "10", "--batch-size", "2", "--max-steps-per-epoch", "2"]
    assert main([*argv, "--out", str(tmp_path / "enough")]) == 0
    assert "Note:" not in capsys.readouterr().out
    # Where --max-steps-per-epoch makes the run short, the note names it.
    assert main([*argv, "--epochs", "3", "--out", str(tmp_path / "capped")]) == 0
    assert (
        "Note: 6 optimizer step(s) in all (--max-steps-per-epoch 2, 3 epoch(s)): too few for "
        "a network trained from scratch, whose test figures may stay near chance; train for "
        "more --epochs (or with a higher --max-steps-per-epoch)"
    ) in capsys.readouterr().out


def test_an_evaluation_report_inside_its_folder_dataset_is_refused(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "shapes"
    for name in ("a", "b"):
        _write_images(data / name, count=2)
    argv = ["evaluate", str(symbol_model_file), "--dataset", "folder", "--data", str(data)]
    for out in (data / "a", data / "reports" / "x"):
        assert main([*argv, "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"{out} is inside the data folder {data}: the" in error[0]
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == [
        "a",
        "a/image-0.png",
        "a/image-1.png",
        "b",
        "b/image-0.png",
        "b/image-1.png",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # Weights that no memory holds: refused before the model is built for real.
        (["--model", "efficientnet_lite0", "--option", "hidden=1000000000"], "GiB of free memory"),
        (["--option", "width=100000"], "symbol_cnn with these options has 2,790,016,500,002"),
        # symbol_cnn has no image_size option to suggest; its stages limit the size.
        (["--image-size", "8", "--option", "stages=5"], "use fewer stages or pooling steps"),
        # One class: every test image right, and nothing learned.
        (["--max-classes", "1"], "a classifier needs at least 2 classes; this data has 1"),
    ],
)
def test_runs_that_cannot_train_a_classifier_are_one_line(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--out", str(out), *options]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_patience_without_a_validation_split_is_explained(capsys, tmp_path: Path) -> None:
    argv = ["train", "--dataset", "digits", "--max-classes", "3", "--epochs", "1", "--quiet"]
    assert main([*argv, "--val-fraction", "0", "--patience", "2", "--out", str(tmp_path)]) == 0
    assert "Note: --patience needs a validation split" in capsys.readouterr().out


def test_a_refused_resume_says_why_and_leaves_the_run_as_it_was(capsys, tmp_path: Path) -> None:
    """A checkpoint whose one-cycle schedule the new settings cannot continue: one line that
    says why, and the finished run's run.json and config.yaml keep their exact bytes."""
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--max-classes", "3", "--quiet", "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--schedule", "onecycle"]) == 0
    capsys.readouterr()
    before = {name: (run / name).read_bytes() for name in ("run.json", "config.yaml")}
    again = [*argv, "--epochs", "2", "--schedule", "onecycle", "--max-steps-per-epoch", "1"]
    assert main([*again, "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "optimizer steps in 1 epoch(s), more than this run" in error[0]
    assert {name: (run / name).read_bytes() for name in before} == before
    assert json.loads(before["run.json"])["status"] == "finished"


def test_an_existing_file_as_out_is_one_line(capsys, tmp_path: Path) -> None:
    occupied = tmp_path / "some.txt"
    occupied.write_text("keep me", encoding="utf-8")
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(occupied)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "some.txt" in error[0]
    assert occupied.read_text(encoding="utf-8") == "keep me"


def test_an_interrupt_during_the_final_test_says_how_to_resume(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnnkit.training.trainer import Trainer

    scored = Trainer.predict

    def interrupted(self, loader, desc=None):
        if desc == "testing":  # Ctrl-C while the trained model is scored on the test split.
            raise KeyboardInterrupt
        return scored(self, loader, desc)

    monkeypatch.setattr(Trainer, "predict", interrupted)
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--quiet", "--out", str(out)]
    assert main([*argv, "--max-classes", "3", "--option", "width=8"]) == 130
    printed = capsys.readouterr().out
    assert "\nInterrupted after training, before the model was saved.\n" in printed
    assert f"Checkpoint: {out / 'checkpoint.pt'}; rerun with --resume to continue." in printed
    # The demo says so too (it has no --resume), with no traceback.
    demo = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(demo)]) == 130
    captured = capsys.readouterr()
    assert captured.out.endswith("\nInterrupted after training, before the model was saved.\n")
    assert "Traceback" not in captured.err and "--resume" not in captured.out
    monkeypatch.undo()
    assert main([*argv, "--max-classes", "3", "--option", "width=8", "--resume"]) == 0
    assert (out / "model.safetensors").is_file()


def test_resuming_another_kind_of_models_run_is_one_line_before_any_work(
    capsys, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "checkpoint.pt").write_bytes(b"state")
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--out", str(out), "--resume"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Resuming" not in captured.out and "Data:" not in captured.out  # Nothing loaded.
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and "the checkpoint of a pretrained (transfer) model" in error[0]


def test_a_diverging_run_stops_with_one_line_and_no_model(capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "2", "--quiet", "--out", str(out)]
    assert main([*argv, "--lr", "1e30", "--max-classes", "3"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "training diverged in epoch 1" in error[0]
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "diverged"


def test_an_interrupted_run_says_so_in_run_json(tmp_path: Path) -> None:
    from cnnkit.config import build_run_config
    from cnnkit.presets import preset_for
    from cnnkit.training.run import train_run
    from cnnkit.training.trainer import Callback, TrainingInterrupted

    class CtrlC(Callback):
        def on_epoch_end(self, trainer, metrics) -> None:
            raise KeyboardInterrupt

    overrides = {"data": {"max_classes": 3}, "train": {"epochs": 3}, "out": str(tmp_path / "r")}
    config = build_run_config(preset_for("digits"), overrides)
    with pytest.raises(TrainingInterrupted):
        train_run(config, progress=False, callbacks=[CtrlC()])
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert info["error"] == "training interrupted after 1 completed epoch(s)"


def test_export_refuses_to_overwrite_its_own_model(capsys, symbol_model_file: Path, tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(symbol_model_file.read_bytes())
    assert main(["export", str(model), "--out", str(model)]) == 2
    assert "an ONNX file's name ends in .onnx" in capsys.readouterr().err
    assert model.read_bytes() == symbol_model_file.read_bytes()
    # A model file that is itself named .onnx is not overwritten either.
    misnamed = tmp_path / "model.onnx"
    misnamed.write_bytes(symbol_model_file.read_bytes())
    assert main(["export", str(misnamed), "--out", str(misnamed)]) == 2
    assert misnamed.read_bytes() == symbol_model_file.read_bytes()
    capsys.readouterr()
    # A folder, or a place no file can be made, is refused before the export's work (int8:
    # before the calibration images are decoded; no --data is needed to be refused).
    (tmp_path / "taken.onnx").mkdir()
    (tmp_path / "file").write_text("mine\n")
    for out, said in (
        (tmp_path / "taken.onnx", "taken.onnx: is a folder; give the export's file name"),
        (tmp_path / "file" / "m.onnx", f"{tmp_path / 'file'}: is a file; the export m.onnx needs"),
    ):
        for quantize in ([], ["--quantize", "int8", "--dataset", "digits"]):
            assert main(["export", str(model), "--out", str(out), *quantize]) == 2
            captured = capsys.readouterr()
            assert said in captured.err and "Calibrating" not in captured.err
    assert (tmp_path / "file").read_text() == "mine\n"


def test_export_and_the_torch_backend_refuse_an_onnx_export(
    capsys, symbol_model_file: Path, tmp_path
):
    exported = tmp_path / "m.onnx"
    assert main(["export", str(symbol_model_file), "--out", str(exported)]) == 0
    capsys.readouterr()
    assert main(["export", str(exported), "--out", str(tmp_path / "other.onnx")]) == 2
    assert "is an ONNX export already" in capsys.readouterr().err
    (image,) = _write_images(tmp_path / "images", count=1)
    assert main(["predict", str(exported), str(image), "--backend", "torch"]) == 2
    assert "leave out --backend torch" in capsys.readouterr().err
    assert main(["predict", str(exported), str(image)]) == 0  # ONNX Runtime runs it.


def test_serve_takes_an_upload_limit_in_fractions_of_a_megabyte(monkeypatch) -> None:
    from cnnkit.web import server

    called: dict = {}
    monkeypatch.setattr(server, "serve", lambda model, **options: called.update(options))
    assert main(["serve", "--max-upload-mb", "0.5"]) == 0
    assert called["max_upload_bytes"] == 500_000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--max-upload-mb must be a number above 0; got 0"),
        ("-2", "--max-upload-mb must be a number above 0; got -2"),
        ("inf", "--max-upload-mb must be a number above 0; got inf"),
        ("nan", "--max-upload-mb must be a number above 0; got nan"),
        ("1e-7", "--max-upload-mb 1e-07 is less than one byte (0.000001 MB is one byte)"),
    ],
)
def test_serve_refuses_a_bad_upload_limit_before_announcing(capsys, value, message) -> None:
    assert main(["serve", f"--max-upload-mb={value}"]) == 2
    captured = capsys.readouterr()
    assert "Serving on" not in captured.out and "Traceback" not in captured.err
    assert f"cnnkit serve: error: {message}" in captured.err


@pytest.mark.parametrize(
    "options",
    [["--dataset", "digits"], ["--fold", "3", "--calibration-images", "5"], ["--cache-dir", "c"]],
)
def test_export_options_of_quantize_need_it(capsys, symbol_model_file: Path, tmp_path, options):
    """Without --quantize int8 they would be ignored without a word."""
    out = tmp_path / "m.onnx"
    assert main(["export", str(symbol_model_file), *options, "--out", str(out)]) == 2
    flags = ", ".join(option for option in options if option.startswith("--"))
    assert f"{flags}: only --quantize int8 reads them" in capsys.readouterr().err
    assert not out.exists()


def test_print_config_shows_the_resolved_settings_and_reads_back(capsys, tmp_path: Path):
    argv = ["--dataset", "cub", "--data", "c.tgz", "--epochs", "3", "--micro-batch", "8"]
    assert main(["train", *argv, "--print-config", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "efficientnet_lite_trio" in printed and "micro_batch_size: 8" in printed
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed, encoding="utf-8")
    again = _resolve("--dataset", "cub", "--config", str(saved))
    assert _complete(again) == _complete(_resolve(*argv, "--out", str(tmp_path / "run")))
    assert again.model.options["drop_path"] == 0.0  # defaults are written out too
    assert again.train.epochs == 3 and again.train.backbone_lr_scale == 0.3
    assert main(["search", "--dataset", "digits", "--epochs", "2", "--print-config"]) == 0
    searched = capsys.readouterr().out
    assert "dataset: digits" in searched and "  epochs: 2\n" in searched
    assert "\nout: null\n" in searched  # the search's own folder is not a training setting
    # A --config file's out is the search's folder, as for train.
    config_file = tmp_path / "settings.yaml"
    config_file.write_text(f"out: {tmp_path / 'my-search'}\n", encoding="utf-8")
    argv = ["search", "--dataset", "digits", "--config", str(config_file), "--print-config"]
    assert main(argv) == 0
    assert f"\nout: {tmp_path / 'my-search'}\n" in capsys.readouterr().out


def test_search_holds_out_a_validation_split_where_the_preset_has_none(capsys) -> None:
    # The hasy preset trains on all of a fold's training images; trials need held-out ones.
    argv = ["search", "--dataset", "hasy", "--data", "h.tar.bz2", "--fold", "1"]
    assert main([*argv, "--space", "symbol", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "  val_fraction: 0.1\n" in captured.out
    assert "10% of the training images are held out" in captured.err
    assert main([*argv, "--space", "symbol", "--val-fraction", "0", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "  val_fraction: 0.0\n" in captured.out and captured.err == ""


def test_print_config_reads_back_under_another_preset(capsys, tmp_path: Path) -> None:
    # Every model option is printed, so the hasy preset's own options cannot creep back in.
    argv = ["--dataset", "hasy", "--data", "h.tar.bz2", "--preset", "digits"]
    assert main(["train", *argv, "--print-config"]) == 0
    saved = tmp_path / "digits.yaml"
    saved.write_text(capsys.readouterr().out, encoding="utf-8")
    again = _resolve("--dataset", "hasy", "--config", str(saved))
    assert _complete(again) == _complete(_resolve(*argv))


def test_train_size_a_model_cannot_take_stops_before_any_data_loads(capsys, tmp_path: Path):
    path = tmp_path / "augment.yaml"
    path.write_text("augment:\n  enabled: true\n", encoding="utf-8")
    argv = ["--model", "book_cnn", "--config", str(path), "--out", str(tmp_path / "run")]
    assert main(["train", "--dataset", "digits", *argv, "--train-size", "24"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "book_cnn cannot train on 24 px crops" in error[0]
    assert not (tmp_path / "run").exists()


def test_a_folder_of_photos_gets_the_transfer_recipe_and_symbols_the_symbol_network(
    tmp_path, capsys
):
    photos = write_bird_folder(tmp_path / "birds", per_class=3)  # 64x48 colour photos
    chosen = build_parser().parse_args(["train", "--dataset", "folder", "--data", str(photos)])
    config = resolve_run_config(chosen)
    assert config.model.name == "efficientnet_lite0" and config.data.image_size == 224
    assert "Photos (6 images, median 64x48, colour)" in chosen.chosen_because
    # Named models and presets are never second-guessed.
    named = _resolve("--dataset", "folder", "--data", str(photos), "--model", "symbol_cnn")
    assert named.model.name == "symbol_cnn"
    # Options of the symbol network say which model is meant, and a search's space decides.
    widened = _resolve("--dataset", "folder", "--data", str(photos), "--width", "48")
    assert widened.model.name == "symbol_cnn" and widened.model.options["width"] == 48
    argv = ["search", "--dataset", "folder", "--data", str(photos), "--space", "symbol"]
    assert main([*argv, "--print-config"]) == 0
    assert "name: symbol_cnn" in capsys.readouterr().out
    for index, name in enumerate(("alpha", "beta")):  # 24 px symbols: the symbol network
        _write_images(tmp_path / "symbols" / name, count=2 + index)
    symbols = _resolve("--dataset", "folder", "--data", str(tmp_path / "symbols"))
    assert symbols.model.name == "symbol_cnn" and symbols.data.image_size == 32
    # Large grey scans are not photos either; a CSV is sampled from its first rows.
    rows = ["path,label"]
    for index in range(4):
        Image.new("L", (200, 160), 40 * index).save(tmp_path / f"scan-{index}.png")
        rows.append(f"scan-{index}.png,{'ab'[index % 2]}")
    (tmp_path / "scans.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    scans = _resolve("--dataset", "csv", "--data", str(tmp_path / "scans.csv"))
    assert scans.model.name == "symbol_cnn"
    assert looks_like_photos("csv", str(tmp_path / "scans.csv")) == (
        False,
        "4 images, median 200x160, grey",
    )
    # The run says why, and --print-config too, as a comment the file reads back past.
    argv = ["train", "--dataset", "csv", "--data", str(tmp_path / "scans.csv")]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        "# Not colour photos (4 images, median 200x160, grey): training symbol_cnn on 32x32 "
        "grayscale (--channels 3 keeps colour); --model efficientnet_lite0 trains the photo "
        "recipe\n"
    )
    assert main([*argv, "--channels", "3", "--image-size", "48", "--print-config"]) == 0
    assert capsys.readouterr().out.startswith(
        "# Not colour photos (4 images, median 200x160, grey): training symbol_cnn on 48x48 "
        "colour; --model efficientnet_lite0 trains the photo recipe\n"
    )
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    again = _resolve("--config", str(tmp_path / "printed.yaml"))
    assert again.model.name == "symbol_cnn" and again.data.data == str(tmp_path / "scans.csv")


def test_a_csv_of_photos_is_sampled_where_its_reader_finds_the_files(tmp_path) -> None:
    """Backslash paths (a CSV written on Windows) and a CSV reached through a link in another
    folder are read by the CSV source; the photo check looked for those files elsewhere."""
    photos = write_bird_folder(tmp_path / "data" / "birds", per_class=3)
    rows = [
        f"birds\\{path.parent.name}\\{path.name},{path.parent.name}"
        for path in sorted(photos.glob("*/*.jpg"))
    ]
    listed = tmp_path / "data" / "windows.csv"
    listed.write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    linked = tmp_path / "elsewhere" / "linked.csv"
    linked.symlink_to(listed)
    for csv_file in (listed, linked):
        verdict = looks_like_photos("csv", str(csv_file))
        assert verdict == (True, "6 images, median 64x48, colour"), csv_file


def test_a_home_folder_tilde_is_expanded_where_no_shell_expands_it(tmp_path, monkeypatch):
    """``--data=~/x`` (the shell expands no ``~`` after ``=``) and paths in a config file."""
    monkeypatch.setenv("HOME", str(tmp_path))
    photos = write_bird_folder(tmp_path / "birds", per_class=2)
    argv = ["train", "--dataset=folder", "--data=~/birds", "--cache-dir=~/cache", "--out=~/run"]
    args = build_parser().parse_args(argv)
    assert args.cache_dir == str(tmp_path / "cache")
    flags = resolve_run_config(args)
    assert (flags.data.data, flags.out) == (str(photos), str(tmp_path / "run"))
    config = tmp_path / "settings.yaml"
    config.write_text(
        "data: {dataset: folder, data: ~/birds, cache_dir: ~/cache}\nout: ~/run\n", "utf-8"
    )
    for command in ("predict", "evaluate", "export", "serve"):
        args = build_parser().parse_args([command, "--model=~/run"])
        assert getattr(args, "model_flag", args.model) == str(tmp_path / "run"), command
    from_file = _resolve("--config=~/settings.yaml")
    assert (from_file.data.data, from_file.data.cache_dir) == (str(photos), str(tmp_path / "cache"))
    assert from_file.out == str(tmp_path / "run")


def test_a_printed_config_for_data_not_there_yet_says_what_it_assumed(tmp_path, capsys):
    missing = tmp_path / "later.csv"
    argv = ["train", "--dataset", "csv", "--data", str(missing), "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        f"# {missing} does not exist yet, so its images were not looked at: training symbol_cnn, "
        "as for symbols; a csv of colour photos would train efficientnet_lite0\n"
    )
    assert "name: symbol_cnn" in printed


def test_a_fifo_csv_is_no_photo_set_and_is_not_waited_on(tmp_path) -> None:
    """``--data <(grep ...)``: sampling the CSV must not block on a pipe nobody writes."""
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    assert looks_like_photos("csv", str(fifo)) == (False, "")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_predict_with_the_bundled_model_reports_a_fifo_and_does_not_wait_on_it(
    tmp_path, capsys
) -> None:
    fifo = tmp_path / "drawing.png"
    os.mkfifo(fifo)
    assert within_seconds(60, lambda: main(["predict", str(fifo)])) == 1
    assert "not a regular file" in capsys.readouterr().err


def test_an_option_the_presets_model_lacks_says_which_model_got_it(tmp_path) -> None:
    from cnnkit.cli.arguments import CommandError

    birds = write_bird_folder(tmp_path / "birds", 4)
    with pytest.raises(CommandError) as refused:
        _resolve("--dataset", "folder", "--data", str(birds), "--option", "image_size=64")
    message = str(refused.value)
    assert (
        "image_size given without a model (--model, or model.name in a --config file) went to "
        "symbol_cnn, the hasy preset's" in message
    )
    assert "name the model they are for with --model" in message
    named = _resolve(
        "--dataset",
        "folder",
        "--data",
        str(birds),
        "--model",
        "efficientnet_lite_trio",
        "--option",
        "image_size=64",
    )
    assert named.model.options["image_size"] == 64 and named.data.image_size == 64


def test_option_values_written_like_1e_1_are_numbers() -> None:
    config = _resolve("--dataset", "digits", "--option", "dropout=1e-1", "--option", "width=16")
    assert config.model.options["dropout"] == 0.1 and config.model.options["width"] == 16


def test_the_config_file_may_name_the_dataset(capsys, tmp_path: Path) -> None:
    path = tmp_path / "digits.yaml"
    path.write_text("data:\n  dataset: digits\n", encoding="utf-8")
    config = _resolve("--config", str(path))
    assert config.data.dataset == "digits" and config.model.name == "symbol_cnn"  # its preset
    assert main(["train", "--epochs", "1", "--print-config"]) == 2
    assert "--dataset is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --resume belongs to train; a search continues by itself.
        main(["search", "--dataset", "digits", "--resume"])


def test_resume_says_what_it_found_and_refuses_a_mismatched_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--quiet", "--out", str(run)]
    assert main([*argv, "--max-classes", "3", "--resume"]) == 0
    assert f"No checkpoint in {run}: starting fresh" in capsys.readouterr().out
    assert main([*argv, "--max-classes", "3", "--epochs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"Resuming from {run / 'checkpoint.pt'}" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("epoch")] == [
        ["epoch", "1"],
        ["epoch", "2"],
    ]
    assert main([*argv, "--max-classes", "4", "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "checkpoint.pt: its run trained on other class_names" in error[0]
    assert main([*argv, "--max-classes", "3", "--width", "8", "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "checkpoint.pt: does not match this run's model" in error[0]
    assert main([*argv, "--max-classes", "3", "--train-on-all"]) == 0
    out = capsys.readouterr().out
    assert f"Note: {run} holds an earlier run" in out
    assert "(images it trained on: --train-on-all)" in out


def test_under_torchrun_rank_0_alone_prints_an_error_every_process_meets(
    capsys, monkeypatch, tmp_path
) -> None:
    """Every torchrun process reads the same options and files: a refusal is said once a
    machine (its local rank 0), and by every process with -v."""
    from cnnkit.cli import _said_by_rank_0
    from cnnkit.training.checkpoint import CheckpointError

    argv = ["train", "--dataset", "folder", "--data", str(tmp_path / "missing"), "--quiet"]
    said = f"{tmp_path / 'missing'}: no such archive, folder or file"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    train = build_parser().parse_args(["train", "--dataset", "digits"])
    for local_rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(argv) == 2
        assert (said in capsys.readouterr().err) is printed
        assert _said_by_rank_0(train, CheckpointError("refused")) is not printed
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["-v", *argv]) == 2 and said in capsys.readouterr().err
    # Another rank's own failure (a file it alone cannot read) is printed where it happened.
    assert not _said_by_rank_0(train, OSError("cannot read"))
    # Other commands are not torchrun's: they print, whatever the environment says.
    export = ["export", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "m.txt")]
    assert main(export) == 2 and "cnnkit export: error:" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")  # One process: it prints, whatever RANK says.
    assert not _said_by_rank_0(train, CheckpointError("refused"))


def test_transfer_history_sums_up_the_frozen_phase_and_numbers_each_phase_from_one(
    capsys, monkeypatch
) -> None:
    rows = [{"epoch": e, "train_loss": 1.0 / e, "phase": 1.0} for e in (1, 2, 3)]
    rows += [{"epoch": 4, "train_loss": 0.5, "phase": 2.0}, {"epoch": 5, "phase": 2.0}]
    _print_history(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("frozen      3 epochs, last: epoch   3  train_loss 0.3333")
    assert [line.split()[:3] for line in lines[1:]] == [
        ["fine-tune", "epoch", "1"],
        ["fine-tune", "epoch", "2"],
    ]
    # Output that is not a terminal printed the fine-tune's epochs as they ended.
    monkeypatch.setattr("cnnkit.progress.plain_lines", lambda progress: True)
    _print_history(rows, progress=True)
    assert capsys.readouterr().out.splitlines() == lines[:1]


def test_version_and_models(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cnnkit {__version__}"
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert "book_cnn" in listed and "symbol_cnn" in listed and "width=64" in listed
    # Each model says what it is, on one line, with no reST markup.
    assert "book_cnn: The book's final HASY network (--dense 1024 gives" in listed
    assert "``" not in listed
    # What each preset trains, as --print-config shows it (not only the models' own defaults).
    assert "  hasy: symbol_cnn (width=32, dropout=0.3)" in listed
    assert "  cub: efficientnet_lite_trio (image_size=320, tta=True)" in listed


# ----------------------------------------------------------------------------- predict


def test_prediction_formats() -> None:
    symbol = Prediction("\\alpha", 0, 0.876)
    assert format_prediction(symbol, "symbols") == "Prediction: \\alpha, confidence: 0.88"
    photo = Prediction("Cardinal", 3, 0.97324)
    assert format_prediction(photo, "photos") == "Prediction: Cardinal (97.32%)"


def test_predict_symbol_model_prints_the_books_format(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    (image,) = _write_images(tmp_path)
    assert main(["predict", str(symbol_model_file), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and SYMBOL_LINE.match(lines[0]), lines
    best = Predictor.from_file(symbol_model_file).predict([image])[0][0]
    assert lines[0] == f"Prediction: {best.label}, confidence: {best.confidence:.2f}"


def test_predict_photo_model_prints_a_percentage(
    capsys, photo_model_file: Path, tmp_path: Path
) -> None:
    (image,) = _write_images(tmp_path)
    assert main(["predict", "--model", str(photo_model_file), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and PHOTO_LINE.match(lines[0]), lines
    best = Predictor.from_file(photo_model_file).predict([image])[0][0]
    assert lines[0] == f"Prediction: {best.label} ({best.confidence * 100:.2f}%)"


def test_predict_top_k_lists_runners_up(capsys, symbol_model_file: Path, tmp_path: Path) -> None:
    (image,) = _write_images(tmp_path)
    assert main(["predict", str(symbol_model_file), str(image), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert re.match(r"^  2\. (alpha|beta|gamma), confidence: [01]\.\d\d$", lines[1])
    assert lines[2].startswith("  3. ")


def test_predict_json(capsys, symbol_model_file: Path, tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "in", count=2)
    argv = ["predict", str(symbol_model_file), *map(str, paths), "--json", "--top-k", "2"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [item["image"] for item in payload] == [str(p) for p in paths]
    for item in payload:
        assert len(item["predictions"]) == 2
        assert set(item["predictions"][0]) == {"label", "index", "confidence"}


def test_predict_folder_prefixes_each_line_with_the_file(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "samples"
    paths = _write_images(folder, count=3)
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    # Hidden files and folders are left out, as a folder dataset leaves them out.
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.png").write_bytes(paths[0].read_bytes())
    (folder / ".hidden.png").write_bytes(paths[0].read_bytes())
    assert main(["predict", str(symbol_model_file), str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for path, line in zip(paths, lines, strict=True):
        prefix = f"{path}: "
        assert line.startswith(prefix) and SYMBOL_LINE.match(line.removeprefix(prefix))


def test_predict_reports_a_bad_image_and_goes_on(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    (good,) = _write_images(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    assert main(["predict", str(symbol_model_file), str(bad), str(good)]) == 1
    captured = capsys.readouterr()
    assert "bad.png" in captured.err
    assert len(captured.out.splitlines()) == 1 and str(good) in captured.out


def test_predict_goes_through_a_folder_a_batch_at_a_time_in_order(
    capsys, monkeypatch, symbol_model_file: Path, tmp_path: Path
) -> None:
    """Batches, as fast as the Python API; a batch with a bad file is predicted file by file,
    and every line keeps its file's place."""
    from cnnkit.inference.predictor import Predictor

    paths = _write_images(tmp_path / "images", count=5)
    paths[2].write_bytes(b"\x89PNG broken")
    assert main(["predict", str(symbol_model_file), *map(str, paths), "--json"]) == 1
    expected = {entry["image"]: entry for entry in json.loads(capsys.readouterr().out)}
    sizes = []
    original = Predictor.predict

    def predict(self, images, top_k=5):
        sizes.append(len(images))
        return original(self, images, top_k)

    monkeypatch.setattr(Predictor, "predict", predict)
    monkeypatch.setattr("cnnkit.cli.predict.PREDICT_CHUNK", 2)
    assert main(["predict", str(symbol_model_file), *map(str, paths), "--top-k", "2"]) == 1
    captured = capsys.readouterr()
    assert sizes == [2, 2, 1, 1, 1]  # The batch holding the broken file, again file by file.
    (error,) = captured.err.splitlines()
    assert error.startswith(f"error: {paths[2]}: not a readable image (")
    lines = [line for line in captured.out.splitlines() if not line.startswith("  ")]
    good = [path for index, path in enumerate(paths) if index != 2]
    assert [line.split(": Prediction: ")[0] for line in lines] == [str(p) for p in good]
    for path, line in zip(good, lines, strict=True):  # The same answers as in one batch.
        best = expected[str(path)]["predictions"][0]
        assert line == f"{path}: Prediction: {best['label']}, confidence: {best['confidence']:.2f}"


def test_predict_takes_a_run_folder_as_the_model(capsys, symbol_model_file: Path, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(symbol_model_file.read_bytes())
    (image,) = _write_images(tmp_path / "images", count=1)
    assert main(["predict", str(run), str(image), "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["image"] == str(image)  # Not the bundled model run over the folder.
    assert main(["predict", str(symbol_model_file), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [answer]


def test_predict_without_images_exits_2(capsys, symbol_model_file: Path) -> None:
    assert main(["predict", str(symbol_model_file)]) == 2
    assert "no images given" in capsys.readouterr().err


def test_interactive_loop(
    capsys, monkeypatch: pytest.MonkeyPatch, symbol_model_file: Path, tmp_path: Path
) -> None:
    first, second = _write_images(tmp_path, count=2)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"junk")
    lines = [str(first), str(tmp_path / "missing.png"), str(junk), str(second), "", str(first)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    # The loop goes on after bad names, and the exit status says some failed, as in batch mode.
    assert main(["predict", str(symbol_model_file), "--interactive"]) == 1
    out = capsys.readouterr().out
    answers = [part.strip() for part in out.split("Enter filename:") if part.strip()]
    assert len(answers) == 4  # Two predictions and two errors; the empty line ends the loop.
    assert SYMBOL_LINE.match(answers[0]) and SYMBOL_LINE.match(answers[3])
    assert answers[1].startswith("error:") and "missing.png" in answers[1]
    assert answers[2].startswith("error:") and "junk.png" in answers[2]
    assert out.count("Enter filename:") == 5


def test_interactive_loop_takes_quoted_names_folders_and_json(
    capsys, monkeypatch: pytest.MonkeyPatch, symbol_model_file: Path, tmp_path: Path
) -> None:
    first, second = _write_images(tmp_path / "pair", count=2)
    (given,) = _write_images(tmp_path / "given", count=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"  # A run's folder typed in: not its figures read as images.
    (run / "report").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(symbol_model_file.read_bytes())
    (run / "report" / "confusion.png").write_bytes(first.read_bytes())
    lines = [f"'{first}'", str(tmp_path / "pair"), str(empty), str(run), str(symbol_model_file)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    command = ["predict", str(symbol_model_file), str(given), "--interactive", "--json"]
    assert main(command) == 1  # The empty folder and the two models failed.
    captured = capsys.readouterr()
    # Stdout is JSON only: the command line's image (indented), then one line per name
    # (``[]`` for the empty folder).
    decoder, out = json.JSONDecoder(), captured.out.strip()
    document, end = decoder.raw_decode(out)
    answers = [json.loads(line) for line in out[end:].strip().splitlines()]
    assert [[item["image"] for item in answer] for answer in [document, *answers]] == [
        [str(given)],
        [str(first)],
        [str(first), str(second)],
        [],
        [],
        [],
    ]
    assert "Enter filename:" in captured.err and "empty: no image files found" in captured.err
    assert f"error: {run}: a training run's folder, not an image (the model is" in captured.err
    assert f"error: {symbol_model_file}: a model file, not an image (" in captured.err


def test_predict_empty_folder_and_bad_top_k_exit_2(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    assert main(["predict", str(symbol_model_file), str(tmp_path)]) == 2
    assert f"{tmp_path}: no image files found" in capsys.readouterr().err
    (image,) = _write_images(tmp_path, count=1)
    with pytest.raises(SystemExit) as exited:  # argparse's usage error.
        main(["predict", str(symbol_model_file), str(image), "--top-k", "0"])
    assert exited.value.code == 2
    assert "argument --top-k: must be >= 1; got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--patience", "0"], "argument --patience: must be >= 1; got 0"),
        (["train", "--epochs", "-1"], "argument --epochs: must be >= 1; got -1"),
        (["train", "--batch-size", "2.5"], "argument --batch-size: expected a whole number"),
        (["train", "--val-fraction", "1.5"], "argument --val-fraction: must be at least 0 and "),
        (["evaluate", "--test-fraction", "-0.1"], "argument --test-fraction: must be at least 0"),
        (["train", "--fold", "11"], "argument --fold: must be from 1 to 10; got 11"),
        (["search", "--n-trials", "0"], "argument --n-trials: must be >= 1; got 0"),
        (["export", "--calibration-images", "0"], "argument --calibration-images: must be >= 1"),
    ],
)
def test_a_bad_number_is_refused_naming_its_flag(argv, message, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's usage error.
        main([*argv, "--dataset", "digits", "--cache-dir", str(tmp_path / "cache")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_predict_reports_an_empty_folder_and_predicts_the_other_images(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (image,) = _write_images(tmp_path / "images", count=1)
    assert main(["predict", str(symbol_model_file), str(empty), str(image)]) == 1
    captured = capsys.readouterr()
    assert f"{empty}: no image files found" in captured.err
    # Named like every line when several inputs are given, as when a bad file is among them.
    assert captured.out.startswith(f"{image}: ")
    assert SYMBOL_LINE.match(captured.out.strip().removeprefix(f"{image}: "))
    # One image named alone prints the book's line as it is; one found in a folder is named.
    assert main(["predict", str(symbol_model_file), str(image)]) == 0
    assert SYMBOL_LINE.match(capsys.readouterr().out.strip())
    assert main(["predict", str(symbol_model_file), str(image.parent)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


def test_every_command_says_why_a_run_folder_has_no_model(capsys, tmp_path: Path) -> None:
    """evaluate, export and serve said only "a folder with no model.safetensors in it" of a
    run that diverged, failed or is unfinished: they now say which, and what to do."""
    run = tmp_path / "run"
    run.mkdir()
    info = {"status": "failed", "cnnkit_version": "0.1.0", "error": "out of memory"}
    (run / "run.json").write_text(json.dumps(info))
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.yaml").write_text("{}\n")
    for command in (["evaluate"], ["export"], ["serve", "--port", "0"]):
        assert main([*command, str(run)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"cnnkit {command[0]}: error: {run}: a training run's folder without a "
            "model.safetensors (the run failed: out of memory)"
        )
        assert main([*command, str(tmp_path / "search")]) == 2
        assert "is a search folder, not a model" in capsys.readouterr().err
    assert main(["predict", "--model", str(run), "image.png"]) == 2  # The flag, as the word.
    assert "(the run failed: out of memory)" in capsys.readouterr().err
    for status, why in (
        ("pruned", "a search pruned this trial before it finished, so it saved no model"),
        ("finished", "the run finished, but its model file has since been removed"),
    ):
        (run / "run.json").write_text(json.dumps({"status": status, "cnnkit_version": "0.1"}))
        assert main(["evaluate", str(run)]) == 2
        assert capsys.readouterr().err.strip().endswith(f"model.safetensors ({why})")


def test_predict_refuses_a_first_input_meant_as_a_model(capsys, tmp_path: Path) -> None:
    """Without a model the bundled one answers, so a mistyped or unfinished model is refused
    rather than having the bundled model's predictions pass for its."""
    (image,) = _write_images(tmp_path / "images", count=1)
    missing = tmp_path / "runs" / "hasy-symbol_cnn"
    assert main(["predict", str(missing), str(image)]) == 2
    captured = capsys.readouterr()
    assert f"{missing}: no such model file, run folder or image" in captured.err
    assert captured.out == ""
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text('{"status": "running", "cnnkit_version": "0.1.0"}')
    assert main(["predict", str(unfinished), str(image)]) == 2
    error = capsys.readouterr().err
    assert "run's folder without a model.safetensors (the run has not finished: `cnnkit" in error
    # A run that diverged saved no model and cannot be resumed: its own error says what to do.
    said = "training diverged in epoch 1 (loss nan); lower the learning rate and start afresh"
    info = {"status": "diverged", "cnnkit_version": "0.1.0", "error": said}
    (unfinished / "run.json").write_text(json.dumps(info))
    assert main(["predict", str(unfinished), str(image)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cnnkit predict: error: {unfinished}: a training run's folder without a "
        f"model.safetensors (the run diverged: {said})"
    )
    # A missing image as the first input is still an image: reported, the others predicted.
    assert main(["predict", str(tmp_path / "missing.png"), str(image)]) == 1
    captured = capsys.readouterr()
    assert "missing.png" in captured.err and str(image) in captured.out


def test_interactive_loop_ends_at_end_of_input(
    capsys, monkeypatch: pytest.MonkeyPatch, symbol_model_file: Path, tmp_path: Path
) -> None:
    (image,) = _write_images(tmp_path, count=1)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{image}\n"))
    assert main(["predict", "--model", str(symbol_model_file), "--interactive"]) == 0
    assert capsys.readouterr().out.count("Prediction:") == 1


@pytest.mark.parametrize("content", [None, b"", b"garbage" * 10, "truncated"])
def test_bad_model_file_exits_2_with_one_line(
    capsys, content, symbol_model_file: Path, tmp_path: Path
) -> None:
    (image,) = _write_images(tmp_path)
    model = tmp_path / "model.safetensors"
    if content == "truncated":
        model.write_bytes(symbol_model_file.read_bytes()[:-100])
    elif content is not None:
        model.write_bytes(content)
    assert main(["predict", str(model), str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error = captured.err.strip().splitlines()
    assert len(error) == 1, error
    assert error[0].startswith("cnnkit predict: error: ") and "model.safetensors" in error[0]


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_json(capsys, tiny_model_saver, tmp_path: Path) -> None:
    model = tiny_model_saver(tmp_path / "digits.safetensors", tuple(str(d) for d in range(10)))
    argv = [
        "evaluate",
        str(model),
        "--dataset",
        "digits",
        "--max-per-class",
        "10",
        "--json",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "evaluation"),
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 20  # 20% of ten images of each of ten digits
    for key in ("top1", "top5", "macro_precision", "macro_recall", "macro_f1"):
        assert 0.0 <= report[key] <= 1.0
    assert isinstance(report["most_confused"], list)
    for name in ("metrics.json", "per_class.csv", "confusion.png", "misclassified.png"):
        assert (tmp_path / "evaluation" / name).is_file()
    # The report names what it scored, in the printed JSON and in metrics.json alike.
    evaluated = {
        "model": str(model.resolve()),
        "architecture": "symbol_cnn",
        "dataset": "digits",
        "data": None,
        "fold": None,
        "split": "test",
        "max_per_class": 10,
    }
    assert report["evaluated"] == evaluated
    saved = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert saved["evaluated"] == evaluated and saved["top1"] == report["top1"]


def test_evaluate_rejects_classes_the_model_does_not_know(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    argv = ["evaluate", str(symbol_model_file), "--dataset", "digits", "--max-per-class", "5"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "evaluation")]
    assert main(argv) == 2
    assert "digits: the model knows none of the data's classes" in capsys.readouterr().err


def test_evaluate_a_model_of_some_classes_on_their_images(
    capsys, caplog, tiny_model_saver, tmp_path: Path
) -> None:
    model = tiny_model_saver(tmp_path / "three.safetensors", ("0", "1", "2"))
    argv = ["evaluate", str(model), "--dataset", "digits", "--max-per-class", "10", "--json"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "evaluation")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 6  # 20% of ten images of each of the model's three digits
    assert "the model knows 3 of the data's 10 classes" in caplog.text


def test_a_default_run_folder_with_a_finished_run_is_kept(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset", "digits", "--max-classes", "3", "--epochs", "1", "--quiet"]
    first, second = Path("runs/digits-symbol_cnn"), Path("runs/digits-symbol_cnn-2")
    assert main(argv) == 0
    capsys.readouterr()
    kept = (first / "model.safetensors").read_bytes()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"Note: {first} holds a finished run; this one goes to {second}" in out
    assert (first / "model.safetensors").read_bytes() == kept
    assert (second / "model.safetensors").is_file()
    # --resume continues the newest of them.
    assert main([*argv[:-3], "--epochs", "2", "--quiet", "--resume"]) == 0
    assert f"Resuming from {second / 'checkpoint.pt'}" in capsys.readouterr().out
    assert not Path("runs/digits-symbol_cnn-3").exists()


def test_evaluate_on_a_missing_device_is_one_line(capsys, symbol_model_file) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["evaluate", str(symbol_model_file), "--dataset", "digits", "--device", "cuda"]
    assert main(argv) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("device 'cuda' requested but CUDA is not available")
    )


def test_help_offers_only_what_each_command_uses(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = capsys.readouterr().out
    assert "--train-on-all" not in text  # A search ranks trials on held-out images.
    assert "search folder (default runs/search-<dataset>-<space>)" in text
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    # The model file decides its input, and evaluate holds no validation images out.
    for option in ("--channels", "--image-size", "--val-fraction"):
        assert option not in text
    assert "--max-per-class" in text and "--test-fraction" in text


def test_evaluate_a_test_split_without_the_models_classes_is_one_line(
    capsys, tiny_model_saver, tmp_path: Path
) -> None:
    """The model knows b and c; the folder's one b image lands in its training share, so no
    test image is left to score: a clear error, not an IndexError from an empty argmax."""
    model = tiny_model_saver(tmp_path / "bc.safetensors", ("b", "c"))
    data = tmp_path / "letters"
    _write_images(data / "a", 12)
    _write_images(data / "b", 1)
    argv = ["evaluate", str(model), "--dataset", "folder", "--data", str(data)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "evaluation")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{data}: none of the 2 test images are of the model's classes (e.g. b, c)" in error
    assert not (tmp_path / "evaluation").exists()


def test_evaluate_an_onnx_export_ignores_device_with_a_warning(
    capsys, caplog, symbol_model_file: Path, tmp_path: Path
) -> None:
    """An .onnx file runs on ONNX Runtime's CPU provider (as --help says): --device cuda must
    not fail for want of CUDA, and the warning says it is not used."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    exported = tmp_path / "m.onnx"
    assert main(["export", str(symbol_model_file), "--out", str(exported)]) == 0
    data = tmp_path / "greek"
    for name in ("alpha", "beta", "gamma"):
        _write_images(data / name, 5)
    argv = ["evaluate", str(exported), "--dataset", "folder", "--data", str(data), "--json"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "evaluation")]
    capsys.readouterr()
    assert main([*argv, "--device", "cuda"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 3
    assert "runs on ONNX Runtime's CPU provider; --device cuda is ignored" in caplog.text


def test_an_os_error_is_one_line_without_pythons_errno_prefix(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--max-steps-per-epoch", "1"]
    assert main([*argv, "--quiet", "--out", str(run)]) == 0
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(taken / "page.html")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"cnnkit report: error: cannot write {taken / 'page.html'}: {taken} is a file, not a folder"
    )
    # Never over a run's own files: a page named like them is refused before it is written.
    for name in ("metrics.csv", "model.safetensors"):
        before = (run / name).read_bytes()
        assert main(["report", str(run), "--out", str(run / name)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"cnnkit report: error: --out {run / name}: the report is an HTML page, so its name "
            "ends in .html"
        )
        assert (run / name).read_bytes() == before
    (run / "pages.html").mkdir()
    assert main(["report", str(run), "--out", str(run / "pages.html")]) == 2
    assert "a folder; give the HTML file's name" in capsys.readouterr().err


def test_evaluate_refuses_a_file_as_its_report_folder_before_scoring(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    argv = ["evaluate", str(symbol_model_file), "--dataset", "digits", "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(taken)]) == 2
    assert f"--out {taken}: is a file; the report needs a folder" in capsys.readouterr().err
    assert main([*argv, "--out", str(taken / "report")]) == 2
    assert f"{taken} is a file; the report needs a folder" in capsys.readouterr().err
    # The default folder beside the model is checked too.
    model = tmp_path / "run" / "model.safetensors"
    model.parent.mkdir()
    model.write_bytes(symbol_model_file.read_bytes())
    (model.parent / "evaluation").write_text("not a folder\n")
    assert main(["evaluate", str(model), "--dataset", "digits", "--cache-dir", str(cache)]) == 2
    assert f"{model.parent / 'evaluation'}: is a file;" in capsys.readouterr().err
    assert not cache.exists()  # Refused before any image was decoded.
    assert taken.read_text() == "mine\n"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_out_folder_that_cannot_be_made_is_refused_before_any_data_loads(
    command: str, capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    first = ["train"] if command == "train" else ["evaluate", str(symbol_model_file)]
    argv = [*first, "--dataset", "digits", "--cache-dir", str(cache), "--quiet"]
    if command == "evaluate":
        argv.remove("--quiet")
    needs = "a run" if command == "train" else "the report"
    assert main([*argv, "--out", str(taken / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"cnnkit {command}: error: --out {taken / 'run'}: {taken} is a file; " + (
        f"{needs} needs a folder"
    )
    if Path("/proc/self").is_dir():  # A folder where nothing new can be made, even by root.
        assert main([*argv, "--out", "/proc/cnnkit-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"cnnkit {command}: error: --out /proc/cnnkit-run: cannot write in /proc ("
        )
        assert ".tmp" not in err and "Data:" not in err
    assert not cache.exists()  # Refused before any image was decoded.
    assert taken.read_text() == "mine\n" and sorted(tmp_path.iterdir()) == [taken]


def test_each_model_file_in_a_folder_gets_its_own_default_report(
    tmp_path: Path, tiny_model_saver
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    model = tiny_model_saver(tmp_path / "digits.safetensors", tuple(str(d) for d in range(10)))
    for name in ("model.safetensors", "other.safetensors"):
        (run / name).write_bytes(model.read_bytes())
        argv = ["evaluate", str(run / name), "--dataset", "digits", "--max-per-class", "3"]
        assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    reports = sorted(path.name for path in run.iterdir() if path.is_dir())
    assert reports == ["evaluation", "evaluation-other.safetensors"]
    for report in reports:
        assert (run / report / "metrics.json").is_file()


# ----------------------------------------------------------------------------- review fixes


def test_predict_options_may_come_between_the_images(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    first, second = _write_images(tmp_path, count=2)
    argv = ["predict", str(symbol_model_file), "--top-k", "2", str(first), "--json", str(second)]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [item["image"] for item in payload] == [str(first), str(second)]
    assert all(len(item["predictions"]) == 2 for item in payload)
    args = build_parser().parse_args(["predict", "--", "-odd.png"])  # After "--", all inputs.
    assert args.inputs == ["-odd.png"]
    assert main(["predict", str(symbol_model_file), "--backend", "torch", str(first)]) == 0
    assert SYMBOL_LINE.match(capsys.readouterr().out.strip())


def test_predict_options_between_images_through_main_and_help(capsys) -> None:
    from cnnkit.cli import parse_arguments

    args = parse_arguments(build_parser(), ["-v", "predict", "m.onnx", "--json", "a.png", "b.png"])
    assert (args.inputs, args.json, args.verbose, args.command) == (
        ["m.onnx", "a.png", "b.png"],
        True,
        True,
        "predict",
    )
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert capsys.readouterr().out.startswith("usage: cnnkit predict")


NAMES_THE_SYSTEM_REFUSES = ["~nosuchuser-cnnkit/a.png", "x" * 300 + ".png", "a\0b.png"]


def test_predict_reports_names_the_system_cannot_look_up_and_goes_on(
    capsys, symbol_model_file: Path, tmp_path: Path
) -> None:
    (image,) = _write_images(tmp_path)
    for name in NAMES_THE_SYSTEM_REFUSES:
        assert main(["predict", str(symbol_model_file), name, str(image)]) == 1
        captured = capsys.readouterr()
        assert SYMBOL_LINE.match(captured.out.strip().removeprefix(f"{image}: "))
        assert captured.err.startswith("error: ") and "cannot read" in captured.err
    # Also as the first input, where a model might have been meant.
    assert main(["predict", NAMES_THE_SYSTEM_REFUSES[0], str(image)]) == 1
    assert "cannot read (" in capsys.readouterr().err


def test_interactive_json_answers_every_name_on_one_line(
    capsys, monkeypatch: pytest.MonkeyPatch, symbol_model_file: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "my images"
    (spaced,) = _write_images(folder, count=1)
    spaced = spaced.rename(folder / "my sym.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    dragged = str(spaced).replace(" ", "\\ ")  # How macOS Terminal pastes a dragged file.
    names = [*NAMES_THE_SYSTEM_REFUSES, str(empty), str(tmp_path / "missing.png"), dragged]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(names) + "\n"))
    assert main(["predict", str(symbol_model_file), "--interactive", "--json"]) == 1
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in captured.out.splitlines()]
    assert answers == [[]] * 5 + [answers[-1]]  # One line per name; nothing for the bad ones.
    assert [item["image"] for item in answers[-1]] == [str(spaced)]
    assert captured.err.count("error: ") == 5


class _ClosedPipe(io.StringIO):
    """Standard output whose reader has gone (``cnnkit predict FOLDER | head -1``)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


def test_predict_stops_quietly_when_the_reader_goes_away(
    capsys, monkeypatch: pytest.MonkeyPatch, symbol_model_file: Path, tmp_path: Path
) -> None:
    _write_images(tmp_path / "images", count=2)
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["predict", str(symbol_model_file), str(tmp_path / "images")]) == 141
    assert "error" not in capsys.readouterr().err


def test_predict_never_prints_nan(capsys, symbol_model_file: Path, tmp_path: Path) -> None:
    from cnnkit.inference.artifact import load_model, save_model

    model = load_model(symbol_model_file)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    broken = save_model(tmp_path / "nan.safetensors", model, model.metadata)
    (image,) = _write_images(tmp_path / "images")
    assert main(["predict", str(broken), str(image), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "no finite probabilities" in captured.err


def test_book_cnn_trains_and_predicts_at_another_image_size(capsys, tmp_path: Path) -> None:
    config = _resolve("--dataset", "digits", "--model", "book_cnn", "--image-size", "48")
    assert config.model.options["image_size"] == 48 and config.data.image_size == 48
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--model", "book_cnn", "--image-size", "48"]
    limits = ["--max-classes", "2", "--max-per-class", "30", "--epochs", "1", "--quiet"]
    assert main([*argv, *limits, "--out", str(run)]) == 0
    (image,) = _write_images(tmp_path / "images")
    capsys.readouterr()
    assert main(["predict", str(run), str(image)]) == 0
    assert capsys.readouterr().out.startswith("Prediction: ")
    # The input size is --image-size; an option saying otherwise is refused, not ignored.
    assert (
        main(["train", "--dataset", "digits", "--model", "book_cnn", "--option", "image_size=48"])
        == 2
    )
    assert "book_cnn is sized by --image-size" in capsys.readouterr().err


def test_a_photo_model_refuses_image_size_and_records_its_own(capsys, tmp_path: Path) -> None:
    photos = ["train", "--dataset", "folder", "--data", str(tmp_path), "--print-config"]
    assert main([*photos, "--model", "efficientnet_lite0", "--image-size", "300"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "efficientnet_lite0 takes photos at its own input size" in error[0]
    assert "(224 px; --option image_size=N sets it)" in error[0]
    assert main([*photos, "--model", "efficientnet_lite_trio", "--image-size", "300"]) == 2
    assert "--option image_size=N sets it" in capsys.readouterr().err
    for name, size in (("efficientnet_lite_trio", 256), ("efficientnet_lite1", 160)):
        config = _resolve(*photos[1:5], "--model", name, "--option", f"image_size={size}")
        assert (config.data.image_size, config.data.stored_size) == (size, size + 32)
    assert _resolve(*photos[1:5], "--model", "efficientnet_lite2").data.image_size == 260


@pytest.mark.parametrize(
    ("option", "message"),
    [("width=1.5", "width must be a whole number; got 1.5"), ("dropout=nan", "finite number")],
)
def test_model_option_fractions_are_one_line(capsys, option: str, message: str) -> None:
    assert main(["train", "--dataset", "digits", "--option", option, "--print-config"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert _resolve("--dataset", "digits", "--option", "width=16.0").model.options["width"] == 16


def test_a_fresh_run_never_clears_an_interrupted_runs_checkpoint(
    capsys, monkeypatch, tmp_path
) -> None:
    from cnnkit.cli.train import _free_run_dir

    monkeypatch.chdir(tmp_path)
    interrupted = Path("runs/digits-symbol_cnn")
    interrupted.mkdir(parents=True)
    (interrupted / "checkpoint.pt").write_bytes(b"resumable")
    argv = ["train", "--dataset", "digits", "--max-classes", "3", "--epochs", "1", "--quiet"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{interrupted} holds an unfinished run: pass --resume" in error[0]
    assert (interrupted / "checkpoint.pt").read_bytes() == b"resumable"
    # Behind a newer finished run, it is passed over like a finished one.
    finished = Path("runs/digits-symbol_cnn-2")
    finished.mkdir()
    (finished / "model.safetensors").write_bytes(b"model")
    assert _free_run_dir(interrupted) == Path("runs/digits-symbol_cnn-3")


def test_a_new_run_goes_after_the_newest_run_folder_never_into_a_gap(tmp_path: Path) -> None:
    """--resume continues the newest numbered folder, so a fresh run must become the newest:
    not the default folder deleted before a finished -2, nor a -2 deleted before a -3."""
    from cnnkit.cli.arguments import CommandError
    from cnnkit.cli.train import _free_run_dir, _latest_run_dir

    def finished(path: Path) -> None:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"model")

    base = tmp_path / "runs" / "digits-symbol_cnn"
    assert _free_run_dir(base) == base  # Nothing there yet.
    finished(base.with_name("digits-symbol_cnn-2"))
    assert _free_run_dir(base) == base.with_name("digits-symbol_cnn-3")
    finished(base.with_name("digits-symbol_cnn-4"))
    (base.with_name("digits-symbol_cnn-12")).write_text("a file, not a run folder")
    assert _latest_run_dir(base) == base.with_name("digits-symbol_cnn-4")
    assert _free_run_dir(base) == base.with_name("digits-symbol_cnn-5")
    # A run that diverged cannot be resumed: a new run goes beside it, not refused.
    diverged = base.with_name("digits-symbol_cnn-5")
    diverged.mkdir()
    (diverged / "checkpoint.pt").write_bytes(b"state")
    (diverged / "run.json").write_text('{"status": "diverged", "cnnkit_version": "0.1.0"}')
    assert _free_run_dir(base) == base.with_name("digits-symbol_cnn-6")
    (diverged / "run.json").write_text('{"status": "interrupted", "cnnkit_version": "0.1.0"}')
    with pytest.raises(CommandError, match="digits-symbol_cnn-5 holds an unfinished run"):
        _free_run_dir(base)


def test_a_null_in_the_config_file_turns_a_presets_setting_off(tmp_path: Path) -> None:
    path = tmp_path / "off.yaml"
    path.write_text("train:\n  early_stopping_patience: null\n", encoding="utf-8")
    photos = ("--dataset", "folder", "--data", str(tmp_path), "--model", "efficientnet_lite0")
    assert _resolve(*photos).train.early_stopping_patience == 3  # The cub preset's.
    assert _resolve(*photos, "--config", str(path)).train.early_stopping_patience is None
    assert (
        _resolve(*photos, "--config", str(path), "--patience", "5").train.early_stopping_patience
        == 5
    )


def test_an_early_stop_is_reported(capsys, monkeypatch, tmp_path: Path) -> None:
    from cnnkit.training import run
    from cnnkit.training.trainer import FitResult

    rows = [{"epoch": epoch, "train_loss": 1.0, "val_accuracy": 0.5} for epoch in (1, 2, 3, 4)]
    fit = FitResult(rows, best_epoch=2, epochs_run=4, stopped_early=True)
    result = run.RunResult(tmp_path, tmp_path / "model.safetensors", fit, {"top1": 0.5}, None, "")
    monkeypatch.setattr(run, "train_run", lambda config, **kwargs: result)
    argv = ["train", "--dataset", "digits", "--patience", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    line = "Stopped early after epoch 4: no validation improvement for 2 epochs; kept epoch 2's"
    assert line in out


def test_an_early_stop_of_a_fine_tune_counts_its_own_epochs(capsys) -> None:
    from cnnkit.cli.train import _print_early_stop
    from cnnkit.training.trainer import FitResult

    rows = [{"epoch": e, "phase": 1.0} for e in (1, 2, 3)]
    rows += [{"epoch": e, "phase": 2.0} for e in (4, 5, 6, 7)]
    _print_early_stop(FitResult(rows, best_epoch=5, epochs_run=7, stopped_early=True), 2)
    assert capsys.readouterr().out == (
        "Stopped early after fine-tune epoch 4: no validation improvement for 2 epochs; "
        "kept fine-tune epoch 2's weights.\n"
    )
    _print_early_stop(FitResult(rows, best_epoch=5, epochs_run=7, stopped_early=False), 2)
    assert capsys.readouterr().out == ""
    # An ensemble keeps no one epoch's weights: each member keeps its own best.
    rows += [{"epoch": e, "phase": 3.0} for e in (8, 9)]
    _print_early_stop(FitResult(rows, best_epoch=9, epochs_run=9, stopped_early=True), 1)
    assert capsys.readouterr().out == (
        "Stopped early after fine-tune 2 epoch 2: no validation improvement for 1 epochs; the "
        "model joins each member's best weights (phases.json lists them).\n"
    )


def test_evaluate_without_dataset_uses_the_data_the_model_file_records(
    capsys, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--max-steps-per-epoch", "2"]
    assert main([*argv, "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--out", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    assert "Data: digits, as the model file records" in captured.err
    report = json.loads(captured.out)
    assert report["evaluated"]["dataset"] == "digits"
    assert report["count"] == json.loads((run / "run.json").read_text())["test"]["count"]
    # An export keeps the model file's record.
    pytest.importorskip("onnxruntime")
    from cnnkit.inference.export import export_onnx

    exported = export_onnx(run / "model.safetensors", tmp_path / "model.onnx")
    assert main(["evaluate", str(exported), "--json", "--out", str(tmp_path / "eval-onnx")]) == 0
    captured = capsys.readouterr()
    assert "Data: digits, as the model file records" in captured.err
    assert json.loads(captured.out)["top1"] == pytest.approx(report["top1"], abs=1e-6)
    # The bundled model records HASYv2 fold 1 but not where the data is.
    assert main(["evaluate", "--out", str(tmp_path / "bundled")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--data is required:" in error[0]
    assert "was trained on hasy but does not record where that data is" in error[0]
    # Given data, it says which model it scored: no argument named one.
    digits = ["--dataset", "digits", "--max-per-class", "5", "--out", str(tmp_path / "bundled")]
    assert main(["evaluate", *digits]) == 0
    assert "Evaluated 10 images (test split) with the bundled model\n" in capsys.readouterr().out
    # What is given on the command line is not what the model file records.
    missing = tmp_path / "HASYv2.tar.bz2"
    assert main(["evaluate", "--data", str(missing), "--fold", "2"]) == 2
    assert (
        f"Data: hasy fold 2 ({missing}), the dataset as the model file records, "
        f"--data {missing} and --fold 2 as given"
    ) in capsys.readouterr().err


def test_a_bundled_file_named_by_its_path_reports_outside_the_package(
    capsys, monkeypatch, tmp_path: Path
) -> None:
    from cnnkit.inference.bundled import bundled_model_path

    bundled = bundled_model_path()
    before = sorted(path.name for path in bundled.parent.iterdir())
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", str(bundled), "--dataset", "digits", "--max-per-class", "5"]
    assert main(argv) == 0
    report = Path("runs") / f"evaluation-{bundled.name}"
    written = "metrics.json, per_class.csv, confused_pairs.csv, confusion.png, misclassified.png"
    assert f"Report: {report} ({written})" in capsys.readouterr().out
    assert (tmp_path / report / "metrics.json").is_file()
    assert sorted(path.name for path in bundled.parent.iterdir()) == before


def test_the_bundled_model_warns_once_about_colour_photos(capsys, tmp_path: Path) -> None:
    photo = tmp_path / "bird.jpg"
    Image.fromarray(np.full((60, 80, 3), (200, 30, 30), np.uint8)).save(photo)
    symbol = tmp_path / "alpha.png"
    Image.new("L", (32, 32), 255).save(symbol)
    assert main(["predict", str(photo), str(photo), str(symbol)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "bird.jpg is a 80x60 colour image; the bundled model recognises handwritten" in err
    assert main(["predict", str(symbol)]) == 0
    assert "warning" not in capsys.readouterr().err
    # A symbol drawn in a paint program and saved in colour (RGB, or RGBA with a transparent
    # background), grey anti-aliased edges included, is a drawing, not a photo.
    drawn = np.full((256, 256, 3), 255, np.uint8)
    drawn[60:200, 120:136] = 0
    drawn[60:200, 118:120] = 128
    Image.fromarray(drawn).save(tmp_path / "drawn.png")
    transparent = np.zeros((256, 256, 4), np.uint8)
    transparent[60:200, 120:136, 3] = 255
    Image.fromarray(transparent).save(tmp_path / "transparent.png")
    assert main(["predict", str(tmp_path / "drawn.png"), str(tmp_path / "transparent.png")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_missing_data_path_is_refused_before_a_run_folder_is_announced(
    capsys, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "hasy-symbol_cnn").mkdir(parents=True)
    (tmp_path / "runs" / "hasy-symbol_cnn" / "model.safetensors").write_bytes(b"finished")
    assert main(["train", "--dataset", "hasy", "--data", "data/HASYv2.tar.bz", "--fold", "1"]) == 2
    captured = capsys.readouterr()
    assert "Note:" not in captured.out
    assert captured.err.strip() == (
        "cnnkit train: error: data/HASYv2.tar.bz: no such archive, folder or file"
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["hasy-symbol_cnn"]


def test_a_model_among_the_images_is_refused_before_anything_is_predicted(
    tmp_path: Path, capsys
) -> None:
    import shutil

    from cnnkit.inference.bundled import bundled_model_path

    image = tmp_path / "x.png"
    Image.new("L", (32, 32), 255).save(image)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(bundled_model_path(), run / "model.safetensors")
    (run / "checkpoint.pt").write_bytes(b"not read")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"not read")
    (unfinished / "run.json").write_text('{"status": "running", "cnnkit_version": "0.1.0"}')
    keras = tmp_path / "model.h5"
    keras.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    cases = {
        # Arguments swapped: the run's folder would be read for its report pictures.
        (str(image), str(run)): f"{run}: a training run's folder, not an image (no model was "
        "given, so the bundled one answers): the model goes first",
        (str(image), str(run / "model.safetensors")): f"{run / 'model.safetensors'}: a model "
        "file, not an image (no model was given, so the bundled one answers)",
        # Given first, where a model goes: that checkpoint's run has a model to name.
        (str(run / "checkpoint.pt"), str(image)): f"{run / 'checkpoint.pt'}: a checkpoint "
        f"(training state), not a model file: give {run / 'model.safetensors'} (or {run})",
        (str(run), str(image), str(run / "checkpoint.pt")): f"{run / 'checkpoint.pt'}: a "
        f"checkpoint, not an image (the model is {run})",
        # The folder of a run that has not finished (a checkpoint, no model yet).
        (str(image), str(unfinished)): f"{unfinished}: a training run's folder, not an image",
        # Another tool's model given first would be an unreadable image, and the bundled model
        # would answer for the rest.
        (str(keras), str(image)): f"{keras}: neither a cnnkit model nor an image (a model "
        "file ends in .safetensors or .onnx",
    }
    for argv, message in cases.items():
        assert main(["predict", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # Nothing predicted, by any model.
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert main(["predict", str(run), str(image)]) == 0
    assert capsys.readouterr().out.startswith("Prediction: ")  # One image: no name.
    # An image whose name has no image suffix is still an image.
    scan = tmp_path / "scan"
    scan.write_bytes(image.read_bytes())
    assert main(["predict", str(scan), str(image)]) == 0
    assert capsys.readouterr().out.count("Prediction: ") == 2
    # Another tool's run.json or checkpoint.pt beside images is no cnnkit run.
    shots = tmp_path / "shots"
    shots.mkdir()
    shutil.copy(image, shots / "a.png")
    (shots / "run.json").write_text('{"camera": "left"}')
    (shots / "checkpoint.pt").write_bytes(b"another tool's")
    for argv in ([str(image), str(shots)], [str(shots), str(image)]):
        assert main(["predict", *argv]) == 0
        assert capsys.readouterr().out.count("Prediction: ") == 2


def test_model_flag_architecture_names_and_verbose_after_the_command(
    capsys, symbol_model_file: Path, tmp_path: Path, monkeypatch
) -> None:
    # --model works wherever a model file is read, as predict takes it; two models are refused.
    out = tmp_path / "exported.onnx"
    assert main(["export", "--model", str(symbol_model_file), "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", str(symbol_model_file), "--model", str(out)])
    assert exited.value.code == 2
    assert f"two models given: {symbol_model_file} and --model {out}" in capsys.readouterr().err
    # One model written two ways is one model: a relative path, or a run folder and its file.
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(symbol_model_file.read_bytes())
    from cnnkit.cli import parse_arguments

    argv = ["export", str(run), "--model", str(run / "model.safetensors")]
    assert parse_arguments(build_parser(), argv).model == str(run / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "run", "--model", str(run)]
    assert parse_arguments(build_parser(), argv).model == str(run)
    # An architecture name is not a model file.
    for argv, name in (
        (["predict", "--model", "symbol_cnn", "x.png"], "symbol_cnn"),
        (["evaluate", "book_cnn"], "book_cnn"),
    ):
        assert main(argv) == 2
        assert f"{name}: an architecture name, not a trained model" in capsys.readouterr().err
    # -v after the command: the traceback of an unexpected error is shown.
    assert build_parser().parse_args(["predict", "-v", "x.png"]).verbose is True
    assert build_parser().parse_args(["-v", "predict", "x.png"]).verbose is True
    assert build_parser().parse_args(["predict", "x.png"]).verbose is False


def test_predict_runs_where_device_says(capsys, symbol_model_file: Path, tmp_path: Path) -> None:
    (image,) = _write_images(tmp_path, count=1)
    assert main(["predict", str(symbol_model_file), str(image)]) == 0
    on_cpu = capsys.readouterr().out
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert main(["predict", str(symbol_model_file), str(image), "--device", "auto"]) == 0
        assert capsys.readouterr().out == on_cpu  # No GPU: auto is the CPU.
        assert main(["predict", str(symbol_model_file), str(image), "--device", "cuda"]) == 2
        assert "device 'cuda' requested but CUDA is not available" in capsys.readouterr().err
    pytest.importorskip("onnxruntime")
    from cnnkit.inference.export import export_onnx

    exported = export_onnx(symbol_model_file, tmp_path / "symbols.onnx")
    assert main(["predict", str(exported), str(image), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "ONNX Runtime runs it on the CPU, not cuda" in err
    assert err.rstrip().endswith("or use the .safetensors model it came from")
    model = str(symbol_model_file)
    assert main(["predict", model, str(image), "--backend", "onnx", "--device", "cuda"]) == 2
    # The model is the .safetensors file already: the way to a GPU is the torch backend.
    assert (
        capsys.readouterr()
        .err.rstrip()
        .endswith("or use backend 'torch' (on the command line, --backend torch)")
    )


def test_verbose_shows_cnnkit_details_and_not_every_librarys(tmp_path) -> None:
    """``-v`` on an export: cnnkit's INFO line, not the onnx and PIL DEBUG flood (over a
    thousand lines for one export)."""
    import subprocess
    import sys

    out = tmp_path / "bundled.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "cnnkit", "-v", "export", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    logged = [line for line in done.stderr.splitlines() if line.startswith(("DEBUG", "INFO"))]
    assert any(line.startswith("INFO cnnkit.inference.export: exported") for line in logged)
    assert [line for line in logged if " cnnkit." not in line] == []
    assert out.is_file()


def test_verbose_prints_the_traceback_and_keeps_the_error_status(tmp_path, capsys) -> None:
    """A fatal error under ``-v`` shows the traceback and still exits with 2: 1 is predict's
    "some files failed", which a script must not read into a crash."""
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not a model")
    image = tmp_path / "one.png"
    Image.new("L", (32, 32), 255).save(image)
    for argv in (["predict", str(fake), str(image)], ["-v", "predict", str(fake), str(image)]):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert f"cnnkit predict: error: {fake}" in error
        assert ("Traceback (most recent call last)" in error) == ("-v" in argv)


def test_train_size_without_random_resized_crops_is_refused(capsys, tmp_path: Path) -> None:
    """symbol_cnn takes any size, but the digits preset has no random resized crops: a smaller
    training size would only shrink every image (test top-1 fell from 0.93 to 0.30 at 16 px)."""
    argv = ["train", "--dataset", "digits", "--train-size", "16", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "16 px training images need random resized crops" in error[0]
    assert not (tmp_path / "run").exists()


def test_interactive_names_a_folders_image_and_not_a_named_file(
    capsys, monkeypatch: pytest.MonkeyPatch, symbol_model_file: Path, tmp_path: Path
) -> None:
    (image,) = _write_images(tmp_path / "one", count=1)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{image}\n{image.parent}\n\n"))
    assert main(["predict", str(symbol_model_file), "--interactive"]) == 0
    answers = [line for line in capsys.readouterr().out.splitlines() if "Prediction:" in line]
    assert len(answers) == 2
    assert SYMBOL_LINE.match(answers[0].split("Enter filename: ")[-1])
    assert answers[1].split("Enter filename: ")[-1].startswith(f"{image}: ")


def test_evaluate_says_when_no_image_was_confused(capsys, monkeypatch, symbol_model_file):
    """No empty "Most confused pairs" heading when there are none to list."""
    from cnnkit.evaluation import evaluate
    from cnnkit.evaluation.report import EvaluationReport

    metrics = dict.fromkeys(["top1", "top5", "macro_precision", "macro_recall", "macro_f1"], 1.0)
    report = EvaluationReport({**metrics, "count": 4}, [])
    monkeypatch.setattr(evaluate, "evaluate_model_file", lambda *args, **kwargs: report)
    argv = ["evaluate", str(symbol_model_file), "--dataset", "digits"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "No image was confused with another class." in out
    assert "Most confused pairs" not in out


def test_evaluate_skips_the_bad_files_its_run_skipped(capsys, tmp_path: Path) -> None:
    """A run trained with --on-bad-image skip is evaluated on its own data without the flag."""
    data = tmp_path / "shapes"
    for name in ("a", "b"):
        _write_images(data / name, count=4)
    (data / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "folder", "--data", str(data), "--epochs", "1", "--quiet"]
    assert main([*argv, "--on-bad-image", "skip", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    # Every skipped image is listed in the run folder; the terminal shows the first.
    assert f"Skipped 1 bad image(s) (all: {out / 'skipped.txt'}); first: " in said
    (listed,) = (out / "skipped.txt").read_text(encoding="utf-8").splitlines()
    assert "broken.png" in listed and listed in said
    assert main(["evaluate", str(out), "--split", "all"]) == 0
    assert "Evaluated 8 images (all split)" in capsys.readouterr().out
    # Given explicitly, the flag still wins.
    assert main(["evaluate", str(out), "--split", "all", "--on-bad-image", "error"]) == 2
    assert "broken.png" in capsys.readouterr().err
    # A test share with data that brings its own split is named as unused, when training.
    split_data = tmp_path / "split"
    for split in ("train", "test"):
        for name in ("a", "b"):
            _write_images(split_data / split / name, count=3)
    shared = ["train", "--dataset", "folder", "--data", str(split_data), "--epochs", "1"]
    assert main([*shared, "--test-fraction", "0.3", "--quiet", "--out", str(tmp_path / "r")]) == 0
    note = f"Note: {split_data} gives its own test split, so test_fraction 0.3 (--test-fraction)"
    assert note in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "r")]) == 0
    assert "test_fraction" not in "".join(capsys.readouterr())
    # Trained again once the file is fixed, the run's list goes with the earlier run.
    (data / "a" / "broken.png").unlink()
    assert main([*argv, "--out", str(out)]) == 0
    assert not (out / "skipped.txt").exists()
    # A file of that name in a folder that held no run is the user's: left alone.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "skipped.txt").write_text("my notes\n")
    assert main([*argv, "--out", str(mine)]) == 0
    assert (mine / "skipped.txt").read_text() == "my notes\n"


def test_a_runs_config_file_trains_the_same_run_from_another_folder(
    capsys, monkeypatch, tmp_path: Path
) -> None:
    """config.yaml names the data, cache and run folder as absolute paths, so --config finds
    them from anywhere (a relative ``data: shapes`` was looked for in the new folder), and the
    new run goes beside the one it copies, not into the current folder."""
    shapes = tmp_path / "shapes"
    for name, box in (("square", (8, 8, 24, 24)), ("bar", (14, 2, 18, 30))):
        (shapes / name).mkdir(parents=True)
        for index in range(8):
            image = Image.new("L", (32, 32), 255)
            ImageDraw.Draw(image).rectangle(tuple(v + index % 3 for v in box), fill=0)
            image.save(shapes / name / f"{index}.png")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset", "folder", "--data", "shapes", "--epochs", "1", "--quiet"]
    assert main([*argv, "--model", "symbol_cnn", "--option", "width=8"]) == 0
    first = Path("runs/folder-symbol_cnn")
    recorded = yaml.safe_load((first / "config.yaml").read_text())
    assert (recorded["data"]["data"], recorded["out"]) == (str(shapes), str(first.resolve()))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    capsys.readouterr()
    assert main(["train", "--config", "../runs/folder-symbol_cnn/config.yaml", "--quiet"]) == 0
    assert "this one goes to ../runs/folder-symbol_cnn-2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "folder-symbol_cnn-2" / "model.safetensors").is_file()
    assert not (tmp_path / "sub" / "runs").exists()
    # The second run's own file: the next number, not folder-symbol_cnn-2-2.
    assert main(["train", "--config", "../runs/folder-symbol_cnn-2/config.yaml", "--quiet"]) == 0
    assert "this one goes to ../runs/folder-symbol_cnn-3" in capsys.readouterr().out
    # Through a link to the file: still the run's own (it used to replace that run).
    kept = (tmp_path / "runs" / "folder-symbol_cnn" / "model.safetensors").read_bytes()
    Path("mine.yaml").symlink_to(tmp_path / "runs" / "folder-symbol_cnn" / "config.yaml")
    assert main(["train", "--config", "mine.yaml", "--quiet"]) == 0
    fourth = tmp_path / "runs" / "folder-symbol_cnn-4"
    assert f"this one goes to {fourth}" in capsys.readouterr().out
    assert (tmp_path / "runs" / "folder-symbol_cnn" / "model.safetensors").read_bytes() == kept
    # --resume with a run's own file continues that run, not the newest of its family.
    newest = (fourth / "model.safetensors").read_bytes()
    second = ["--config", "../runs/folder-symbol_cnn-2/config.yaml", "--epochs", "2"]
    assert main(["train", "--resume", *second, "--quiet"]) == 0
    assert "Resuming from ../runs/folder-symbol_cnn-2/checkpoint.pt" in capsys.readouterr().out
    assert (fourth / "model.safetensors").read_bytes() == newest
    # From inside the run folder (`config.yaml`, which names no folder): beside it.
    monkeypatch.chdir(tmp_path / "runs" / "folder-symbol_cnn")
    assert main(["train", "--config", "config.yaml", "--quiet"]) == 0
    fifth = tmp_path / "runs" / "folder-symbol_cnn-5"
    assert f"this one goes to {fifth}" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path / "sub")
    # A run folder moved elsewhere: its file names the old place, and trains beside the new.
    shutil.copytree(tmp_path / "runs" / "folder-symbol_cnn", tmp_path / "moved" / first.name)
    assert main(["train", "--config", "../moved/folder-symbol_cnn/config.yaml", "--quiet"]) == 0
    assert "this one goes to ../moved/folder-symbol_cnn-2" in capsys.readouterr().out


def test_training_again_with_a_runs_own_config_file_makes_a_new_run(
    capsys, monkeypatch, tmp_path: Path
) -> None:
    """A run's config.yaml names its folder as out: read back with --config, it trains a new
    run beside that one (runs/x-2) instead of replacing it."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset", "digits", "--max-classes", "3", "--epochs", "1", "--quiet"]
    first = Path("runs/digits-symbol_cnn")
    assert main(argv) == 0
    kept = (first / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(first / "config.yaml"), "--quiet"]) == 0
    assert f"this one goes to {first.with_name('digits-symbol_cnn-2')}" in capsys.readouterr().out
    assert (first / "model.safetensors").read_bytes() == kept
    # Another folder named as out is used as given.
    other = tmp_path / "mine.yaml"
    other.write_text(f"out: {tmp_path / 'elsewhere'}\ndata: {{dataset: digits, max_classes: 3}}\n")
    assert main(["train", "--config", str(other), "--epochs", "1", "--quiet"]) == 0
    assert (tmp_path / "elsewhere" / "model.safetensors").is_file()


def test_a_search_trials_config_file_trains_outside_the_search(tmp_path: Path) -> None:
    """Beside the trial would put the new run among the search's trials."""
    from cnnkit.cli.settings import _without_own_folder
    from cnnkit.paths import SEARCH_SETTINGS

    search = tmp_path / "search"
    trial = search / "trials" / "trial-003"
    trial.mkdir(parents=True)
    (search / SEARCH_SETTINGS).write_text("n_trials: 4\n")
    (trial / "run.json").write_text('{"cnnkit_version": "0.1.0"}')
    layer = {"out": str(trial), "data": {"dataset": "digits"}}
    assert _without_own_folder(layer, str(trial / "config.yaml")) == (
        {"data": {"dataset": "digits"}},
        None,
    )
    (search / SEARCH_SETTINGS).unlink()  # A plain run folder of that name: beside it.
    assert _without_own_folder(layer, str(trial / "config.yaml"))[1] == trial
