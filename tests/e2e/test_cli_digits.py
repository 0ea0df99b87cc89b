"""End to end through the CLI on the embedded default (scikit-learn's digits): demo, predict,
evaluate, and train then resume."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from cnnkit import __version__
from cnnkit.cli import main
from cnnkit.config import build_run_config, load_config_file
from cnnkit.inference.artifact import load_model

CHANCE = 0.1  # ten digits


def _metrics_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cnnkit demo --epochs 2`, run once for the tests of this module."""
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_writes_a_complete_run_folder(demo_run: Path) -> None:
    for name in (
        "model.safetensors",
        "metrics.csv",
        "config.yaml",
        "run.json",
        "report/metrics.json",
        "report/per_class.csv",
        "report/confusion.png",
        "report/misclassified.png",
    ):
        assert (demo_run / name).is_file(), name
    run = json.loads((demo_run / "run.json").read_text())
    assert run["cnnkit_version"] == __version__
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", run["git_revision"])
    assert run["status"] == "finished" and run["fit"]["epochs_run"] == 2
    metrics = json.loads((demo_run / "report" / "metrics.json").read_text())
    assert metrics["top1"] > 3 * CHANCE
    assert metrics["evaluated"]["model"] == str((demo_run / "model.safetensors").resolve())
    assert metrics["evaluated"]["dataset"] == "digits"
    assert metrics["evaluated"]["split"] == "test"
    assert run["test"]["top1"] == metrics["top1"]
    assert [row["epoch"] for row in _metrics_rows(demo_run / "metrics.csv")] == ["1", "2"]
    config = build_run_config(load_config_file(demo_run / "config.yaml"))
    assert config.train.epochs == 2 and config.data.dataset == "digits"
    # Every option of the trained network, defaults too: no preset can change it on reading.
    assert config.model.options == load_model(demo_run / "model.safetensors").metadata.options
    assert run["config"]["model"]["options"] == config.model.options


def test_predict_on_the_demo_samples(demo_run: Path, capsys) -> None:
    samples = sorted((demo_run / "samples").glob("*.png"))
    assert samples
    capsys.readouterr()
    assert main(["predict", str(demo_run / "model.safetensors"), str(demo_run / "samples")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(samples)
    for path, line in zip(samples, lines, strict=True):
        assert re.fullmatch(
            rf"{re.escape(str(path))}: Prediction: \d, confidence: [01]\.\d\d", line
        )


def test_evaluate_matches_the_training_report(demo_run: Path, capsys, tmp_path: Path) -> None:
    capsys.readouterr()
    argv = ["evaluate", str(demo_run / "model.safetensors"), "--dataset", "digits", "--json"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "evaluation")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    trained = json.loads((demo_run / "report" / "metrics.json").read_text())
    # The same seeded test split and the same preprocessing: at most one image may differ.
    assert report["count"] == trained["count"]
    assert abs(report["top1"] - trained["top1"]) <= 1 / report["count"] + 1e-9
    assert (tmp_path / "evaluation" / "confusion.png").is_file()


def test_train_then_resume_with_more_epochs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    common = ["--dataset", "digits", "--max-per-class", "30", "--batch-size", "32", "--quiet"]
    common += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *common, "--epochs", "1"]) == 0
    assert len(_metrics_rows(out / "metrics.csv")) == 1
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0
    assert [row["epoch"] for row in _metrics_rows(out / "metrics.csv")] == ["1", "2"]
    run = json.loads((out / "run.json").read_text())
    assert run["fit"]["epochs_run"] == 2
    assert "Test: top-1" in capsys.readouterr().out
    # Fewer epochs than the checkpoint's would record a 1-epoch run of a 2-epoch model.
    record = {name: (out / name).read_bytes() for name in ("run.json", "config.yaml")}
    assert main(["train", *common, "--epochs", "1", "--resume"]) == 2
    assert (
        f"{out / 'checkpoint.pt'}: its run trained 2 epochs, more than this run's 1; resume with "
        "--epochs 2 or more" in capsys.readouterr().err
    )
    assert record == {name: (out / name).read_bytes() for name in record}


def test_evaluate_scores_the_test_split_the_model_was_trained_with(
    tmp_path, capsys, caplog
) -> None:
    """A run with another seed, test fraction and image limit: evaluate draws that run's test
    split, not the default one, which would hold images the model trained on."""
    run = tmp_path / "run"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    argv = ["train", "--dataset", "digits", "--seed", "3", "--test-fraction", "0.3"]
    argv += ["--max-per-class", "100"]
    assert main([*argv, "--epochs", "1", "--quiet", "--out", str(run), *cache]) == 0
    trained = json.loads((run / "report" / "metrics.json").read_text())
    capsys.readouterr()
    argv = ["evaluate", str(run), "--dataset", "digits", "--json", *cache]
    assert main([*argv, "--out", str(tmp_path / "evaluation")]) == 0
    report = json.loads(capsys.readouterr().out)
    evaluated = report["evaluated"]
    assert (evaluated["seed"], evaluated["test_fraction"], evaluated["max_per_class"]) == (
        3,
        0.3,
        100,
    )
    assert report["count"] == trained["count"] == 300  # 30% of 100 images of each digit
    assert report["top1"] == pytest.approx(trained["top1"], abs=1 / report["count"] + 1e-9)
    # Another limit draws another split: allowed, with a warning.
    assert main([*argv, "--max-per-class", "50", "--out", str(tmp_path / "other")]) == 0
    assert "was trained with max per class 100; with 50 its test split holds other" in caplog.text
    # Every image means every image: the run's limits draw no split there.
    capsys.readouterr()
    assert "--split all scores its training images too" not in caplog.text
    assert main([*argv, "--split", "all", "--out", str(tmp_path / "all")]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 1797
    assert "was trained on digits: --split all scores its training images too" in caplog.text
    # One image a class draws no test image: --split all still scores all ten.
    one = ["--max-per-class", "1", "--split", "all", "--out", str(tmp_path / "one")]
    assert main([*argv, *one]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 10


def test_training_again_into_a_folder_clears_the_earlier_runs_outputs(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.old").write_bytes(b"old curves")
    (run / "evaluation").mkdir()
    (run / "evaluation" / "metrics.json").write_text("{}")
    (run / "report.html").write_text("old report")
    (run / "model.safetensors").write_bytes(b"old model")
    (run / "notes.txt").write_text("mine")
    argv = ["train", "--dataset", "digits", "--max-per-class", "30", "--epochs", "1", "--quiet"]
    argv += ["--out", str(run), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    assert f"Note: {run} holds an earlier run; this run replaces it" in capsys.readouterr().out
    assert not (run / "report.html").exists() and not (run / "evaluation").exists()
    events = sorted(path.name for path in (run / "tensorboard").iterdir())
    assert events and "events.out.tfevents.old" not in events  # No old curves mixed in.
    assert load_model(run / "model.safetensors").metadata.class_names[0] == "0"
    assert (run / "notes.txt").read_text() == "mine"  # Not cnnkit's: left alone.


def test_a_run_refused_before_training_keeps_the_earlier_run(tmp_path) -> None:
    """torchrun with a batch its processes cannot share: refused, and the finished run in the
    folder is left whole, not cleared and marked running."""
    from cnnkit.data.sources import build_splits
    from cnnkit.runtime import DistributedContext
    from cnnkit.training.preprocessing import resolve_preprocessing
    from cnnkit.training.run import train_run

    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--max-per-class", "30", "--epochs", "1", "--quiet"]
    assert main([*argv, "--out", str(run), "--cache-dir", str(tmp_path / "cache")]) == 0
    before = sorted(path.name for path in run.iterdir())
    config = build_run_config(load_config_file(run / "config.yaml"), {"train": {"batch_size": 64}})
    data = build_splits(config.data, resolve_preprocessing(config))  # As rank 0 loads it.
    with pytest.raises(ValueError, match="must be divisible by the 3 processes"):
        train_run(config, progress=False, data=data, distributed=DistributedContext(0, 0, 3))
    assert sorted(path.name for path in run.iterdir()) == before
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert load_model(run / "model.safetensors").metadata.class_names[0] == "0"


def test_logged_training_prints_each_epoch_once_as_it_ends(tmp_path, capsys) -> None:
    """Output that is not a terminal (a log, CI): one plain line per epoch on stderr while the
    run goes, and no second copy of them at the end."""
    argv = ["train", "--dataset", "digits", "--max-per-class", "30", "--epochs", "2"]
    argv += ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert re.findall(r"^epoch (\d)/2: train_loss", printed.err, re.M) == ["1", "2"]
    assert not re.findall(r"^epoch +\d", printed.out, re.M)
    assert "Test: top-1" in printed.out


def test_a_folder_without_a_run_is_never_cleared(tmp_path, capsys) -> None:
    """`--out .` in a folder of one's own: folders named like cnnkit's outputs are the user's."""
    mine = tmp_path / "mine"
    for name in ("samples", "report", "evaluation", "tensorboard"):
        (mine / name).mkdir(parents=True)
        (mine / name / "keep.txt").write_text(name)
    argv = ["train", "--dataset", "digits", "--max-per-class", "30", "--epochs", "1", "--quiet"]
    assert main([*argv, "--out", str(mine), "--cache-dir", str(tmp_path / "cache")]) == 0
    for name in ("samples", "report", "evaluation", "tensorboard"):
        assert (mine / name / "keep.txt").read_text() == name
    assert "holds an earlier run" not in capsys.readouterr().out


def test_the_training_data_inside_a_run_folder_is_kept(tmp_path, tiny_image_set) -> None:
    """A CSV dataset whose images sit in ``samples/`` of a folder that holds a run."""
    from PIL import Image

    run = tmp_path / "run"
    images = tiny_image_set(num_classes=2, per_class=10, size=16, seed=1)
    (run / "samples").mkdir(parents=True)
    rows = ["path,label"]
    for index, (array, label) in enumerate(zip(images.images, images.labels, strict=True)):
        Image.fromarray(array[..., 0]).save(run / "samples" / f"{index}.png")
        rows.append(f"samples/{index}.png,{'ab'[label]}")
    (run / "labels.csv").write_text("\n".join(rows) + "\n")
    argv = ["train", "--dataset", "csv", "--data", str(run / "labels.csv"), "--epochs", "1"]
    argv += ["--quiet", "--out", str(run), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    assert main(argv) == 0  # The folder now holds a run: a fresh one must keep the data.
    assert len(list((run / "samples").glob("*.png"))) == 20


def test_training_into_a_search_folder_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.yaml").write_text("search: {}\n")
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "search")]
    assert main(argv) == 2
    assert "holds a search, not a training run: pass another --out" in capsys.readouterr().err


def test_clearing_leaves_folders_that_hold_files_cnnkit_did_not_write(tmp_path, caplog) -> None:
    from cnnkit.training.run_folder import clear_run_outputs

    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "thesis.tex").write_text("mine")
    (run / "report" / "metrics.json").write_text("{}")
    (run / "evaluation").mkdir()
    (run / "evaluation" / "confusion.png").write_bytes(b"png")
    (run / "model.safetensors").write_bytes(b"old")
    (run / "data").mkdir()
    (run / "data" / "x.png").write_bytes(b"png")
    (run / "samples").symlink_to(run / "data")  # A link goes; what it points to stays.
    assert sorted(clear_run_outputs(run)) == ["evaluation", "model.safetensors", "samples"]
    assert (run / "report" / "thesis.tex").read_text() == "mine"
    assert "left the earlier run's report as they are" in caplog.text
    assert (run / "data" / "x.png").exists()
    assert clear_run_outputs(tmp_path / "never-a-run") == []


def test_clearing_removes_every_ensemble_members_fine_tune_folder(tmp_path) -> None:
    from cnnkit.training.run_folder import clear_run_outputs

    run = tmp_path / "run"
    for folder in ("finetune", "finetune-2", "finetune-3", "finetune-notes"):
        (run / folder).mkdir(parents=True)
        (run / folder / "checkpoint.pt").write_bytes(b"old")
    (run / "model.safetensors").write_bytes(b"old")
    removed = clear_run_outputs(run)
    assert sorted(removed) == ["finetune", "finetune-2", "finetune-3", "model.safetensors"]
    assert (run / "finetune-notes" / "checkpoint.pt").exists()  # Not a name cnnkit writes.


def test_member_folders_are_only_the_names_an_ensemble_writes(tmp_path) -> None:
    from cnnkit.paths import finetune_folder, member_folders

    assert [finetune_folder(member) for member in range(3)] == [
        "finetune",
        "finetune-2",
        "finetune-3",
    ]
    for name in ("finetune-10", "finetune-2", "finetune-02", "finetune-1", "finetune-0"):
        (tmp_path / name).mkdir()
    for name in ("finetune-abc", "finetune-", "finetune-²", "finetune-3"):
        (tmp_path / name).mkdir()
    assert [path.name for path in member_folders(tmp_path)] == [
        "finetune-2",
        "finetune-3",
        "finetune-10",
    ]


def test_a_bf16_trained_runs_test_figures_are_evaluates(tmp_path, capsys, monkeypatch) -> None:
    """The run trains under bf16 autocast (forced where this CPU lacks native bf16), but
    scores its test report in float32, as evaluate, predict and ONNX run the saved model: the
    figures in run.json and report/ are then the ones evaluate gives on the same images."""
    import cnnkit.training.optimization as optimization_module
    import cnnkit.training.run as run_module

    monkeypatch.setattr(optimization_module, "cpu_supports_bf16", lambda: True)
    forwards: list[tuple[bool, bool]] = []  # (training mode, under autocast) of each forward
    create_model = run_module.create_model

    def record(module, inputs, output) -> None:
        forwards.append((module.training, torch.is_autocast_enabled("cpu")))

    def create_recorded_model(*args, **kwargs):
        model = create_model(*args, **kwargs)
        model.register_forward_hook(record)
        return model

    monkeypatch.setattr(run_module, "create_model", create_recorded_model)
    run, cache = tmp_path / "run", ["--cache-dir", str(tmp_path / "cache")]
    argv = ["train", "--dataset", "digits", "--max-per-class", "20", "--epochs", "1", "--bf16"]
    assert main([*argv, "--device", "cpu", "--quiet", "--out", str(run), *cache]) == 0
    assert (True, True) in forwards  # Training itself stays in bf16.
    assert forwards[-1] == (False, False)  # The final test is scored in float32.
    trained = json.loads((run / "run.json").read_text())["test"]
    capsys.readouterr()
    argv = ["evaluate", str(run), "--dataset", "digits", "--json", "--device", "cpu", *cache]
    assert main([*argv, "--out", str(tmp_path / "evaluation")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("count", "top1", "top5", "macro_precision", "macro_recall", "macro_f1"):
        assert evaluated[key] == trained[key], key


def test_a_runs_report_names_the_limits_that_chose_its_test_images(
    tmp_path, capsys, demo_run: Path
) -> None:
    run, cache = tmp_path / "run", ["--cache-dir", str(tmp_path / "cache")]
    argv = ["train", "--dataset", "digits", "--max-classes", "3", "--max-per-class", "20"]
    assert main([*argv, "--epochs", "1", "--quiet", "--out", str(run), *cache]) == 0
    trained = json.loads((run / "report" / "metrics.json").read_text())["evaluated"]
    assert (trained["max_classes"], trained["max_per_class"]) == (3, 20)
    # evaluate names them the same way for the same test split.
    capsys.readouterr()
    argv = ["evaluate", str(run), "--dataset", "digits", "--json", *cache]
    assert main([*argv, "--out", str(tmp_path / "evaluation")]) == 0
    evaluated = json.loads(capsys.readouterr().out)["evaluated"]
    assert (evaluated["max_classes"], evaluated["max_per_class"]) == (3, 20)
    # A run without limits names none.
    unlimited = json.loads((demo_run / "report" / "metrics.json").read_text())["evaluated"]
    assert "max_classes" not in unlimited and "max_per_class" not in unlimited


def test_demo_over_an_earlier_run_says_so_and_quotes_its_next_steps(tmp_path: Path, capsys):
    out = tmp_path / "dé mo's run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"cnnkit_version": __version__}), encoding="utf-8")
    (out / "model.onnx").write_bytes(b"an earlier export")
    (out / "evaluation-model.onnx").mkdir()  # evaluate's report on that export.
    (out / "evaluation-model.onnx" / "metrics.json").write_text("{}")
    assert main(["demo", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"Note: {out} holds an earlier run; this run replaces it" in printed
    assert not (out / "model.onnx").exists()
    assert not (out / "evaluation-model.onnx").exists()
    commands = [shlex.split(line) for line in printed.splitlines() if line.startswith("  cnnkit ")]
    model, samples = str(out / "model.safetensors"), str(out / "samples")
    assert ["cnnkit", "predict", model, samples] in commands
    assert ["cnnkit", "evaluate", model, "--dataset", "digits"] in commands
