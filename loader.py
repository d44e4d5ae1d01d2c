"""Random training windows from memory-mapped token files.

Batch number g is drawn from its own generator, seeded by (seed, stream, g): the
stream of batches is a pure function of the seed, so a resumed run continues with
exactly the batches an uninterrupted one would have seen, and ranks split the
global batches between them without talking to each other.
"""

import numpy as np
import torch

TRAIN_STREAM, VAL_STREAM = 0, 1


class WindowSampler:
    def __init__(self, arrays, block_size, batch_size, seed, stream, device="cpu"):
        """arrays: 1-D token arrays (memmaps); each window is block_size + 1 consecutive tokens."""
        starts = np.array([len(a) - block_size for a in arrays], dtype=np.int64)  # valid starts per array
        if starts.max(initial=0) <= 0:
            longest = max((len(a) for a in arrays), default=0)
            raise ValueError(f"block_size {block_size} needs more than {longest} tokens in one file; lower block_size")
        self.arrays = arrays
        self.offsets = np.concatenate(([0], np.cumsum(np.maximum(starts, 0))))  # windows before each array
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.device = device

    def batch(self, g):
        """The g-th batch: x, y of shape (batch_size, block_size), y shifted one token on."""
        rng = np.random.default_rng([self.seed, self.stream, g])
        flat = rng.integers(0, self.offsets[-1], size=self.batch_size)
        which = np.searchsorted(self.offsets, flat, side="right") - 1  # array holding each window
        T = self.block_size
        starts = flat - self.offsets[which]
        windows = np.stack([self.arrays[a][s : s + T + 1] for a, s in zip(which, starts, strict=True)])
        windows = torch.from_numpy(windows.astype(np.int64))  # (B, T+1)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.device.startswith("cuda"):
            # Pinned host memory lets the copy overlap with work already queued on the GPU.
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)
