"""Turn the pure GPT of model.py into what one training process runs: activation checkpointing,
torch.compile, then DDP (a full replica per rank) or FSDP2 (parameters, gradients and optimizer
state sharded across ranks). The model's parameter names never change, so checkpoints do not
depend on how a run was parallelized."""

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from gptcraft.system.distributed import DistributedError, is_dtensor, is_fsdp
from gptcraft.system.hardware import DTYPES


def parallelize(model, d, device, fsdp=False, activation_checkpointing=False, compile=False, dtype="float32"):
    """Apply, in this order, per-block activation checkpointing, compile and DDP or FSDP2 to `model`
    (already on `device`); returns the module to call in the training loop. dtype: the run's
    precision, in which FSDP all-gathers the parameters (gradients are reduced in float32)."""
    if fsdp and not d.enabled:
        raise DistributedError("fsdp=True shards across processes: launch with torchrun (--nproc_per_node=1 is fine)")
    blocks = model.transformer.h
    if activation_checkpointing:
        # Each block keeps only its input for backward and recomputes the rest: memory for compute.
        for block in blocks:
            block.forward = recomputed_in_backward(block.forward)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if compile:
            for block in blocks:  # per block: FSDP's hooks between blocks would break one whole graph
                block.compile()
            # And the head (final norm, lm_head, loss), not to run it eagerly: inductor can fuse the
            # float32 cast of the logits (B, T, V) into the loss. The embedding lookups stay eager.
            model.head = torch.compile(model.head)
        mesh = init_device_mesh(device.split(":")[0], (d.world_size,))
        # Gathered straight in the run's dtype: half the traffic, and autocast finds its matmul
        # inputs already cast (it still runs softmax, norms and the loss in float32).
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings (tied to lm_head), final LayerNorm
        return model
    if compile:
        model.compile()  # in place: parameter names stay those of model.py
    if d.enabled:
        # The model's buffers (rope and sinusoidal tables) are computed alike on every rank: no
        # broadcast of them before each forward. Gradients as views into DDP's reduction buckets:
        # no second copy of them (0.5 GB for GPT-2 124M in float32).
        device_ids = [d.local_rank] if device.startswith("cuda") else None
        model = DDP(model, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True)
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
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(model, max_norm):
    """Clip gradients to `max_norm` (0: no clipping, only the norm) and return their total norm
    before clipping, a plain scalar tensor even when FSDP shards the gradients."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    if is_dtensor(norm):
        norm = norm.full_tensor()
    return norm
