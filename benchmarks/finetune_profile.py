"""Where a transfer fine-tune step spends its time, by kind of operation, in fp32 and bf16.

    python -m benchmarks.finetune_profile                      # Lite0, 224 px, batch 8
    python -m benchmarks.finetune_profile --model efficientnet_lite_trio --image-size 320

One training step as the recipe runs it (forward, backward and fused AdamW, channels_last,
batch-norm statistics kept, glibc's allocator tuned) is timed for each variant in alternating
rounds after a warm-up step, then profiled once with torch.profiler, on random images: the
figures are about compute, not data. It prints the median step time and the share of the
profiled CPU time in each group of operators (depthwise and dense convolution, forward and
backward, batch norm, and the rest) for fp32, for bf16 autocast on every layer, for bf16 with
depthwise convolutions kept in fp32 while training (oneDNN's bf16 depthwise backward is the slow
part of the all-bf16 step), and for bf16 as shipped, which also folds the frozen batch norm
into the convolutions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.record import record_result
from cnnkit.models.efficientnet_lite import ConvBnAct
from cnnkit.models.registry import create_model
from cnnkit.runtime import cpu_supports_bf16, tune_allocator
from cnnkit.training.finetune import FrozenBatchNorm


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


@dataclass(frozen=True)
class Variant:
    bf16: bool
    fp32_depthwise: bool  # Depthwise convolutions in fp32 while training under autocast.
    fold_batch_norm: bool  # Frozen batch norm folded into the convolutions.


def training_step(
    model: torch.nn.Module, batch_size: int, image_size: int, variant: Variant
) -> Callable[[], None]:
    """One recipe step of ``variant``, as a function; each has its own optimizer."""
    network = FrozenBatchNorm(model).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch_size, 3, image_size, image_size)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 30, (batch_size,))

    def step() -> None:
        ConvBnAct.fp32_depthwise_training_on_cpu = variant.fp32_depthwise
        ConvBnAct.fold_eval_batch_norm = variant.fold_batch_norm
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bf16):
            loss = F.cross_entropy(network(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_seconds(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds a step of each variant, timed in alternating rounds.

    The machine's speed drifts over minutes; alternating puts every variant under the same
    drift, where timing one after another did not (ratios moved by 0.2x between runs).
    """
    times: dict[str, list[float]] = defaultdict(list)
    for step in steps.values():
        step()  # Warm-up: oneDNN picks and caches its kernels.
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def operator_shares(step: Callable[[], None]) -> dict:
    """The share of one profiled step's CPU time in each operator group."""
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
        "shares": {name: value / total for name, value in sorted(groups.items())},
        "largest_other_operators": {name: value / total for name, value in largest_others},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--name", default="finetune_profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # As `cnnkit train` does: without it, page faults add noise to the steps.
    torch.manual_seed(0)
    options = {"image_size": args.image_size} if args.model == "efficientnet_lite_trio" else {}
    model = create_model(args.model, num_classes=30, in_channels=3, **options)
    model.unfreeze_backbone()
    # "bf16, all layers" is autocast before depthwise convolutions were kept in fp32, and
    # "batch norm separate" the shipped step before batch norm was folded.
    variants = {"fp32": Variant(bf16=False, fp32_depthwise=True, fold_batch_norm=True)}
    if cpu_supports_bf16():
        variants["bf16, all layers"] = Variant(True, fp32_depthwise=False, fold_batch_norm=False)
        variants["bf16, batch norm separate"] = Variant(True, True, fold_batch_norm=False)
        variants["bf16 (shipped)"] = Variant(True, True, True)
    steps = {
        name: training_step(model, args.batch_size, args.image_size, variant)
        for name, variant in variants.items()
    }
    seconds = step_seconds(steps, args.rounds)
    results = {}
    for name, step in steps.items():
        results[name] = {"step_seconds": seconds[name], **operator_shares(step)}
        speed_up = seconds["fp32"] / seconds[name]
        print(f"{name}: step {seconds[name]:.2f} s ({speed_up:.2f}x fp32)")
        for group, share in sorted(results[name]["shares"].items(), key=lambda item: -item[1]):
            print(f"  {group:26s} {share:6.1%}")
        others = ", ".join(
            f"{operator} {share:.1%}"
            for operator, share in results[name]["largest_other_operators"].items()
        )
        print(f"  other, largest: {others}")
    ConvBnAct.fp32_depthwise_training_on_cpu = True
    ConvBnAct.fold_eval_batch_norm = True
    setup = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
    }
    path = record_result(args.name, {"setup": setup, "results": results})
    print(f"recorded: {path}")


if __name__ == "__main__":
    main()
