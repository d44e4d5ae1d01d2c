"""Turn the pure GPT of model.py into what one training process runs: activation checkpointing,
torch.compile, then DDP (a full replica per rank) or FSDP2 (parameters, gradients and optimizer
state sharded across ranks). The model's parameter names never change, so checkpoints do not
depend on how a run was parallelized."""

import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from gptcraft.system.distributed import DistributedError


def parallelize(model, d, device, fsdp=False, activation_checkpointing=False, compile=False):
    """Apply, in this order, per-block activation checkpointing, compile and DDP or FSDP2 to `model`
    (already on `device`); returns the module to call in the training loop."""
    if fsdp and not d.enabled:
        raise DistributedError("fsdp=True shards across processes: launch with torchrun (--nproc_per_node=1 is fine)")
    blocks = model.transformer.h
    if activation_checkpointing:
        # Each block keeps only its input for backward and recomputes the rest: memory for compute.
        for block in blocks:
            block.forward = recomputed_in_backward(block.forward)
    if fsdp:
        if compile:
            for block in blocks:  # per block: FSDP's hooks between blocks would break one whole graph
                block.compile()
        mesh = init_device_mesh(device.split(":")[0], (d.world_size,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings (tied to lm_head) and the final LayerNorm
        return model
    if compile:
        model.compile()  # in place: parameter names stay those of model.py
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    return model


def recomputed_in_backward(forward):
    """`forward` run under torch.utils.checkpoint, which compile understands. Set on the block
    instance, so the module tree and parameter names stay those of model.py."""

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def grad_sync(model, sync):
    """Context for one micro-step's forward and backward: when `sync` is False, gradients only
    accumulate locally and are reduced across ranks on a later micro-step."""
    if isinstance(model, DDP) and not sync:
        return model.no_sync()  # DDP records the reduction during forward, so forward goes inside too
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(model, max_norm):
    """Clip gradients to `max_norm` (0: no clipping) and return their total norm before clipping,
    a plain scalar tensor even when FSDP shards the gradients."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm
