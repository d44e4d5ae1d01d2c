"""torch.distributed set-up for runs launched by torchrun; a single process otherwise."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self):
        return self.world_size > 1 or dist.is_initialized()

    @property
    def master(self):
        return self.rank == 0


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device, backend="auto"):
    """Join the process group torchrun describes in the environment; returns (Dist, device).
    Each rank on a CUDA node takes the GPU of its local rank."""
    if not launched_by_torchrun():
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(rank, local_rank, world), device


def all_mean(value, d):
    """Mean of a float over all ranks (the value itself in a single process)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() / d.world_size


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
