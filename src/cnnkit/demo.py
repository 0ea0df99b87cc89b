"""The embedded default: train, evaluate, save and use a CNN on scikit-learn's digits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cnnkit.config import build_run_config
from cnnkit.inference.predictor import Prediction, Predictor
from cnnkit.presets import preset_for
from cnnkit.training.run import RunResult, train_run


@dataclass
class DemoResult:
    """The demo's run plus a few held-out predictions ``(file name, prediction, truth)``."""

    run: RunResult
    samples: list[tuple[str, Prediction, str]]
    sample_dir: Path
    description: str


def run_demo(out: Path, epochs: int = 12, progress: bool = True, samples: int = 6) -> DemoResult:
    """Train ``symbol_cnn`` on the digits (upscaled to 32x32), then predict held-out images.

    The test images are written as PNG files to ``out/samples`` and read back through the
    predictor, exactly as a user's files would be.
    """
    config = build_run_config(
        preset_for("digits"),
        {"data": {"dataset": "digits"}, "train": {"epochs": epochs}, "out": str(out)},
    )
    run = train_run(config, cache_dir=None, progress=progress)
    sample_dir = out / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    from cnnkit.data.digits import DigitsSource
    from cnnkit.data.sources import build_splits
    from cnnkit.training.preprocessing import resolve_preprocessing

    splits = build_splits(config.data, resolve_preprocessing(config)).splits
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(splits.test), size=min(samples, len(splits.test)), replace=False)
    source = DigitsSource()
    paths, truths = [], []
    for index in chosen:
        key = splits.test.paths[index]
        raw = source.image(int(key.removeprefix("digit-").removesuffix(".png")))
        path = sample_dir / f"test-{key}"
        raw.resize((32, 32), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
        truths.append(splits.class_names[splits.test.labels[index]])
    predictor = Predictor.from_file(run.model_path)
    ranked = predictor.predict(paths, top_k=1)
    results = [(p.name, r[0], t) for p, r, t in zip(paths, ranked, truths, strict=True)]
    return DemoResult(run, results, sample_dir, run.data_description)
