"""End to end through the CLI on real HASYv2 data from ../shared/data: train on five classes of
fold 1, then predict an image taken from the archive."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from cnnkit.cli import main
from cnnkit.inference.artifact import read_metadata

pytestmark = pytest.mark.realdata

ARCHIVE = "HASYv2-dev.tar.bz2"
FOLD_TEST = "classification-task/fold-1/test.csv"


@pytest.fixture(scope="module")
def archive(shared_data: Path) -> Path:
    path = shared_data / ARCHIVE
    if not path.is_file():
        pytest.skip(f"{path} is absent (real HASYv2 data lives in ../shared/data)")
    return path


def _extract_test_image(archive: Path, class_names: set[str], folder: Path) -> tuple[Path, str]:
    """Stream the archive once: read fold 1's test list, then copy out one matching image."""
    wanted: dict[str, str] = {}
    with tarfile.open(archive, mode="r|bz2") as stream:
        for member in stream:
            name = member.name.removeprefix("./")
            if name == FOLD_TEST:
                text = stream.extractfile(member).read().decode("utf-8")
                for row in csv.DictReader(io.StringIO(text)):
                    if row["latex"] in class_names:
                        wanted[row["path"].replace("../../", "")] = row["latex"]
            elif name in wanted:
                path = folder / Path(name).name
                path.write_bytes(stream.extractfile(member).read())
                return path, wanted[name]
    raise AssertionError(f"no fold-1 test image of {sorted(class_names)} found in {archive}")


def test_train_five_classes_then_predict(archive: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", "--dataset", "hasy", "--data", str(archive), "--fold", "1"]
    # About 330 training images: batches of 16 give enough steps in two epochs.
    argv += ["--max-classes", "5", "--epochs", "2", "--batch-size", "16"]
    argv += ["--out", str(out), "--quiet"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0, capsys.readouterr().err

    run = json.loads((out / "run.json").read_text())
    assert run["test"]["top1"] > 0.5
    assert run["config"]["data"]["fold"] == 1
    class_names = read_metadata(out / "model.safetensors")["class_names"]
    assert len(class_names) == 5

    image, truth = _extract_test_image(archive, set(class_names), tmp_path)
    assert truth in class_names
    capsys.readouterr()
    assert main(["predict", str(out / "model.safetensors"), str(image)]) == 0
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"Prediction: (.+), confidence: [01]\.\d\d", line)
    assert match, line
    assert match.group(1) in class_names
