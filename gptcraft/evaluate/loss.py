"""Losses over many batches, shared out across ranks: the one evaluation loop behind training's
loss estimate, `gptcraft eval`, the whole-split loss (`--full_val`) and HellaSwag.

`split_loss` scores every token of a split once. A split (one or several token files) is cut into
non-overlapping windows of block_size inputs; window i of a file predicts its tokens i*T+1 .. i*T+T
from tokens i*T .. i*T+T-1, so every token but a file's first is a target exactly once (a file's
last window may be shorter: padded, its padding ignored by the loss). Windows never cross files.
"""

import torch

from gptcraft.data.batches import to_device
from gptcraft.system import distributed, hardware


@torch.no_grad()
def sum_over_batches(model, n, score, device, dtype, d, width=1, check=None):
    """The sum of score(i) over i in range(n), each a tensor of `width` numbers computed by `model`
    in eval mode under the run's precision. Ranks take every world_size-th i and add up their
    parts (all_sum); every rank runs the same number of forward passes (FSDP's are collective),
    and a rank's extra pass is not counted. The parts stay on the device and are read once, at the end.
    check: called before each batch on every rank; it may raise to stop (the trainer's stop signal)."""
    was_training = model.training
    model.eval()
    parts = []
    try:
        with hardware.autocast(device, dtype):
            for i, counted in distributed.even_share(n, d):
                if check is not None:
                    check()
                part = score(i)
                if counted:
                    parts.append(part.detach().reshape(width))
    finally:
        model.train(was_training)
    local = torch.stack(parts).cpu().double().sum(0).tolist() if parts else [0.0] * width
    return distributed.all_sum(local, d)


def split_loss(model, pieces, block_size, batch_size, device, dtype, d, check=None):
    """Mean cross-entropy over every target token of a split stored as 1-D token arrays `pieces`.
    Every batch has the shape (batch_size, block_size), the last one padded with targets the loss
    ignores (-1): a compiled model sees one shape and never recompiles."""
    T = block_size
    # (piece, start) of each window: inputs [s, s+T), targets [s+1, s+T+1) of that piece.
    windows = [(p, s) for p in pieces for s in range(0, len(p) - 1, T)]
    n_targets = sum(len(p) - 1 for p in pieces if len(p) > 1)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]

    def batch_loss(i):
        x = torch.zeros((batch_size, T), dtype=torch.int64)
        y = torch.full((batch_size, T), -1, dtype=torch.int64)
        targets = 0  # counted here, on the host: reading them from y would wait for the device
        for row, (piece, s) in enumerate(batches[i]):
            window = torch.from_numpy(piece[s : s + T + 1].astype("int64"))  # T + 1 tokens, fewer at the end
            x[row, : len(window) - 1], y[row, : len(window) - 1] = window[:-1], window[1:]
            targets += len(window) - 1
        _, loss = model(to_device(x, device), to_device(y, device))  # the mean over the targets that are not -1
        return loss * targets  # back from the mean to a sum

    return sum_over_batches(model, len(batches), batch_loss, device, dtype, d, check=check)[0] / n_targets
