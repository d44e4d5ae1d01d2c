"""One run at a time in an out_dir: the lock file out_dir/.gptcraft-lock.

Rank 0 holds an flock on the lock file for the run's life and writes its owner there: pid, host,
the kernel's boot id, and the scheduler's job id (SLURM_JOB_ID or torchrun's TORCHELASTIC_RUN_ID).
The kernel drops an flock when its holder dies, however it dies and whatever pid namespace
(container) it ran in: on one machine a free flock proves the owner dead, a pid cannot (pid 1 is
alive in every container). Whoever gets the flock owns the lock, so two runs that find one stale
lock at once never both take it. A lock written on another machine (another boot id and host) is
taken over only by the same job, after a requeue or a torchrun restart; every refusal says how to
clear the lock by hand.
"""

import errno
import fcntl
import json
import os
import socket
import stat
import time
from contextlib import contextmanager

from gptcraft import files
from gptcraft.errors import GptcraftError
from gptcraft.system import distributed

LOCK = ".gptcraft-lock"
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # the same in every container of one running kernel


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


def boot_id():
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return None


def _flock(fd):
    """Try to take the flock: True when taken, False when a live process holds it, None where the
    filesystem has no flock (then the owner's record alone is judged, see _stale)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _is_current(fd, path):
    """Whether `fd` is still the file at `path`: a releasing owner unlinks it, and the flock we got
    on the unlinked file must not count."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _alive_here(owner):
    """Without flock: whether the owner's pid runs on this kernel, in our pid namespace."""
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return owner["boot"] == boot_id()


class RunLock:
    """Context manager holding out_dir/.gptcraft-lock while a run writes there (rank 0)."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, LOCK)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "boot": boot_id(), "job": job_id(),
                      "since": time.time()}  # fmt: skip
        self.fd = None

    def __enter__(self):
        for _ in range(3):  # the file was released (unlinked) under us: open the new one
            try:
                fd = files.open_lock_file(self.path)
            except OSError as e:
                raise OutDirError(f"cannot open the lock {self.path} ({e.strerror or e}){self._by_hand()}") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OutDirError(f"the lock {self.path} is not a regular file{self._by_hand()}")
                got = _flock(fd)
                if got is False:
                    raise self._refusal(self._read(fd))
                if _is_current(fd, self.path):
                    self._take(fd, got)
                    self.fd, fd = fd, None
                    return self
            finally:
                if fd is not None:
                    os.close(fd)
        raise OutDirError(f"could not take the lock {self.path}: other runs keep taking it")

    def _by_hand(self):
        return f"; if no run uses out_dir {os.path.dirname(self.path)}, delete {self.path}"

    def _read(self, fd):
        """The owner's record, or None when empty (an owner between creating the file and writing)."""
        raw = os.pread(fd, 4096, 0)
        if not raw:
            return None
        try:
            other = json.loads(raw)
            pid, host, boot, job = other["pid"], other["host"], other.get("boot"), other.get("job")
            text_or_none = (str, type(None))
            ok = (type(pid) is int and 0 < pid < 2**31 and isinstance(host, str) and isinstance(boot, text_or_none)
                  and isinstance(job, text_or_none) and isinstance(other.get("since", 0), (int, float)))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise OutDirError(f"the lock {self.path} is damaged{self._by_hand()}")
        return {"pid": pid, "host": host, "boot": boot, "job": job, "since": other.get("since", 0)}

    def _take(self, fd, flocked):
        """We hold the flock (or the filesystem has none): take the lock unless its record names a
        live owner, or one on another machine that is not this same job."""
        other = self._read(fd)
        if other is not None and not self._stale(other, flocked):
            raise self._refusal(other)
        record = json.dumps(self.owner).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)

    def _stale(self, other, flocked):
        same_machine = other["boot"] == self.owner["boot"] or other["host"] == self.owner["host"]
        if same_machine:  # same kernel, or the same host rebooted since
            return flocked or other["boot"] != self.owner["boot"] or not _alive_here(other)
        return other["job"] is not None and other["job"] == self.owner["job"]  # a requeued or restarted job

    def _refusal(self, other):
        if other is None:
            who = "another run, just starting"
        else:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(other["since"]))
            who = f"another run (pid {other['pid']} on {other['host']}, since {started})"
        return OutDirError(f"out_dir {os.path.dirname(self.path)} is in use by {who}: wait for it, "
                           f"or pass another --out_dir; if that run is dead, delete {self.path}")  # fmt: skip

    def __exit__(self, *exc):
        if self.fd is not None:
            if _is_current(self.fd, self.path):  # unlinked while we hold the flock, then released
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None


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
