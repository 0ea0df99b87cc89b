"""Tests for the run folder checks: an --out folder that is a folder-per-class image dataset is
refused before anything is written, and folders of one's own or of an earlier run are not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import main
from cnnkit.training.run_folder import refuse_image_dataset_as_run_dir

TINY_RUN = ["train", "--dataset", "digits", "--epochs", "1", "--max-per-class", "10", "--quiet"]


def _write_images(folder: Path, count: int = 2, suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image-{index}{suffix}", format="PNG")


def _listing(folder: Path) -> list[str]:
    """Every path under ``folder``, relative to it, sorted."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


@pytest.fixture
def image_dataset(tmp_path: Path) -> Path:
    """A folder-per-class image dataset, ``fold/a`` and ``fold/b``, with a stray note."""
    fold = tmp_path / "fold"
    _write_images(fold / "a")
    _write_images(fold / "b", suffix=".JPG")  # Upper-case suffixes are images too.
    (fold / "notes.txt").write_text("my labels", encoding="utf-8")
    return fold


@pytest.mark.parametrize("command", ["train", "search"])
def test_an_image_dataset_as_out_is_refused_and_left_as_it_was(
    capsys, image_dataset: Path, command: str
) -> None:
    before = _listing(image_dataset)
    argv = [command, "--dataset", "digits", "--epochs", "1", "--out", str(image_dataset)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()
    assert len(error) == 1, captured.err
    assert error[0].startswith(f"cnnkit {command}: error: --out {image_dataset} looks like")
    assert "class folder a/ holds images" in error[0]
    assert "report/ and tensorboard/" in error[0] and "write the run elsewhere" in error[0]
    assert _listing(image_dataset) == before


def test_an_empty_out_folder_is_used(capsys, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert main([*TINY_RUN, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_a_folder_of_ones_own_without_images_is_used_and_kept(capsys, tmp_path: Path) -> None:
    """Like ``--out .`` in a project folder: subfolders of other files are no dataset, and
    nothing of them is removed."""
    out = tmp_path / "project"
    (out / "docs").mkdir(parents=True)
    (out / "docs" / "notes.md").write_text("# notes", encoding="utf-8")
    (out / "data").mkdir()
    (out / "data" / "values.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (out / "image.png.txt").write_text("not an image", encoding="utf-8")
    before = _listing(out)
    assert main([*TINY_RUN, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert set(before) <= set(_listing(out))


def test_a_folder_holding_an_earlier_run_is_trained_into_again(capsys, tmp_path: Path) -> None:
    """An earlier run's report/ holds PNG images, yet its folder is a run's, not a dataset."""
    out = tmp_path / "run"
    assert main([*TINY_RUN, "--out", str(out)]) == 0
    assert any((out / "report").glob("*.png"))
    capsys.readouterr()
    assert main([*TINY_RUN, "--out", str(out)]) == 0
    assert "holds an earlier run; this run replaces it" in capsys.readouterr().out


def test_only_a_visible_subfolder_that_holds_images_counts(tmp_path: Path) -> None:
    """A missing folder, a folder of non-image files, images in a hidden folder (a folder
    dataset skips it) or only directly in the folder itself: none is refused."""
    refuse_image_dataset_as_run_dir(tmp_path / "missing")
    folder = tmp_path / "mine"
    _write_images(folder / ".thumbnails")
    _write_images(folder)
    (folder / "text").mkdir()
    (folder / "text" / "a.txt").write_text("a", encoding="utf-8")
    (folder / "text" / ".hidden.png").write_text("a", encoding="utf-8")
    refuse_image_dataset_as_run_dir(folder)
    _write_images(folder / "z")
    with pytest.raises(ValueError, match=r"mine looks like an image dataset .* z/ holds images"):
        refuse_image_dataset_as_run_dir(folder)
    # A folder that holds the run's own training data (a CSV beside its images, say) is the
    # user's working folder: its run goes there, as the CSV test in test_cli_digits trains.
    refuse_image_dataset_as_run_dir(folder, [folder / "data", tmp_path / "elsewhere"])
    refuse_image_dataset_as_run_dir(folder, [folder])
    with pytest.raises(ValueError, match="looks like an image dataset"):
        refuse_image_dataset_as_run_dir(folder, [tmp_path / "elsewhere"])
    # A dataset split into train/ and test/ folders of class folders is one too.
    split = tmp_path / "split"
    for name in ("train", "test"):
        _write_images(split / name / "cat")
    with pytest.raises(ValueError, match=r"split looks like .* folder test/cat/ holds images"):
        refuse_image_dataset_as_run_dir(split)
    (split / "notes").mkdir()  # Beside another folder (which the folder source refuses).
    with pytest.raises(ValueError, match=r"split looks like .* folder test/cat/ holds images"):
        refuse_image_dataset_as_run_dir(split)
    only = tmp_path / "only-train"  # A train/ folder alone is a dataset too.
    _write_images(only / "Train" / "dog")
    with pytest.raises(ValueError, match=r"folder Train/dog/ holds images"):
        refuse_image_dataset_as_run_dir(only)


def test_a_models_exports_are_among_the_outputs_a_fresh_run_clears() -> None:
    """What a resumed run removes (the replaced model's exports) a fresh run clears too."""
    from cnnkit.training.run_folder import MODEL_EXPORTS, RUN_OUTPUTS

    assert set(MODEL_EXPORTS) <= set(RUN_OUTPUTS)
    assert {"model.onnx", "report.html", "evaluation"} <= set(MODEL_EXPORTS)
