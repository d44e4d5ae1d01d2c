"""Checkpoint files in a run directory, written so that no crash can lose one.

out_dir/ckpt.pt     the latest state of the run, everything needed to resume it (one file)
out_dir/ckpt.dcp/   the same for FSDP runs: a torch.distributed.checkpoint directory, one shard
                    per rank, plus train_state.pt with everything that is not a sharded tensor
out_dir/best.pt     the model weights with the lowest validation loss so far, for sampling

A file is written to a temporary name in out_dir, flushed, fsynced and renamed over the old
one; a directory is written beside the old one and swapped in by two renames. A kill -9 at
any moment leaves a complete checkpoint behind. .pt files hold only tensors and plain values
and load with weights_only=True.

nanoGPT's out_dir/ckpt.pt loads too: the same parameter names (GPT-2's), in a dict of model,
optimizer, model_args, iter_num, best_val_loss and config, without our scaler, RNG and loader
state (is_nanogpt).
"""

import os
import pickle
import sys

import torch

from gptcraft import files
from gptcraft.errors import GptcraftError
from gptcraft.files import fsync_dir, swap_dir, write_atomic

LATEST = "ckpt.pt"
SHARDED = "ckpt.dcp"
BEST = "best.pt"
SHARDED_STATE = "train_state.pt"  # inside ckpt.dcp/: the non-sharded part of the state


class CheckpointError(GptcraftError, RuntimeError):
    """A checkpoint is missing, corrupt, not safe to load, or could not be written."""


def reason(e):
    """One line saying why `e` happened; torch.distributed.checkpoint wraps each rank's exception."""
    dcp = sys.modules.get("torch.distributed.checkpoint")  # not imported for this check alone
    if dcp is not None and isinstance(e, dcp.CheckpointException):  # failures: rank -> (exception, traceback)
        e = next(iter(e.failures.values()), (e,))[0]
    return (str(e).strip() or type(e).__name__).splitlines()[0]


# What a failed write raises: OSError, or from torch.save on a full disk a RuntimeError
# ("... unexpected pos ...", "... file write failed").
WRITE_ERRORS = (OSError, RuntimeError)


def save_checkpoint(path, state):
    """Write `state` atomically: `path` holds either its previous content or all of `state`."""
    try:
        write_atomic(path, lambda f: torch.save(state, f))
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except WRITE_ERRORS as e:
        raise CheckpointError(
            f"could not write {path} ({reason(e)}); the previous checkpoint is intact, free space and resume"
        ) from None


def is_nanogpt(state):
    """True for a resume checkpoint nanoGPT's train.py wrote: ours save the grad scaler beside the optimizer."""
    return "optimizer" in state and "scaler" not in state


def model_weights(weights):
    """A model state dict as model.py names it: without the `_orig_mod.` prefix that saving a
    torch.compile'd model adds (nanoGPT does), nor the (1, 1, T, T) causal-mask buffers
    `attn.bias` that nanoGPT keeps when PyTorch has no flash attention."""
    weights = {k.replace("_orig_mod.", ""): v for k, v in weights.items()}
    return {k: v for k, v in weights.items() if not (k.endswith(".attn.bias") and v.dim() == 4)}


def load_checkpoint(path, map_location="cpu"):
    """Read a .pt checkpoint with weights_only=True: tensors and plain values only. The tensors
    are memory-mapped from the file: N ranks resuming a big model do not hold N copies in memory."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train first or fix out_dir")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        refused = "holds objects that are not plain tensors or values, refused"
        raise CheckpointError(f"{path} {refused} ({reason(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({reason(e)}); use another checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state["model"] = model_weights(state["model"])
    return state


def sharded_dir(out_dir):
    """The complete sharded checkpoint in out_dir, or None: after a crash between the two renames
    of a save only the previous one, ckpt.dcp.old, is complete."""
    for name in (SHARDED, SHARDED + ".old"):
        path = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(path, SHARDED_STATE)):
            return path
    return None


def latest_path(out_dir, fsdp=False):
    """The checkpoint to resume from: ckpt.pt, or for an FSDP run a ckpt.dcp directory, whichever
    exists (a save removes the other kind), or None. A ckpt.dcp index is a pickle, which runs code
    when read: it is read only when the user asks for FSDP, never behind the back of a plain run."""
    path = os.path.join(out_dir, LATEST)
    if os.path.exists(path):
        return path
    sharded = sharded_dir(out_dir)
    if sharded is not None and not fsdp:
        raise CheckpointError(
            f"{out_dir} holds only the FSDP checkpoint {os.path.basename(sharded)}/, whose index is a pickle that "
            "can run code when read; resume it with --fsdp=True under torchrun, and only if you trust this folder"
        )
    return sharded


def sampling_path(out_dir):
    """The checkpoint to sample from: best.pt when there is one, else ckpt.pt."""
    best = os.path.join(out_dir, BEST)
    return best if os.path.exists(best) else os.path.join(out_dir, LATEST)


def is_sharded_file(name):
    """A name torch.distributed.checkpoint or save_sharded writes into ckpt.dcp/: what makes a
    folder without gptcraft's marker (saved before it had one) gptcraft's to replace."""
    return (
        name in (SHARDED_STATE, files.MARKER)
        or name.startswith((".metadata", files.TEMP_PREFIX))
        or (name.endswith(".distcp"))
    )


def check_sharded_names(out_dir):
    """Refuse, with one line, a link or another's folder where a sharded save would go or a run would
    delete one (ckpt.dcp, ckpt.dcp.tmp, ckpt.dcp.old): never followed, never deleted."""
    for name in (SHARDED, SHARDED + ".tmp", SHARDED + ".old"):
        files.check_own_dir(os.path.join(out_dir, name), is_sharded_file, SHARDED_WAY_OUT)


SHARDED_WAY_OUT = "move it out of the run folder, or choose another --out_dir"


def save_sharded(out_dir, tensors, state, master):
    """Collective: write `tensors` (a state dict of sharded tensors) with torch.distributed.checkpoint
    and `state` (plain values, written by rank 0) into a new directory, then swap it in."""
    import torch.distributed.checkpoint as dcp

    final = os.path.join(out_dir, SHARDED)
    tmp = final + ".tmp"
    try:
        if master:
            check_sharded_names(out_dir)
            files.remove_dir(tmp, is_sharded_file, SHARDED_WAY_OUT)  # left by a crash in an earlier save
            files.make_dir(tmp)
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        if master:
            save_checkpoint(os.path.join(tmp, SHARDED_STATE), state)  # written last: it marks the directory complete
            swap_dir(tmp, final, is_sharded_file, SHARDED_WAY_OUT)
            remove_file(os.path.join(out_dir, LATEST))
    except (*WRITE_ERRORS, dcp.CheckpointException) as e:
        raise CheckpointError(f"could not write {final} ({reason(e)}); the previous checkpoint is intact") from None


def load_sharded_state(path):
    return load_checkpoint(os.path.join(path, SHARDED_STATE))


def sharded_shapes(path):
    """{key: shape} of every tensor in a torch.distributed.checkpoint directory, read from its index."""
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.FileSystemReader(path).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({reason(e)}); use another checkpoint") from None
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}


def load_sharded(path, tensors):
    """Collective: fill the (sharded) tensors of the state dict `tensors` in place from `path`."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(path))
    except (OSError, dcp.CheckpointException) as e:
        raise CheckpointError(f"{path} could not be read ({reason(e)}); use another checkpoint") from None


def save_full(out_dir, state):
    """Write the resume checkpoint ckpt.pt, then remove a sharded one an earlier run left."""
    save_checkpoint(os.path.join(out_dir, LATEST), state)
    remove_sharded(out_dir)


def remove_sharded(out_dir):
    """Delete the sharded checkpoint directories in out_dir (gptcraft's only: never through a link)."""
    for name in (SHARDED, SHARDED + ".old"):
        path = os.path.join(out_dir, name)
        try:
            files.remove_dir(path, is_sharded_file, SHARDED_WAY_OUT)
        except OSError as e:
            raise CheckpointError(f"saved {LATEST} but could not remove {path} ({reason(e)})") from None


def remove_file(path):
    if os.path.lexists(path):
        os.remove(path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def clear_killed_saves(out_dir):
    """Delete the temporary files and folder that a killed save left behind (rank 0, holding the lock)."""
    files.remove_stale_temps(out_dir)
    files.remove_dir(os.path.join(out_dir, SHARDED + ".tmp"), is_sharded_file, SHARDED_WAY_OUT)


def shape_mismatch(expected, found):
    """Lines naming the keys whose shapes differ between two {key: shape} dicts, or are in only one."""
    lines = [f"missing from the checkpoint: {k}" for k in expected if k not in found]
    lines += [f"not in the model: {k}" for k in found if k not in expected]
    lines += [
        f"{k}: checkpoint {list(found[k])}, model {list(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    return lines
