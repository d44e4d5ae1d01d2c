"""Whole-split evaluation: every token scored once, a noise-free number to compare runs by.

The split is cut into non-overlapping windows of block_size inputs; window i predicts tokens
i*T+1 .. i*T+T from tokens i*T .. i*T+T-1, so every token but the first is a target exactly once
(the last window may be shorter: padded, its padding ignored by the loss). Ranks take every
world_size-th batch and sum their losses.
A split stored as several files is scored file by file (windows do not cross files).
"""

import torch

from gptcraft.system import distributed, hardware


@torch.no_grad()
def full_val_loss(model, tokens, block_size, batch_size, device, dtype, d, check=None):
    """Mean cross-entropy over every target token of `tokens` (a 1-D array of token ids).
    Every batch has the shape (batch_size, block_size), the last one padded with targets the
    loss ignores (-1): a compiled model sees one shape and never recompiles. check: called
    before each batch on every rank; it may raise to stop the evaluation (the trainer's stop)."""
    T = block_size
    n_targets = len(tokens) - 1
    starts = list(range(0, n_targets, T))  # window i covers inputs [s, s+T), targets [s+1, s+T+1)
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    was_training = model.training
    model.eval()
    losses, sizes = [], []  # kept on the device: one host sync at the end
    for i, counted in distributed.even_share(len(batches), d):
        if check is not None:
            check()
        x = torch.zeros((batch_size, T), dtype=torch.int64)
        y = torch.full((batch_size, T), -1, dtype=torch.int64)
        for row, s in enumerate(batches[i]):
            window = torch.from_numpy(tokens[s : s + T + 1].astype("int64"))  # T + 1 tokens, fewer at the end
            x[row, : len(window) - 1], y[row, : len(window) - 1] = window[:-1], window[1:]
        x, y = x.to(device), y.to(device)
        with hardware.autocast(device, dtype):
            _, loss = model(x, y)  # the mean over the targets that are not -1
        if counted:
            losses.append(loss.detach())
            sizes.append(int((y >= 0).sum()))
    # Back from means to a sum.
    total = sum(loss * n for loss, n in zip(torch.stack(losses).tolist(), sizes, strict=True)) if losses else 0.0
    model.train(was_training)
    return distributed.all_mean(total, d) * d.world_size / n_targets


def full_split_loss(model, pieces, block_size, batch_size, device, dtype, d, check=None):
    """Mean cross-entropy over every target token of a split stored as several token arrays."""
    pieces = [p for p in pieces if len(p) > 1]  # a one-token file has nothing to predict
    targets = [len(p) - 1 for p in pieces]
    losses = [full_val_loss(model, p, block_size, batch_size, device, dtype, d, check) for p in pieces]
    return sum(loss * n for loss, n in zip(losses, targets, strict=True)) / sum(targets)
