"""One run at a time in an out_dir: the lock file out_dir/.gptcraft-lock.

It holds the owner's pid, host and scheduler job id (SLURM_JOB_ID or torchrun's
TORCHELASTIC_RUN_ID). A second run meets it with one line; a lock whose owner is dead on this
host, or was the same job before a requeue or restart on another host, is taken over.
"""

import json
import os
import socket
import time
from contextlib import contextmanager

from gptcraft import files
from gptcraft.errors import GptcraftError
from gptcraft.system import distributed

LOCK = ".gptcraft-lock"


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
    if distributed.any_rank_says(error is not None, d):
        raise error or OutDirError(f"out_dir {out_dir} cannot be used (rank 0 says why)")
    try:
        yield
    finally:
        lock.__exit__()
