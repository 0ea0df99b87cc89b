"""Where a transfer fine-tune step spends its time, by kind of operation, in fp32 and bf16.

    python -m benchmarks.finetune_profile                      # Lite0, 224 px, batch 8
    python -m benchmarks.finetune_profile --model efficientnet_lite_trio --image-size 320

One training step as the recipe runs it (forward, backward and fused AdamW, channels_last,
batch-norm statistics kept) is profiled with torch.profiler after a warm-up step, on random
images: the figures are about compute, not data. It prints the step time and the share of
the profiled CPU time in each group of operators (depthwise and dense convolution, forward and
backward, batch norm, and the rest) for fp32, for bf16 autocast on every layer, and for bf16 as
shipped, with depthwise convolutions kept in fp32 while training: oneDNN's bf16 depthwise
backward is the slow part of the all-bf16 step.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.record import record_result
from cnnkit.models.efficientnet_lite import ConvBnAct
from cnnkit.models.registry import create_model
from cnnkit.runtime import cpu_supports_bf16
from cnnkit.training.transfer import FrozenBatchNorm


def operator_group(name: str, shapes: list) -> str:
    """The group an operator's time counts in; convolutions split by depthwise or dense."""
    if name in ("aten::convolution_backward", "aten::mkldnn_convolution"):
        weight = shapes[2] if name == "aten::convolution_backward" else shapes[1]
        depthwise = len(weight) == 4 and weight[1] == 1 and weight[0] > 1
        kind = "depthwise" if depthwise else "dense"
        return f"{kind} conv {'backward' if name.endswith('backward') else 'forward'}"
    if name.startswith("aten::_slow_conv2d"):  # PyTorch's own GEMM path for some dense convs.
        return f"dense conv {'backward' if name.endswith('backward') else 'forward'}"
    if "batch_norm" in name:
        return "batch norm"
    return "other"


def profile_step(model: torch.nn.Module, batch_size: int, image_size: int, bf16: bool) -> dict:
    network = FrozenBatchNorm(model).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch_size, 3, image_size, image_size)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 30, (batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(network(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[1]  # The median of three steps.
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        step()
    groups: dict[str, float] = defaultdict(float)
    others: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages(group_by_input_shape=True):
        group = operator_group(event.key, event.input_shapes)
        groups[group] += event.self_cpu_time_total
        if group == "other":
            others[event.key] += event.self_cpu_time_total
    total = sum(groups.values())
    largest_others = sorted(others.items(), key=lambda item: -item[1])[:4]
    return {
        "step_seconds": seconds,
        "shares": {name: value / total for name, value in sorted(groups.items())},
        "largest_other_operators": {name: value / total for name, value in largest_others},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--name", default="finetune_profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = {"image_size": args.image_size} if args.model == "efficientnet_lite_trio" else {}
    model = create_model(args.model, num_classes=30, in_channels=3, **options)
    model.unfreeze_backbone()
    # "bf16, all layers" is autocast before depthwise convolutions were kept in fp32.
    variants = {"fp32": (False, True)}
    if cpu_supports_bf16():
        variants.update({"bf16, all layers": (True, False), "bf16 (shipped)": (True, True)})
    results = {}
    for variant, (bf16, fp32_depthwise) in variants.items():
        ConvBnAct.fp32_depthwise_training_on_cpu = fp32_depthwise
        results[variant] = profile_step(model, args.batch_size, args.image_size, bf16)
        step_seconds = results[variant]["step_seconds"]
        speed_up = results["fp32"]["step_seconds"] / step_seconds
        print(f"{variant}: step {step_seconds:.2f} s ({speed_up:.2f}x fp32)")
        for name, share in sorted(results[variant]["shares"].items(), key=lambda item: -item[1]):
            print(f"  {name:26s} {share:6.1%}")
        others = ", ".join(
            f"{name} {share:.1%}"
            for name, share in results[variant]["largest_other_operators"].items()
        )
        print(f"  other, largest: {others}")
    ConvBnAct.fp32_depthwise_training_on_cpu = True
    setup = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    path = record_result(args.name, {"setup": setup, "results": results})
    print(f"recorded: {path}")


if __name__ == "__main__":
    main()
