"""What a run does with its out_dir: one run at a time (a lock file), and how it starts there.

init_from=auto (the default) continues the run whose checkpoint out_dir holds, when it is this
run: the same settings but those in MAY_CHANGE (max_iters, intervals, devices, ...). So the very
same command, run again after a preemption or a torchrun restart, carries on where it stopped. A
checkpoint of another run is never overwritten: auto, scratch and a GPT-2 name stop before any
work with one line naming the way out, unless overwrite=True replaces it.

out_dir/.gptcraft-lock holds the owner's pid, host and scheduler job id (SLURM_JOB_ID or
torchrun's TORCHELASTIC_RUN_ID). A second run meets it with one line; a lock whose owner is dead
on this host, or was the same job before a requeue or restart on another host, is taken over.
"""

import json
import os
import socket
import time
from contextlib import contextmanager

import torch

from gptcraft import files
from gptcraft.errors import GptcraftError
from gptcraft.system import distributed
from gptcraft.train import checkpoint
from gptcraft.train.state import FREE_SETTINGS

LOCK = ".gptcraft-lock"
# Files a new run replaces under overwrite=True: everything a run writes but meta.json, rewritten at start.
RUN_FILES = (checkpoint.LATEST, checkpoint.BEST, "log.jsonl", "loss.png")
# Settings a continued run may change: they alter neither the model's function nor which tokens each step sees.
MAY_CHANGE = FREE_SETTINGS + (
    "out_dir", "data_dir", "init_from", "overwrite", "max_iters", "lr_decay_iters", "warmdown_iters",
    "eval_interval", "log_interval", "eval_iters", "eval_only", "full_val", "always_save_checkpoint",
    "checkpoint_interval", "checkpoint_minutes", "backend", "device", "dtype", "compile", "fsdp",
    "activation_checkpointing", "max_nonfinite_steps", "wandb_log", "wandb_project", "wandb_run_name", "plot_loss",
)  # fmt: skip


class OutDirError(GptcraftError):
    """out_dir is in use, not writable, or holds another run."""


def check_writable(out_dir):
    """Create out_dir and write a probe file there, so that a run that cannot save fails at once."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = files.temp_path(os.path.join(out_dir, "probe"))
        files.open_new(probe).close()
        os.remove(probe)
    except OSError as e:
        raise OutDirError(f"out_dir {out_dir} is not writable ({e.strerror}); choose another --out_dir") from None


def job_id():
    """The scheduler's name for this job, the same across its restarts, or None."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """Context manager holding out_dir/.gptcraft-lock while a run writes there (rank 0)."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, LOCK)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "job": job_id(), "since": time.time()}
        self.held = False

    def __enter__(self):
        for _ in range(3):  # a stale lock is removed, then taken like a free one
            try:
                with files.open_new(self.path, "w") as f:
                    json.dump(self.owner, f)
                self.held = True
                return self
            except FileExistsError:
                self._take_over_stale()
        raise OutDirError(f"could not take the lock {self.path}: other runs keep taking it")

    def _take_over_stale(self):
        try:
            with open(self.path) as f:
                other = json.load(f)
            pid, host, job = int(other["pid"]), str(other["host"]), other.get("job")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            raise OutDirError(f"{self.path} is damaged; if no run uses this out_dir, delete it") from None
        same_host = host == self.owner["host"]
        if (same_host and not pid_alive(pid)) or (not same_host and job is not None and job == self.owner["job"]):
            os.remove(self.path)
            return
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(other.get("since", 0)))
        hint = "" if same_host else f"; if that run is dead, delete {self.path}"
        raise OutDirError(f"out_dir {os.path.dirname(self.path)} is in use by another run (pid {pid} on {host}, "
                          f"since {started}): wait for it, or pass another --out_dir{hint}")  # fmt: skip

    def __exit__(self, *exc):
        if self.held:
            os.remove(self.path)
            self.held = False


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
    found = previous_run(out_dir, config["fsdp"])
    if init_from == "resume":
        if config["overwrite"]:
            raise OutDirError("overwrite=True starts a new run; it cannot go with init_from=resume")
        return "resume"
    if found is None or config["overwrite"]:
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


@contextmanager
def locked(out_dir, d):
    """Collective: rank 0 checks out_dir is writable and holds its lock while the body runs; a
    refusal there stops every rank."""
    lock, error = RunLock(out_dir), None
    if d.master:
        try:
            check_writable(out_dir)
            lock.__enter__()
        except OutDirError as e:
            error = e
    if distributed.any_rank(torch.tensor([error is not None]), d)[0]:
        raise error or OutDirError(f"out_dir {out_dir} cannot be used (rank 0 says why)")
    try:
        yield
    finally:
        lock.__exit__()
