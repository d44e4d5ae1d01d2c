"""Random training windows from a dataset's token files (shards or legacy .bin files).

Batch number g is drawn from its own generator, seeded by (seed, stream, g): the
stream of batches is a pure function of the seed and the data, so a resumed run continues
with exactly the batches an uninterrupted one would have seen, and ranks split the global
batches between them without talking to each other. state() names that stream (dataset
fingerprint, seed, shapes, the next batch) for the checkpoint; check_state() refuses to continue
another.

Each batch maps the files it reads afresh and drops the maps afterwards: pages read through
a long-lived memmap count as the process's resident memory, which would then grow towards
the size of the dataset.
"""

import numpy as np
import torch

from gptcraft.errors import GptcraftError

# The eval's train-split batches have a stream of their own: drawn from the training stream,
# they would be the batches the first steps trained on, and the estimate biased low.
TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = 0, 1, 2


class LoaderStateError(GptcraftError, ValueError):
    """A checkpoint's loader state does not match the data or settings of this run."""


class WindowError(GptcraftError, ValueError):
    """The data holds no window of block_size + 1 tokens."""


def to_device(t, device):
    """Host tensor `t` on `device`; to a GPU from pinned memory with non_blocking=True, so that the
    copy overlaps with work already queued there and the host does not wait for it."""
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class WindowSampler:
    def __init__(self, files, block_size, batch_size, seed, stream, device="cpu", fingerprint=None):
        """files: TokenFiles; each window is block_size + 1 consecutive tokens of one file."""
        starts = np.array([f.count - block_size for f in files], dtype=np.int64)  # valid starts per file
        if starts.max(initial=0) <= 0:
            longest = max(files, key=lambda f: f.count)
            raise WindowError(
                f"block_size {block_size} needs more than {block_size} tokens in one file, but the longest, "
                f"{longest.path}, holds {longest.count}; lower block_size"
            )
        self.files = files
        self.offsets = np.concatenate(([0], np.cumsum(np.maximum(starts, 0))))  # windows before each file
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.device = device
        self.fingerprint = fingerprint

    def windows(self, g):
        """The g-th batch as an int64 array (batch_size, block_size + 1)."""
        rng = np.random.default_rng([self.seed, self.stream, g])
        flat = rng.integers(0, self.offsets[-1], size=self.batch_size)
        which = np.searchsorted(self.offsets, flat, side="right") - 1  # file holding each window
        starts = flat - self.offsets[which]
        out = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        for a in np.unique(which):
            tokens = self.files[a].memmap()
            for i in np.flatnonzero(which == a):
                out[i] = tokens[starts[i] : starts[i] + self.block_size + 1]
            del tokens  # unmap now: see the module docstring
        return out

    def batch(self, g):
        """The g-th batch: x, y of shape (batch_size, block_size), y shifted one token on."""
        windows = torch.from_numpy(self.windows(g))  # (B, T+1)
        if self.device.startswith("cuda"):
            # One copy of the windows in int32 (half the bytes), cut into x and y on the device.
            windows = to_device(windows.to(torch.int32), self.device).long()
            return windows[:, :-1], windows[:, 1:]
        return windows[:, :-1].contiguous().to(self.device), windows[:, 1:].contiguous().to(self.device)

    def state(self, next_batch):
        """What a checkpoint records so that a resumed run draws the same batches from batch next_batch on."""
        return {
            "dataset": self.fingerprint,
            "seed": self.seed,
            "stream": self.stream,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "next_batch": next_batch,
        }

    def check_state(self, state):
        """Refuse to resume a batch stream other than the one the checkpoint was drawing; return the
        number of the batch it was to draw next."""
        if not state:
            raise LoaderStateError("the checkpoint records no loader state; start a new run (init_from=scratch)")
        if state["dataset"] != self.fingerprint:
            raise LoaderStateError(
                "the checkpoint was trained on other data: the dataset's token files differ from those it "
                "recorded; resume with the same dataset, or start a new run (init_from=scratch)"
            )
        mine = self.state(state["next_batch"])
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in ("seed", "batch_size", "block_size") if state[k] != mine[k]]
        if changed:
            raise LoaderStateError(
                f"resuming would draw other batches than the interrupted run ({', '.join(changed)}); "
                "keep seed and batch_size as they were"
            )
        return state["next_batch"]
