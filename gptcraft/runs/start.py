"""How a run starts in its out_dir: from scratch, by continuing the run there, or not at all.

init_from=auto (the default) continues the run whose checkpoint out_dir holds, when it is this
run: the same settings but those in MAY_CHANGE (max_iters, intervals, devices, ...). So the very
same command, run again after a preemption or a torchrun restart, carries on where it stopped. A
checkpoint of another run is never overwritten: auto, scratch and a GPT-2 name stop before any
work with one line naming the way out, unless overwrite=True replaces it.
"""

import os
from dataclasses import fields

from gptcraft.model import GPTConfig
from gptcraft.runs import checkpoint
from gptcraft.runs.lock import OutDirError

# Files a new run replaces under overwrite=True: everything a run writes but meta.json, rewritten at start.
RUN_FILES = (checkpoint.LATEST, checkpoint.BEST, "log.jsonl", "loss.png")
# The one table of settings a continued run may change: they alter neither the model's function nor
# which tokens each step sees. The model's own such settings are marked `free` in GPTConfig.
MAY_CHANGE = frozenset((
    *(f.name for f in fields(GPTConfig) if f.metadata.get("free")),
    "out_dir", "data_dir", "init_from", "overwrite", "max_iters", "lr_decay_iters", "warmdown_iters",
    "eval_interval", "log_interval", "eval_iters", "eval_only", "full_val", "always_save_checkpoint",
    "checkpoint_interval", "checkpoint_minutes", "backend", "device", "dtype", "compile", "fsdp",
    "activation_checkpointing", "max_nonfinite_steps", "wandb_log", "wandb_project", "wandb_run_name", "plot_loss",
    "hellaswag_batch_size",
))  # fmt: skip


def recorded_config(path):
    """The config a checkpoint file or directory was saved with ({} when it has none)."""
    state = checkpoint.load_sharded_state(path) if os.path.isdir(path) else checkpoint.load_checkpoint(path)
    return state.get("config") or {}


def differences(saved, config):
    """'key=saved (this run: value)' for each setting outside MAY_CHANGE where the two configs differ."""
    return [f"{k}={saved[k]!r} (this run: {v!r})" for k, v in config.items()
            if k not in MAY_CHANGE and k in saved and saved[k] != v]  # fmt: skip


def previous_run(out_dir, fsdp=False):
    """The checkpoint a run left in out_dir (the resume checkpoint, else best.pt), or None; fsdp:
    whether a ckpt.dcp directory may be read (see checkpoint.latest_path)."""
    found = checkpoint.latest_path(out_dir, fsdp)
    best = os.path.join(out_dir, checkpoint.BEST)
    return found or (best if os.path.exists(best) else None)


def way_out():
    return ("continue it with --init_from=resume, write to another --out_dir, or replace it with "
            "--overwrite=True (deletes its checkpoints and log.jsonl)")  # fmt: skip


def decide_start(config):
    """'resume' or 'new': how a run with `config` (TrainConfig as a dict) starts in its out_dir.
    Raises OutDirError, before anything is written, when it would overwrite another run."""
    out_dir, init_from = config["out_dir"], config["init_from"]
    checkpoint.check_sharded_names(out_dir)  # on every rank, before a collective save could meet it
    found = previous_run(out_dir, config["fsdp"])
    if init_from == "resume":
        if config["overwrite"]:
            raise OutDirError("overwrite=True starts a new run; it cannot go with init_from=resume")
        return "resume"
    if config["overwrite"]:
        return "new"
    if found is None:
        left = [n for n in (*RUN_FILES, checkpoint.SHARDED, checkpoint.SHARDED + ".old")
                if os.path.lexists(os.path.join(out_dir, n))]  # fmt: skip
        if left:
            raise OutDirError(f"out_dir {out_dir} holds {', '.join(left)} but no checkpoint of a run; a new run "
                              "replaces them only with --overwrite=True, or choose another --out_dir")  # fmt: skip
        return "new"
    if init_from != "auto":
        raise OutDirError(f"out_dir {out_dir} holds {os.path.basename(found)} of an earlier run and "
                          f"init_from={init_from} starts a new one: {way_out()}")  # fmt: skip
    saved = recorded_config(found)
    if not saved:
        raise OutDirError(f"{found} does not record its settings, so init_from=auto cannot tell whether it is this "
                          f"run: {way_out()}")  # fmt: skip
    diff = differences(saved, config)
    if diff:
        raise OutDirError(f"out_dir {out_dir} holds another run ({os.path.basename(found)}): "
                          f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}; {way_out()}")  # fmt: skip
    return "resume" if checkpoint.latest_path(out_dir, config["fsdp"]) else "new"


def clear_previous(out_dir):
    """Delete what an earlier run left (overwrite=True, rank 0, holding the lock)."""
    for name in RUN_FILES:
        checkpoint.remove_file(os.path.join(out_dir, name))
    checkpoint.remove_sharded(out_dir)
