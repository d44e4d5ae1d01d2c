"""The optimizer: AdamW for every parameter, or Muon for the hidden matrices and AdamW for the rest.

Every parameter group carries an "lr_scale": the trainer sets each group's lr to the scheduled
learning rate times that scale, so one schedule drives both optimizers (Muon's groups run at
muon_lr / learning_rate times the AdamW rate).
"""

import math

import torch

OPTIMIZERS = ("adamw", "muon")


class Optimizers:
    """Several optimizers that step as one, so that the trainer and GradScaler see a single object
    with param_groups, step, zero_grad and a state dict. Iterating yields the optimizers, which is
    how torch.distributed.checkpoint's get/set_optimizer_state_dict take several at once."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def __iter__(self):
        return iter(self.optimizers)

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"state holds {len(state['optimizers'])} optimizers, this run has {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def is_hidden_matrix(name, p):
    """Muon's parameters: the 2-D weights inside the transformer blocks. Embeddings and lm_head
    are lookups and a classifier rather than hidden linear maps; gains and biases are vectors."""
    return p.dim() == 2 and ".h." in f".{name}"


def adamw(named_params, cfg, device):
    """AdamW with weight decay on matrices only; fused kernels on CUDA and CPU (several times
    faster than the per-tensor loop on CPU)."""
    params = [p for _, p in named_params]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device.split(":")[0] in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def make_optimizer(model, cfg, device, world_size=1, rank=0):
    """cfg.optimizer 'adamw': one AdamW. 'muon': Muon (momentum, then the update orthogonalised by
    Newton-Schulz iterations) for the hidden matrices, AdamW for embeddings, lm_head, gains, biases.
    world_size, rank: the DDP ranks over which Muon shares its orthogonalizations."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return adamw(named, cfg, device)
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    muon = Muon(
        [{"params": hidden, "lr_scale": cfg.muon_lr / cfg.learning_rate}],
        lr=cfg.muon_lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
        # Native bf16 matmuls on GPUs; on a CPU bf16 is often emulated, tens of times slower than fp32.
        ns_dtype=torch.float32 if device.split(":")[0] == "cpu" else torch.bfloat16,
        world_size=world_size,
        rank=rank,
    )
    return Optimizers(muon, adamw([(n, p) for n, p in named if not is_hidden_matrix(n, p)], cfg, device))


class Muon(torch.optim.Muon):
    """torch.optim.Muon (its settings, state and state dict), with three changes for speed:
    - its Newton-Schulz iterations run in `ns_dtype`: torch's always run in bfloat16, which CPUs
      without native bf16 matmuls emulate (on AVX2-only CPUs a 512 x 512 bf16 matmul takes about
      85 times as long as in float32);
    - matrices of one shape are orthogonalized as one batch (batched matmuls: a few large kernels
      rather than a thousand small ones), and under DDP (world_size > 1, every rank holding the
      same reduced gradients) each rank takes its share of the batch and all-gathers the rest, as
      the modded-nanogpt speedrun does;
    - `step(skip=...)` masks the step on the device (the momentum kept, the weights untouched)
      when the 0-d bool tensor `skip` is True, so no one waits to read it on the host."""

    def __init__(self, params, ns_dtype=torch.bfloat16, world_size=1, rank=0, **kwargs):
        if kwargs.get("adjust_lr_fn") not in (None, "original"):
            raise ValueError(f"adjust_lr_fn={kwargs['adjust_lr_fn']!r}: only the original scaling is supported")
        super().__init__(params, **kwargs)
        self.ns_dtype, self.world_size, self.rank = ns_dtype, world_size, rank

    @torch.no_grad()
    def step(self, closure=None, skip=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for (rows, cols), params in by_shape.items():
                updates = self.orthogonalized(torch.stack([self.momentum(p, group, skip) for p in params]), group)
                decay = 1 - group["lr"] * group["weight_decay"]
                scale = -group["lr"] * math.sqrt(max(1, rows / cols))  # larger steps for tall matrices
                if skip is not None:
                    updates.masked_fill_(skip, 0)
                    decay = torch.where(skip, 1.0, decay)
                for p, update in zip(params, updates, strict=True):
                    p.mul_(decay)
                    p.add_(update, alpha=scale)
        return loss

    def momentum(self, p, group, skip):
        """Update p's momentum buffer (not on a skipped step) and return the update to orthogonalize."""
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
        if skip is None:
            buf.lerp_(p.grad, 1 - group["momentum"])
        else:
            buf.copy_(torch.where(skip, buf, buf.lerp(p.grad, 1 - group["momentum"])))
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def orthogonalized(self, updates, group):
        """Newton-Schulz of each matrix of `updates` (n, rows, cols); under DDP each rank computes
        a contiguous share of ceil(n / world_size) matrices (zeros pad the last) and gathers the rest."""
        args = group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
        if self.world_size == 1:
            return orthogonalize(updates, *args)
        n, share = len(updates), -(-len(updates) // self.world_size)
        padded = torch.cat([updates, updates.new_zeros(share * self.world_size - n, *updates.shape[1:])])
        mine = orthogonalize(padded[self.rank * share : (self.rank + 1) * share], *args)
        gathered = torch.empty_like(padded)
        torch.distributed.all_gather_into_tensor(gathered, mine.contiguous())
        return gathered[:n]


def orthogonalize(g, coefficients, steps, eps, dtype):
    """U V^T of g = U S V^T for a matrix g or each of a batch g (n, rows, cols), approximately (singular values end
    between about 0.5 and 1.5): a quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X,
    A = X X^T, from X = g / |g| (norm at most 1)."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # (rows <= cols): A = X X^T is the smaller Gram matrix
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(g.dtype)


def step(optimizer, skip):
    """Take the optimizer step, masked on the device when the 0-d bool tensor `skip` is True:
    fused AdamW through found_inf, Muon through its skip. Only an optimizer that can do neither
    (AdamW on a device without the fused kernel) reads the flag on the host, a sync."""
    if isinstance(optimizer, Optimizers):
        for opt in optimizer:
            step(opt, skip)
    elif isinstance(optimizer, Muon):
        optimizer.step(skip=skip)
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skip.float()  # the fused kernel skips when it is 1
        optimizer.step()
        del optimizer.found_inf
    elif not skip.item():
        optimizer.step()


def learning_rate(cfg, it):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters, or with
    warmdown_iters a constant rate and a linear decay to min_lr at max_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.warmdown_iters:
        left = (cfg.max_iters - it) / cfg.warmdown_iters  # 1 where the warmdown starts, 0 at the end
        return cfg.min_lr + min(1.0, left) * (cfg.learning_rate - cfg.min_lr)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def set_learning_rate(optimizer, lr):
    """Every parameter group at lr times its own lr_scale (Muon's matrices have their own peak)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
