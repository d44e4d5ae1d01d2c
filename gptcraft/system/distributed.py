"""torch.distributed set-up for runs launched by torchrun; a single process otherwise."""

import datetime
import gc
import os
import sys
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptcraft.errors import GptcraftError
from gptcraft.files import open_new


class DistributedError(GptcraftError):
    """A launch that cannot work: a backend, GPU count or setting that does not fit the processes."""


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


def resolve_backend(backend, device):
    """'auto' is nccl on CUDA and gloo elsewhere; nccl needs CUDA devices."""
    if backend == "auto":
        return "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise DistributedError(
            f"backend nccl needs CUDA devices but the device is {device}; use --backend=gloo or auto"
        )
    return backend


def init(device, backend="auto", timeout_s=1800):
    """Join the process group torchrun describes in the environment; returns (Dist, device).
    Each rank on a CUDA node takes the GPU of its local rank; a single process takes the GPU it
    was given, so that capability checks and kernels look at that one, not at GPU 0.
    timeout_s: how long a collective may wait for the slowest rank (rank 0 writing a big checkpoint)."""
    if not launched_by_torchrun():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = resolve_backend(backend, device)
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; lower --nproc_per_node"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # torchrun's store outlives a restart of the workers, and with it the addresses the killed
    # ones published: each restart gets keys of its own, or a fast rank reads a dead peer's address.
    store, _, _ = next(dist.rendezvous("env://"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"gptcraft/restart_{restart}", store),
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
    return Dist(rank, local_rank, world), device


def local_accumulation(global_steps, d):
    """Micro-steps per optimizer step on this rank. gradient_accumulation_steps counts the micro-batches
    of one step over all ranks together (nanoGPT's convention), so a step sees the same batch whatever
    the number of processes; with fewer of them than processes, each process still does one, and the
    step holds world_size micro-batches."""
    if global_steps <= d.world_size:
        return 1
    if global_steps % d.world_size:
        raise DistributedError(
            f"gradient_accumulation_steps ({global_steps}) must be a multiple of the number of processes "
            f"({d.world_size}) to share it out; use {round(global_steps / d.world_size) * d.world_size}"
        )
    return global_steps // d.world_size


def even_share(n, d):
    """This rank's share of n items dealt round-robin, as (index, counted) pairs. Every rank gets
    the same number of pairs (FSDP runs each forward collectively): a rank past the end repeats
    an item with counted=False, and must drop its result."""
    rounds = -(-n // d.world_size)  # ceil
    return [(j % n, j < n) for j in range(d.rank, rounds * d.world_size, d.world_size)]


def _on_backend_device(t):
    """`t` where the backend reduces: on the GPU for nccl, on the CPU for gloo."""
    return t.cuda() if dist.get_backend() == "nccl" else t.cpu()


def all_sum(values, d):
    """Element-wise sum of a list of floats over all ranks (the values themselves in a single process)."""
    if not d.enabled:
        return list(values)
    t = _on_backend_device(torch.tensor(values, dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sum_on_device(values, d):
    """Element-wise sum of a 1-D tensor over all ranks, in float32, left where the backend reduces
    (on the GPU with nccl): nothing waits until it is read."""
    values = values.detach().to(torch.float32)
    if d.enabled:
        values = _on_backend_device(values)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flags, d):
    """Element-wise OR of a 1-D tensor of flags over all ranks, as a list of bools (a host sync)."""
    return [f > 0 for f in sum_on_device(flags, d).tolist()]


def any_rank_says(flag, d):
    """Whether `flag` (a bool) is True on any rank (a host sync)."""
    return any_rank(torch.tensor([flag]), d)[0]


def all_gather(obj, d):
    """Every rank's `obj`, in rank order."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def check_shared(path, d, what):
    """Collective. Stop with one line unless every rank sees the directory `path` as rank 0 does:
    rank 0 alone prepares datasets and writes checkpoints, so a multi-node run needs out_dir and
    data_dir on a filesystem all nodes share."""
    if not d.enabled:
        return
    marker = os.path.join(path, f".shared_check.{all_gather(uuid.uuid4().hex, d)[0]}")
    if d.master:
        open_new(marker).close()
    barrier(d)
    missing = [rank for rank, seen in enumerate(all_gather(os.path.exists(marker), d)) if not seen]
    barrier(d)
    if d.master:
        os.remove(marker)
    if missing:
        raise DistributedError(
            f"{what} {path} of rank 0 is not visible to rank(s) {', '.join(map(str, missing))}: every node needs "
            "it on a shared filesystem (NFS, Lustre), or a path where each node sees the same files"
        )


def barrier(d):
    if d.enabled:
        dist.barrier()


# FSDP2 and DTensor take most of a second to import, which runs that use neither should not pay:
# these checks never import them (nothing is an instance of a class no one has imported).
def is_fsdp(module):
    """Whether `module` was sharded by FSDP2's fully_shard."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_dtensor(tensor):
    """Whether `tensor` is a DTensor: one rank's shard of a tensor spread across ranks."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def shutdown():
    if dist.is_initialized():
        # FSDP's modules sit in reference cycles that hold collective state; freed only at exit,
        # after the group is gone, they abort the process ("terminate called ..."). Free them now.
        gc.collect()
        dist.destroy_process_group()
