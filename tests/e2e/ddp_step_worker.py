"""One trainer step under torchrun, for test_torchrun.py: ``python -m torch.distributed.run
--nproc_per_node 2 ddp_step_worker.py OUT MICRO``.

Every process takes its half of the same 16-sample batch (from :func:`batch`), splits it into
passes of at most MICRO, and writes its weights and the number of gradient all-reduces it made
to ``OUT/rank-N.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from cnnkit.config import TrainConfig
from cnnkit.runtime import DistributedContext, init_distributed, shutdown_distributed
from cnnkit.training.mixing import MixedBatch
from cnnkit.training.trainer import Trainer

SETTINGS = {"optimizer": "sgd", "learning_rate": 0.1, "weight_decay": 0.0}


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))


def batch() -> MixedBatch:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 1, 6, 6, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    return MixedBatch(inputs, labels, labels.roll(1), 0.7)


def trainer(micro: int | None, distributed: DistributedContext | None = None) -> Trainer:
    config = TrainConfig(batch_size=16, micro_batch_size=micro, channels_last=False, **SETTINGS)
    made = Trainer(network(), config, torch.device("cpu"), distributed=distributed, progress=False)
    made.optimizer = made._build_optimizer()
    return made


def main() -> None:
    out, micro = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    context = init_distributed(
        int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    )
    step = trainer(micro, context)
    reductions = []

    def counting_hook(state, bucket):
        reductions.append(1)
        return default_hooks.allreduce_hook(dist.group.WORLD, bucket)

    step.model.register_comm_hook(None, counting_hook)
    whole = batch()
    half = slice(8 * context.rank, 8 * context.rank + 8)
    step.train_step(
        MixedBatch(whole.inputs[half], whole.labels[half], whole.other_labels[half], 0.7)
    )
    weights = [p.detach().clone() for p in step.module.parameters()]
    torch.save({"weights": weights, "reductions": len(reductions)}, f"{out}/rank-{context.rank}.pt")
    dist.barrier()  # neither process leaves while the other still talks to it
    shutdown_distributed()
    # The Python comm hook's futures can outlive the interpreter's teardown, where gloo's
    # threads then abort the process now and then ("terminate called without an active
    # exception"; pytorch/pytorch#179291). The results are on disk: leave without teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
