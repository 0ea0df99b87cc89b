"""Shared fixtures: repository paths, tiny synthetic image sets and tiny saved model files."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.config import Preprocessing
from cnnkit.data.dataset import ImageSet
from cnnkit.training.trainer import Callback, Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA, which this machine does not have")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``), share the cores among the workers:
    each worker, and the processes its tests start, gets ``cores // workers`` threads, where
    every one of them taking all the cores would only make them wait on each other."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Captured output that names a file whose name is not UTF-8 holds surrogates, which
    pytest-xdist cannot send from a worker (it stops the whole run); they are written as
    replacement characters instead."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [
        (title, text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        for title, text in report.sections
    ]


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_reaches_child_processes() -> None:
    """A shell that starts ``make test`` in the background (``make test &``) ignores SIGINT,
    and every process it starts inherits that: Python then raises no KeyboardInterrupt, and
    the tests that send Ctrl-C to a subprocess would see it do nothing. Handling SIGINT here
    gives the subprocesses the default again (an ignored signal stays ignored across exec;
    a handled one is reset)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> None:
    """Put back the Ctrl-C and SIGTERM handlers a test changed. A test that runs a worker
    process's code in its own process (search's ``worker_main`` ignores both signals) would
    otherwise leave every later test's child processes deaf to Ctrl-C; under pytest-xdist
    which tests come later changes from run to run."""
    interrupts = (signal.SIGINT, signal.SIGTERM)
    saved = {number: signal.getsignal(number) for number in interrupts}
    yield
    for number, handler in saved.items():
        if handler is not None and signal.getsignal(number) is not handler:
            signal.signal(number, handler)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep what the package caches by default (ONNX exports, decoded images) out of the
    user's ``~/.cache`` during tests, unless ``CNNKIT_CACHE`` is set."""
    if "CNNKIT_CACHE" in os.environ:
        return
    os.environ["CNNKIT_CACHE"] = str(tmp_path_factory.mktemp("cnnkit-cache"))


class StopAfter(Callback):
    """A trainer callback that simulates Ctrl-C after ``epochs`` completed epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.epoch == self.epochs:
            raise KeyboardInterrupt


class FitEpochs(Callback):
    """Records, for each fit, the epoch it started at (a resumed fit starts at its checkpoint's)
    and the epochs it trained: a seeded run trained afresh would end with the same history, so
    only these tell a resume from a new start."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.trained: list[int] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.starts.append(trainer.epoch)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.trained.append(int(metrics["epoch"]))


def subprocess_env() -> dict[str, str]:
    """This environment with the tested ``cnnkit`` first on ``PYTHONPATH``, for child Python
    processes; what ``PYTHONPATH`` held already (packages installed elsewhere) stays after it."""
    import cnnkit

    paths = [str(Path(cnnkit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data(repo_root: Path) -> Path:
    """``../shared/data`` next to the repository; tests skip where a file there is absent."""
    return repo_root.parent / "shared" / "data"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An empty run folder inside the test's temporary directory."""
    path = tmp_path / "run"
    path.mkdir()
    return path


def non_utf8_path(parent: Path, name: bytes) -> Path:
    """``parent / name`` for a file name that is not UTF-8, as ``os.walk`` gives it (its bad
    bytes as surrogates); skips the test where the file system refuses such names."""
    path = parent / os.fsdecode(name)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        path.unlink()
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses file names that are not UTF-8")
    return path


def within_seconds(seconds: float, function):
    """Run ``function`` in a thread; fail the test if it has not returned within ``seconds``."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except Exception as error:  # handed back to the test below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked or looping?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def make_image_set(
    num_classes: int = 3,
    per_class: int = 4,
    size: int = 8,
    channels: int = 1,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> ImageSet:
    """Random uint8 images ``[N, size, size, channels]`` with balanced labels ``0..K-1``."""
    rng = np.random.default_rng(seed)
    count = num_classes * per_class
    images = rng.integers(0, 256, size=(count, size, size, channels), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    names = class_names or [f"class_{index}" for index in range(num_classes)]
    return ImageSet(images, labels, names, [f"image-{index:03d}.png" for index in range(count)])


@pytest.fixture
def tiny_image_set() -> Callable[..., ImageSet]:
    """A builder of random image sets: ``tiny_image_set(num_classes=3, per_class=4, size=8)``."""
    return make_image_set


def save_tiny_model(
    path: Path,
    class_names: tuple[str, ...] = ("alpha", "beta", "gamma"),
    mode: str = "symbol",
    channels: int = 1,
    seed: int = 0,
    half: bool = False,
) -> Path:
    """Save a 4-wide ``symbol_cnn`` (32x32 input) as a cnnkit model file."""
    from cnnkit.inference.artifact import ModelMetadata, save_model
    from cnnkit.models.registry import create_model

    torch.manual_seed(seed)
    options = {"width": 4, "layers_per_stage": 1}
    model = create_model("symbol_cnn", len(class_names), channels, **options).eval()
    preprocessing = Preprocessing(mode, channels, 32, 32, (0.5,) * channels, (0.5,) * channels)
    metadata = ModelMetadata("symbol_cnn", tuple(class_names), preprocessing, options)
    return save_model(path, model, metadata, half=half)


@pytest.fixture(scope="session")
def symbol_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny symbol-mode model file with classes ``alpha``, ``beta``, ``gamma`` (read-only use)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "symbols.safetensors")


@pytest.fixture(scope="session")
def photo_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny photo-mode, 3-channel model file with two bird names (read-only use)."""
    return save_tiny_model(
        tmp_path_factory.mktemp("models") / "photos.safetensors",
        class_names=("Cardinal", "Blue Jay"),
        mode="photo",
        channels=3,
    )


@pytest.fixture
def tiny_model_saver() -> Callable[..., Path]:
    """``tiny_model_saver(path, class_names=..., mode="symbol", channels=1, half=False)``."""
    return save_tiny_model


def write_bird_folder(root: Path, per_class: int, spread: float = 30.0) -> Path:
    """A folder-per-class photo dataset: red and blue noisy 64x48 JPEGs, ``per_class`` each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("Red Bird", (200, 30, 30)), ("Blue Bird", (30, 30, 200))):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.clip(rng.normal(colour, spread, size=(48, 64, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.jpg")
    return root
