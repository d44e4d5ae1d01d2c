"""Checkpoints: plain tensors and Python values, written atomically, read with weights_only=True."""

import os
import pickle

import torch

from tokens import write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or not safe to load."""


def save_checkpoint(path, state):
    """Write `state` to a temporary file, fsync it and rename it over `path`: a crash at any moment
    leaves either the previous checkpoint or the new one, never a torn file."""
    write_atomic(path, lambda f: torch.save(state, f))
    # Make the rename itself durable.
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train first or fix out_dir")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} holds objects that are not plain tensors or values, refused ({first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({first}); use another checkpoint") from None
