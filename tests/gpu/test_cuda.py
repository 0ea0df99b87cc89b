"""The CUDA paths: AMP, checkpoints that move between GPU and CPU, the CLI, the transfer recipe,
the memory check and the web API on a GPU. Marked ``gpu``: skipped where CUDA is absent (see
``tests/conftest.py``); run them with ``pytest -m gpu`` on a machine that has one."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import StopAfter, subprocess_env
from torch import nn

from cnnkit.cli import main
from cnnkit.config import AugmentConfig, Preprocessing, TrainConfig
from cnnkit.data.dataset import DataSplits
from cnnkit.data.digits import DigitsSource
from cnnkit.data.loader import BatchLoader, build_train_transform
from cnnkit.inference.artifact import load_model
from cnnkit.inference.predictor import Predictor
from cnnkit.models.registry import create_model
from cnnkit.training.memory import estimate_training_memory
from cnnkit.training.trainer import Trainer, TrainingInterrupted
from cnnkit.training.transfer import fit_transfer

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
PREPROCESSING = Preprocessing("symbol", 1, 8, 8, (0.5,), (0.5,))
BASE = TrainConfig(
    epochs=40,
    batch_size=8,
    learning_rate=1e-2,
    weight_decay=1e-4,
    label_smoothing=0.0,
    schedule="constant",
    warmup_fraction=0.0,
    channels_last=False,
    amp=True,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def _loader(tiny_image_set, device: torch.device, augment: bool = True) -> BatchLoader:
    images = tiny_image_set(num_classes=4, per_class=4, size=8, seed=1)
    transform = build_train_transform(PREPROCESSING, AugmentConfig(enabled=augment, max_shift=1))
    return BatchLoader(images, 8, transform, shuffle=True, seed=3, device=device)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16-scaler"])
def test_amp_training_overfits_two_batches(tiny_image_set, monkeypatch, bf16: bool) -> None:
    if bf16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    if not bf16:  # The path of GPUs without bf16 (before Ampere): float16 and a grad scaler.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    trainer = Trainer(_model(), BASE, CUDA, progress=False)
    assert trainer.autocast_dtype == (torch.bfloat16 if bf16 else torch.float16)
    assert (trainer.scaler is None) == bf16
    result = trainer.fit(_loader(tiny_image_set, CUDA, augment=False))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.25 * losses[0]
    assert result.history[-1]["train_accuracy"] >= 0.9
    assert all(p.device.type == "cuda" and p.isfinite().all() for p in trainer.module.parameters())


def test_augmentation_runs_on_the_gpu_with_the_cpu_generator(tiny_image_set) -> None:
    # The random parameters come from a CPU generator; the images never leave the GPU.
    photos = tiny_image_set(num_classes=2, per_class=4, size=40, channels=3, seed=1)
    preprocessing = Preprocessing("photo", 3, 32, 40, (0.5,) * 3, (0.5,) * 3)
    config = AugmentConfig(
        enabled=True, random_resized_crop=True, hflip=True, max_rotation=45, color_jitter=0.2
    )
    transform = build_train_transform(preprocessing, config)
    gpu = list(BatchLoader(photos, 4, transform, shuffle=True, seed=5, device=CUDA))
    cpu = list(BatchLoader(photos, 4, transform, shuffle=True, seed=5, device=CPU))
    assert len(gpu) == len(cpu) == 2
    for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(gpu, cpu, strict=True):
        assert gpu_images.device.type == "cuda" and gpu_images.shape == (4, 3, 32, 32)
        assert torch.equal(gpu_labels.cpu(), cpu_labels)
        # The same draws on either device: the same augmented images up to float rounding.
        torch.testing.assert_close(gpu_images.cpu(), cpu_images, atol=2e-3, rtol=0)


def test_a_gpu_checkpoint_resumes_on_the_cpu(tiny_image_set, tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, epochs=4)
    first = Trainer(_model(), config, CUDA, tmp_path, callbacks=[StopAfter(2)], progress=False)
    with pytest.raises(TrainingInterrupted):
        first.fit(_loader(tiny_image_set, CUDA))
    stopped = {k: v.cpu() for k, v in first.module.state_dict().items()}
    # The laptop picks the run up: the CUDA tensors of the checkpoint load onto the CPU.
    on_cpu = dataclasses.replace(config, amp=False)
    same = Trainer(_model(seed=1), dataclasses.replace(on_cpu, epochs=2), CPU, tmp_path)
    same.progress = False
    assert same.fit(_loader(tiny_image_set, CPU), resume=True).epochs_run == 2
    restored = same.module.state_dict()
    assert all(torch.equal(stopped[k], restored[k]) for k in stopped)  # The GPU's epoch 2.
    rest = Trainer(_model(seed=1), on_cpu, CPU, tmp_path, progress=False)
    result = rest.fit(_loader(tiny_image_set, CPU), resume=True)
    assert result.epochs_run == 4 and [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert all(p.device.type == "cpu" and p.isfinite().all() for p in rest.module.parameters())


def test_cli_trains_on_the_gpu_and_the_model_runs_anywhere(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "3", "--device", "cuda", "--quiet"]
    assert main([*argv, "--out", str(run), "--cache-dir", str(tmp_path / "cache")]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["test"]["top1"] > 0.8
    # The run let cuDNN time its kernels for the fixed batch shapes, and fp32 use TF32.
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    model_path = run / "model.safetensors"
    # Real digits (the first 64 scans): the GPU's and the CPU's answers agree.
    source = DigitsSource()
    images = [source.image(index) for index in range(64)]
    on_gpu = Predictor.from_file(model_path, device="cuda").predict(images, top_k=3)
    on_cpu = Predictor.from_file(model_path, device="cpu").predict(images, top_k=3)
    pairs = [(gpu[0], cpu[0]) for gpu, cpu in zip(on_gpu, on_cpu, strict=True)]
    # Near ties may flip under the GPU's TF32 convolutions: at most one image of 64.
    assert sum(gpu.label != cpu.label for gpu, cpu in pairs) <= 1
    assert sum(abs(gpu.confidence - cpu.confidence) < 1e-2 for gpu, cpu in pairs) >= 63
    # evaluate on either device scores the same split alike, and as the training report did.
    scores = {}
    for device in ("cuda", "cpu"):
        capsys.readouterr()
        argv = ["evaluate", str(model_path), "--dataset", "digits", "--json", "--device", device]
        argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / device)]
        assert main(argv) == 0
        scores[device] = json.loads(capsys.readouterr().out)
    count = scores["cpu"]["count"]
    assert scores["cuda"]["count"] == count == info["test"]["count"]
    assert abs(scores["cuda"]["top1"] - scores["cpu"]["top1"]) <= 1 / count + 1e-9
    assert abs(scores["cuda"]["top1"] - info["test"]["top1"]) <= 1 / count + 1e-9


def test_a_cpu_checkpoint_resumes_on_the_gpu(tiny_image_set, tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, epochs=4, amp=False)
    first = Trainer(_model(), config, CPU, tmp_path, callbacks=[StopAfter(2)], progress=False)
    with pytest.raises(TrainingInterrupted):
        first.fit(_loader(tiny_image_set, CPU))
    stopped = first.module.state_dict()
    same = Trainer(_model(seed=1), dataclasses.replace(config, epochs=2), CUDA, tmp_path)
    same.progress = False
    assert same.fit(_loader(tiny_image_set, CUDA), resume=True).epochs_run == 2
    restored = same.module.state_dict()
    assert all(torch.equal(stopped[k], restored[k].cpu()) for k in stopped)
    rest = Trainer(_model(seed=1), config, CUDA, tmp_path, progress=False)
    result = rest.fit(_loader(tiny_image_set, CUDA), resume=True)
    assert result.epochs_run == 4
    assert all(p.device.type == "cuda" and p.isfinite().all() for p in rest.module.parameters())


def test_transfer_recipe_runs_both_phases_on_the_gpu(tiny_image_set, tmp_path: Path) -> None:
    from cnnkit.config import build_run_config

    config = build_run_config(
        {
            "data": {"dataset": "digits", "channels": 3},
            "model": {"name": "efficientnet_lite0", "options": {"hidden": 16}},
            "augment": {"random_resized_crop": True, "hflip": True, "max_rotation": 0.0},
            "train": {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "amp": True},
            "transfer": {"augmented_views": 1, "head_epochs": 3},
        }
    )

    def photos(seed: int, per_class: int):
        return tiny_image_set(num_classes=2, per_class=per_class, size=40, channels=3, seed=seed)

    train = photos(1, 4)
    splits = DataSplits(train, photos(2, 2), photos(3, 2), train.class_names, "tiny photos")
    preprocessing = Preprocessing("photo", 3, 32, 40, (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, 3, pretrained=False, hidden=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fit_transfer(model, config, splits, preprocessing, CUDA, tmp_path, progress=False)
    assert fit.epochs_run >= 2
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k].cpu())}
    assert any(k.startswith("backbone.") for k in changed)  # The fine-tune moved the backbone.
    assert all(v.device.type == "cuda" for v in after.values())
    assert (tmp_path / "features").is_dir() and any((tmp_path / "features").iterdir())


def test_memory_estimate_is_close_to_the_gpus_measured_peak() -> None:
    torch.manual_seed(0)
    model = create_model("symbol_cnn", 369, 1).to(CUDA).train()
    inputs = torch.rand(256, 1, 32, 32, device=CUDA)
    labels = torch.randint(0, 369, (256,), device=CUDA)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    estimate = estimate_training_memory(model, inputs, autocast)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with autocast():
        loss = nn.functional.cross_entropy(model(inputs), labels)
    loss.backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - start
    activations = estimate.per_sample * 256 + estimate.fixed
    # The estimate counts what autograd saves; the peak adds gradients and workspace. Within a
    # factor of two either way is what the pre-flight check needs to choose micro-batches.
    assert measured / 2 <= activations <= measured * 2, (activations, measured)


def test_web_api_serves_a_model_on_the_gpu(symbol_model_file: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from PIL import Image, ImageDraw

    from cnnkit.web.app import create_app
    from cnnkit.web.server import load_predictor

    image = Image.new("L", (32, 32), 255)
    ImageDraw.Draw(image).line([(4, 4), (28, 28), (4, 28)], fill=0, width=2)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    expected = Predictor.from_file(symbol_model_file).predict(image)[0]
    # As `cnnkit serve --device cuda` loads it: batch norms folded, channels-last memory.
    gpu = load_predictor(str(symbol_model_file), device="cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    with TestClient(create_app(gpu)) as client:
        answers = [
            client.post("/api/predict", files={"file": ("s.png", buffer.getvalue())})
            for _ in range(3)
        ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        top = answer.json()["predictions"][0]
        assert top["label"] == expected[0].label
        assert top["confidence"] == pytest.approx(expected[0].confidence, abs=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL, one per rank)")
def test_torchrun_on_two_gpus_matches_one(tmp_path: Path) -> None:
    args = ["train", "--dataset", "digits", "--epochs", "4", "--batch-size", "64", "--quiet"]
    args += ["--seed", "3", "--device", "cuda"]
    env = {**subprocess_env(), "CNNKIT_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for name, prefix in (("single", ["--nproc_per_node", "1"]), ("ddp", ["--nproc_per_node", "2"])):
        full = [*command, *prefix, "-m", "cnnkit", *args, "--out", str(tmp_path / name)]
        result = subprocess.run(full, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "run.json").read_text())["fit"]
    double = json.loads((tmp_path / "ddp" / "run.json").read_text())["fit"]
    assert abs(single["best_val_accuracy"] - double["best_val_accuracy"]) <= 0.02
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.safetensors")) == ["model.safetensors"]
    load_model(tmp_path / "ddp" / "model.safetensors")  # One whole model, loadable on the CPU.
