"""Whole-split evaluation: every token scored once, a noise-free number to compare runs by.

The split is cut into non-overlapping windows of block_size inputs; window i predicts tokens
i*T+1 .. i*T+T from tokens i*T .. i*T+T-1, so every token but the first is a target exactly once
(the last window may be shorter). Ranks take every world_size-th batch and sum their losses.
A split stored as several files is scored file by file (windows do not cross files).
"""

import torch

from gptcraft.system import distributed, hardware


@torch.no_grad()
def full_val_loss(model, tokens, block_size, batch_size, device, dtype, d):
    """Mean cross-entropy over every target token of `tokens` (a 1-D array of token ids)."""
    T = block_size
    n_targets = len(tokens) - 1
    starts = list(range(0, n_targets, T))  # window i covers inputs [s, s+T), targets [s+1, s+T+1)
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    # The last window may be short: it goes alone, so every batch is a rectangle.
    if n_targets % T and len(batches[-1]) > 1:
        batches[-1:] = [batches[-1][:-1], batches[-1][-1:]]
    was_training = model.training
    model.eval()
    losses, sizes = [], []  # losses kept on the device: one host sync at the end
    for i, counted in distributed.even_share(len(batches), d):
        batch = batches[i]
        length = min(T, n_targets - batch[0]) if len(batch) == 1 else T
        window = torch.stack([torch.from_numpy(tokens[s : s + length + 1].astype("int64")) for s in batch])
        window = window.to(device)  # (B, length + 1)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        with hardware.autocast(device, dtype):
            _, loss = model(x, y)
        if counted:
            losses.append(loss.detach())
            sizes.append(y.numel())
    # Back from means to a sum.
    total = sum(loss * n for loss, n in zip(torch.stack(losses).tolist(), sizes, strict=True)) if losses else 0.0
    model.train(was_training)
    return distributed.all_mean(total, d) * d.world_size / n_targets


def full_split_loss(model, pieces, block_size, batch_size, device, dtype, d):
    """Mean cross-entropy over every target token of a split stored as several token arrays."""
    pieces = [p for p in pieces if len(p) > 1]  # a one-token file has nothing to predict
    targets = [len(p) - 1 for p in pieces]
    losses = [full_val_loss(model, p, block_size, batch_size, device, dtype, d) for p in pieces]
    return sum(loss * n for loss, n in zip(losses, targets, strict=True)) / sum(targets)
