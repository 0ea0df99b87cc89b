"""Tests for resuming a training run through train_run: what a checkpoint must match (the
data's split, the optimizer's settings, the model), and which run files a refused resume keeps.
Each run is a 8-wide symbol_cnn on the built-in digits for two steps an epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tests.conftest import FitEpochs, StopAfter

from cnnkit.config import RunConfig, build_run_config
from cnnkit.evaluation.html_report import build_report_html
from cnnkit.inference.artifact import read_metadata
from cnnkit.presets import preset_for
from cnnkit.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from cnnkit.training.run import train_run
from cnnkit.training.run_folder import checkpoint_to_resume
from cnnkit.training.trainer import Callback, Trainer, TrainingDiverged, TrainingInterrupted

RUN_FILES = ("config.yaml", "run.json")


def _config(run: Path, *layers: dict[str, Any]) -> RunConfig:
    quick = {
        "model": {"options": {"width": 8}},
        "train": {"epochs": 2, "max_steps_per_epoch": 2, "device": "cpu"},
        "out": str(run),
    }
    return build_run_config(preset_for("digits"), quick, *layers)


def _interrupted_after_one_epoch(run: Path, *layers: dict[str, Any]) -> RunConfig:
    config = _config(run, *layers)
    with pytest.raises(TrainingInterrupted):
        train_run(config, progress=False, callbacks=[StopAfter(1)])
    return config


def _run_files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in RUN_FILES}


def _resumed_from_epoch_one(config: RunConfig) -> None:
    """Resume ``config``'s run; check it went on after epoch 1 and trained only epoch 2."""
    epochs = FitEpochs()
    result = train_run(config, resume=True, progress=False, callbacks=[epochs])
    assert (epochs.starts, epochs.trained) == ([1], [2])
    assert [row["epoch"] for row in result.fit.history] == [1, 2]
    assert result.fit.epochs_run == 2


def test_a_resume_on_another_split_is_refused_and_the_finished_run_kept(tmp_path: Path) -> None:
    """Another data seed and val fraction draw another split, whose test images the checkpoint
    may have trained on: refused, naming both, and the finished run's files stay as they were."""
    run = tmp_path / "run"
    config = _config(run)
    train_run(config, progress=False)
    before = _run_files(run)
    other = _config(run, {"data": {"seed": 7, "val_fraction": 0.3}, "train": {"epochs": 3}})
    with pytest.raises(CheckpointError) as refused:
        train_run(other, resume=True, progress=False)
    message = str(refused.value)
    assert "its run trained on another split of the images (its training, validation" in message
    assert (
        "images differ: seed 0 in the checkpoint, 7 now; val fraction 0.1 in the checkpoint, "
        "0.3 now)"
    ) in message
    assert "\n" not in message
    assert _run_files(run) == before
    assert json.loads(before["run.json"])["status"] == "finished"


def test_a_refused_resume_leaves_config_and_run_json_as_they_were(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = _interrupted_after_one_epoch(run)
    (run / "skipped.txt").write_text("a/9.png: not an image\n")  # As if it had skipped one.
    before = {**_run_files(run), "skipped.txt": (run / "skipped.txt").read_bytes()}
    assert json.loads(before["run.json"])["status"] == "interrupted"
    refusals = [
        ({"model": {"options": {"width": 16}}}, "does not match this run's model"),
        ({"train": {"learning_rate": 1e-4}}, "asks for learning_rate 0.0001"),
        ({"data": {"max_per_class": 50}}, "other max_per_class"),
    ]
    for changes, refusal in refusals:
        with pytest.raises(CheckpointError, match=refusal):
            train_run(_config(run, changes), resume=True, progress=False)
        assert {**_run_files(run), "skipped.txt": (run / "skipped.txt").read_bytes()} == before
    # The settings it was trained with resume it, and then the files describe the run (which
    # skipped no image).
    _resumed_from_epoch_one(config)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert not (run / "skipped.txt").exists()


def test_a_checkpoint_from_before_the_split_was_recorded_still_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = _interrupted_after_one_epoch(run)
    path = run / CHECKPOINT_NAME
    state = load_checkpoint(path)
    state["identity"] = {"class_names": state["identity"]["class_names"]}
    del state["optimization"]
    save_checkpoint(path, state)
    _resumed_from_epoch_one(config)


def _image_dataset(root: Path, copies: int = 0, split_column: bool = False) -> Path:
    """Two classes of 12 distinct 16 px images (``copies`` of them twice over); a CSV with a
    train/test column, or a folder per class."""
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(12):
            pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
            rows.append(f"{label}/{index}.png,{label},{'test' if index < 3 else 'train'}")
        for index in range(copies):
            (root / label / f"{index}-copy.png").write_bytes((root / label / "0.png").read_bytes())
    if not split_column:
        return root
    (root / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "labels.csv"


def _data(data: Path, **settings: Any) -> dict[str, Any]:
    dataset = "csv" if data.suffix == ".csv" else "folder"
    return {"data": {"dataset": dataset, "data": str(data), "max_classes": None, **settings}}


def test_a_share_that_does_not_draw_the_split_may_change_on_resume(tmp_path: Path) -> None:
    """With a split column, --test-fraction draws nothing: the split, and the resume, stand."""
    data = _data(_image_dataset(tmp_path / "images", split_column=True), val_fraction=0.2)
    run = tmp_path / "run"
    _interrupted_after_one_epoch(run, data)
    changed = _config(run, data, {"data": {"test_fraction": 0.4}})
    _resumed_from_epoch_one(changed)


def test_a_checkpoint_from_before_copies_were_kept_together_is_refused_on_such_data(
    tmp_path: Path,
) -> None:
    """Its split put copies of one image on both sides; this one would not, so the new test
    split may hold images it trained on."""
    data = _data(_image_dataset(tmp_path / "images", copies=2))
    run = tmp_path / "run"
    config = _interrupted_after_one_epoch(run, data)
    path = run / CHECKPOINT_NAME
    state = load_checkpoint(path)
    assert state["identity"]["copies_kept_together"] == 4
    for key in ("split", "copies_kept_together"):
        del state["identity"][key]
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="this data holds 4 copies, so its split has"):
        train_run(config, resume=True, progress=False)


def test_without_a_validation_split_no_validation_accuracy_is_reported(tmp_path: Path) -> None:
    """The trainer keeps the last epoch's weights: best_epoch names it, and the training
    accuracy it ranked epochs by is not passed off as a validation figure."""
    run = tmp_path / "run"
    train_run(_config(run, {"data": {"val_fraction": 0.0}, "train": {"epochs": 3}}), progress=False)
    fit = json.loads((run / "run.json").read_text())["fit"]
    assert fit["best_val_accuracy"] is None
    assert fit["best_epoch"] == fit["epochs_run"] == 3
    training = read_metadata(run / "model.safetensors")["training"]
    assert training["best_val_accuracy"] is None
    page = build_report_html(run)
    assert "best train accuracy (no val split)" in page


def test_the_git_revision_is_cnnkits_own_or_unknown(tmp_path: Path, monkeypatch) -> None:
    """Installed inside another project's repository, cnnkit does not record that commit."""
    import subprocess

    from cnnkit.training import run_folder as run_module

    revision = run_module.git_revision()
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "run_folder.py"],
        cwd=Path(run_module.__file__).parent,
        capture_output=True,
    )
    assert (revision != "unknown") == (tracked.returncode == 0)
    project = tmp_path / "project"
    installed = project / ".venv" / "site" / "cnnkit" / "training" / "run_folder.py"
    installed.parent.mkdir(parents=True)
    installed.write_text("# a copy\n")
    (project / ".gitignore").write_text(".venv/\n")
    git = ["git", "-c", "user.name=x", "-c", "user.email=x@y", "-C", str(project)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "theirs"], check=True)
    monkeypatch.setattr(run_module, "__file__", str(installed))
    assert run_module.git_revision() == "unknown"


def test_a_resumed_run_removes_the_exports_of_the_model_it_replaces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``model.onnx`` and evaluate's reports beside the new model would stand for the old
    weights: they go when the resumed run saves its model, with a warning that names them (a
    user's own file stays)."""
    run = tmp_path / "run"
    train_run(_config(run, {"train": {"epochs": 1}}), progress=False)
    old_model = (run / "model.safetensors").read_bytes()
    (run / "model.onnx").write_bytes(b"an export of the first model")
    (run / "evaluation-model.onnx").mkdir()
    (run / "evaluation-model.onnx" / "metrics.json").write_text("{}")
    (run / "evaluation").mkdir()
    (run / "evaluation" / "notes.txt").write_text("mine")
    (run / "report.html").write_text("the first model's report")
    _resumed_from_epoch_one(_config(run))
    assert (run / "model.safetensors").read_bytes() != old_model
    assert not (run / "model.onnx").exists() and not (run / "report.html").exists()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    removed = "removed the older model's evaluation-model.onnx, model.onnx, report.html from"
    assert [m for m in warned if m.startswith(removed)], warned
    assert not (run / "evaluation-model.onnx").exists()
    assert (run / "evaluation" / "notes.txt").read_text() == "mine"


def test_a_fresh_run_in_a_folder_of_ones_own_keeps_its_files(tmp_path: Path) -> None:
    """Only a folder that held a run is cleared: another tool's model.onnx stays."""
    own = tmp_path / "own"
    own.mkdir()
    (own / "model.onnx").write_bytes(b"another tool's export")
    (own / "evaluation").mkdir()
    (own / "evaluation" / "metrics.json").write_text("{}")
    train_run(_config(own, {"train": {"epochs": 1}}), progress=False)
    assert (own / "model.safetensors").is_file()
    assert (own / "model.onnx").read_bytes() == b"another tool's export"
    assert (own / "evaluation" / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("name", ["model.safetensors", CHECKPOINT_NAME])
def test_a_folder_where_the_run_writes_a_file_is_refused_before_training(
    tmp_path: Path, name: str
) -> None:
    run = tmp_path / "run"
    (run / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{run / name} is a folder where the run writes its"):
        train_run(_config(run), progress=False)
    assert sorted(path.name for path in run.iterdir()) == [name]  # Nothing trained or written.


def _interrupt_the_final_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C landing while the trained model is scored on the test split."""
    scored = Trainer.predict

    def interrupted(self, loader, desc=None):
        if desc == "testing":
            raise KeyboardInterrupt
        return scored(self, loader, desc)

    monkeypatch.setattr(Trainer, "predict", interrupted)


def test_an_interrupt_during_the_final_test_is_resumed_to_the_saved_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every epoch is in the checkpoint: the stop names it, and --resume trains no epoch again
    but tests and saves the model."""
    run = tmp_path / "run"
    config = _config(run)
    _interrupt_the_final_test(monkeypatch)
    with pytest.raises(TrainingInterrupted) as stop:
        train_run(config, progress=False)
    assert str(stop.value) == "interrupted after training, before the model was saved"
    assert (stop.value.checkpoint, stop.value.epochs_completed) == (run / CHECKPOINT_NAME, 2)
    record = json.loads((run / "run.json").read_text())
    assert (record["status"], record["error"]) == ("interrupted", str(stop.value))
    assert not (run / "model.safetensors").exists()
    monkeypatch.undo()
    epochs = FitEpochs()
    result = train_run(config, resume=True, progress=False, callbacks=[epochs])
    assert (epochs.starts, epochs.trained) == ([2], [])
    assert result.model_path == run / "model.safetensors" and result.model_path.is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


class _InterruptAtStart(Callback):
    def on_fit_start(self, trainer: Trainer) -> None:
        raise KeyboardInterrupt


def test_an_interrupt_before_the_first_epoch_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stop:
        train_run(_config(run), progress=False, callbacks=[_InterruptAtStart()])
    assert str(stop.value) == "interrupted before training finished"
    assert stop.value.checkpoint is None  # Nothing to resume: no epoch was saved.
    record = json.loads((run / "run.json").read_text())
    assert (record["status"], record["error"]) == ("interrupted", str(stop.value))


def test_non_finite_test_outputs_end_the_run_as_diverged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose trained weights give NaN on the test images is recorded as diverged, as one
    whose loss did, not as a failure of the tool."""
    run = tmp_path / "run"
    scored = Trainer.predict

    def broken(self, loader, desc=None):
        logits, labels = scored(self, loader, desc)
        return (logits * float("nan") if desc == "testing" else logits), labels

    monkeypatch.setattr(Trainer, "predict", broken)
    with pytest.raises(TrainingDiverged, match="outputs are not finite") as stop:
        train_run(_config(run), progress=False)
    record = json.loads((run / "run.json").read_text())
    assert (record["status"], record["error"]) == ("diverged", str(stop.value))
    assert not (run / "model.safetensors").exists()


def test_a_finished_run_resumed_with_nothing_left_to_train_keeps_its_exports(
    tmp_path: Path,
) -> None:
    """The same weights are saved again, so the exports still stand for them; one more epoch
    replaces them (the test above)."""
    run = tmp_path / "run"
    config = _config(run)
    train_run(config, progress=False)
    model = (run / "model.safetensors").read_bytes()
    (run / "model.onnx").write_bytes(b"an export of the finished model")
    (run / "report.html").write_text("its report")
    epochs = FitEpochs()
    train_run(config, resume=True, progress=False, callbacks=[epochs])
    assert epochs.trained == []
    assert (run / "model.safetensors").read_bytes() == model
    assert (run / "model.onnx").read_bytes() == b"an export of the finished model"
    assert (run / "report.html").read_text() == "its report"


@pytest.mark.parametrize(
    ("checkpoint", "model", "said"),
    [
        (
            "finetune/" + CHECKPOINT_NAME,
            "symbol_cnn",
            "of a pretrained (transfer) model, and symbol_cnn is a model trained from scratch",
        ),
        (
            CHECKPOINT_NAME,
            "efficientnet_lite0",
            "of a model trained from scratch, and "
            "efficientnet_lite0 is a pretrained (transfer) model",
        ),
    ],
)
def test_a_checkpoint_of_the_other_kind_of_model_is_not_resumed(
    tmp_path: Path, checkpoint: str, model: str, said: str
) -> None:
    """A transfer run keeps its checkpoint in its phase's folder, a model trained from scratch
    in the run folder: resuming the one as the other used to say "Resuming" and train from
    scratch beside the other run's files."""
    run = tmp_path / "run"
    (run / checkpoint).parent.mkdir(parents=True, exist_ok=True)
    (run / checkpoint).write_bytes(b"state")
    with pytest.raises(CheckpointError) as refused:
        checkpoint_to_resume(_config(run, {"model": {"name": model, "options": {}}}))
    assert str(refused.value).startswith(f"{run / checkpoint}: the checkpoint {said}")
    other = "efficientnet_lite0" if model == "symbol_cnn" else "book_cnn"
    found = checkpoint_to_resume(_config(run, {"model": {"name": other, "options": {}}}))
    assert found == run / checkpoint


def test_a_fine_tunes_checkpoint_is_not_resumed_by_a_run_without_a_fine_tune(
    tmp_path: Path,
) -> None:
    """``--phases frozen`` would fit a new head and replace the fine-tuned model, as if it
    had resumed it."""
    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    (run / "finetune" / CHECKPOINT_NAME).write_bytes(b"state")
    lite = {"model": {"name": "efficientnet_lite0", "options": {}}}
    with pytest.raises(CheckpointError, match="a fine-tune's checkpoint, and this run has no"):
        checkpoint_to_resume(_config(run, lite, {"transfer": {"phases": ["frozen"]}}))
    assert checkpoint_to_resume(_config(run, lite)) == run / "finetune" / CHECKPOINT_NAME


def test_resuming_a_transfer_runs_folder_as_another_kind_of_model_changes_nothing(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    (run / "finetune" / CHECKPOINT_NAME).write_bytes(b"state")
    (run / "phases.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pretrained"):
        train_run(_config(run), resume=True, progress=False)
    assert sorted(str(path.relative_to(run)) for path in run.rglob("*")) == [
        "finetune",
        f"finetune/{CHECKPOINT_NAME}",
        "phases.json",
    ]


def test_a_resume_with_other_settings_is_recorded_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings the checkpoint does not hold (dropout, augmentation) may change on resume, but
    the run's records would show only the new ones: run.json lists each resume and what it
    changed, and a warning names the changes, except more --epochs, which is what a resume
    is for."""
    run = tmp_path / "run"
    _interrupted_after_one_epoch(run)  # symbol_cnn's dropout 0.2, the preset's rotation 10.
    changed = {"model": {"options": {"dropout": 0.4}}, "augment": {"max_rotation": 5.0}}
    train_run(_config(run, changed, {"train": {"epochs": 3}}), resume=True, progress=False)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["resumes"] == [
        {
            "from_epoch": 1,
            "changed": {
                "model.options.dropout": {"before": 0.2, "now": 0.4},
                "augment.max_rotation": {"before": 10.0, "now": 5.0},
                "train.epochs": {"before": 2, "now": 3},
            },
        }
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "model.options.dropout 0.2 -> 0.4; augment.max_rotation 10.0 -> 5.0" in warnings[0]
    assert "train.epochs" not in warnings[0]
    caplog.clear()
    # A resume that is stopped in its turn keeps the list, with its own entry.
    more = _config(run, changed, {"train": {"epochs": 5}})
    with pytest.raises(TrainingInterrupted):
        train_run(more, resume=True, progress=False, callbacks=[StopAfter(4)])
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted" and len(record["resumes"]) == 2
    assert record["resumes"][1] == {
        "from_epoch": 3,
        "changed": {"train.epochs": {"before": 3, "now": 5}},
    }
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # Settings a run is told to change (more patience), or that change nothing learned.
    calm = {"train": {"epochs": 5, "early_stopping_patience": 3, "fast_path": False}}
    train_run(_config(run, changed, calm), resume=True, progress=False)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and len(record["resumes"]) == 3
    assert record["resumes"][2]["from_epoch"] == 4
    assert set(record["resumes"][2]["changed"]) == {
        "train.early_stopping_patience",
        "train.fast_path",
    }
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_relative_data_path_in_an_older_config_file_is_no_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs now record their data as an absolute path; an older run's relative one is taken
    from the current folder, and a resume there of the same data changes nothing."""
    from cnnkit.config import dump_config
    from cnnkit.training.run_status import changed_settings

    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path / "run", {"data": {"dataset": "folder", "data": "shapes"}})
    older = dump_config(config)  # As runs wrote it: `data: shapes`, as typed.
    assert "data: shapes\n" in older
    (tmp_path / "config.yaml").write_text(older)
    assert changed_settings(tmp_path / "config.yaml", config) == {}
    moved = _config(tmp_path / "run", {"data": {"dataset": "folder", "data": "other"}})
    assert changed_settings(tmp_path / "config.yaml", moved) == {
        "data.data": {"before": str(tmp_path / "shapes"), "now": str(tmp_path / "other")}
    }
