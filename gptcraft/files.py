"""Files gptcraft writes into run and data folders: atomic writes, whole folders swapped in, hashes,
opens that never follow a link.

Every file is created fresh, never written through a symbolic link someone left in its place:
a whole file is written to a temporary file (opened with O_EXCL | O_NOFOLLOW) and renamed over
the target, which replaces a link rather than the file it points to; a file that is appended to
(log.jsonl) is opened with O_NOFOLLOW, and a link there is refused. Temporary files carry a name
only gptcraft makes, `.gptcraft-tmp-<name>-<pid>-<random>`, so that clearing the ones a killed
process left never touches a user's `results.tmp.csv`.
"""

import contextlib
import errno
import glob
import hashlib
import os
import secrets
import shutil

from gptcraft.errors import GptcraftError

TEMP_PREFIX = ".gptcraft-tmp-"


class LinkError(GptcraftError, OSError):
    """A symbolic link stands where gptcraft is to write a file."""


def temp_path(path):
    """A fresh temporary name beside `path`, `.gptcraft-tmp-<name>-<pid>-<random>`."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{TEMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}")


def _open_flags(flags, path):
    """os.open with O_NOFOLLOW, a link in the way refused with a LinkError."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinkError(
                f"{path} is a symbolic link; gptcraft does not write through links: remove it or choose another folder"
            ) from None
        raise


def open_new(path, mode="wb"):
    """Create `path`, which must not exist yet (not even as a link), and open it for writing."""
    return os.fdopen(_open_flags(os.O_WRONLY | os.O_CREAT | os.O_EXCL, path), mode)


def open_append(path, mode="a"):
    """Open `path` to append to it (created when missing); a symbolic link there is refused."""
    return os.fdopen(_open_flags(os.O_WRONLY | os.O_CREAT | os.O_APPEND, path), mode)


def open_lock_file(path):
    """Open (creating when missing) `path` for reading and writing as a raw descriptor, for a lock
    file held with flock; a symbolic link there is refused."""
    return _open_flags(os.O_RDWR | os.O_CREAT, path)


def fsync_dir(path):
    """Make renames inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, write):
    """Call write(file) on a fresh temporary file beside `path`, fsync it, then rename it into place,
    so `path` is either its old content or the complete new one, never half written."""
    tmp = temp_path(path)
    try:
        with open_new(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def remove_stale_temps(folder):
    """Delete the temporary files gptcraft processes left in `folder` (call it only while no other
    gptcraft process writes there, e.g. holding the run's lock); every other file stays."""
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(TEMP_PREFIX) + "*")):
        if not os.path.isdir(path) or os.path.islink(path):
            os.remove(path)


def swap_dir(new, final):
    """Put directory `new` in the place of `final` by two renames (final -> final.old, new -> final),
    then remove the old one. A crash between the renames leaves final.old complete. A link at
    `final` (data/owt -> /big/disk/owt) is followed: the folder it points to is replaced."""
    final = os.path.realpath(final)
    old = final + ".old"
    if os.path.exists(final):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    if os.path.exists(old):
        shutil.rmtree(old)


def carry_over(old, new, ours):
    """Give directory `new` what `old` holds besides the files named `ours(name)` (the user's own: an
    input.txt, notes), hard-linked where the file system allows: the swap then loses none of them,
    and a crash before it leaves `old` as it was."""
    if not os.path.isdir(old):
        return
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if ours(name) or os.path.lexists(dst):
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def staging_dir(final):
    """The directory beside `final` (beside the folder a link there points to) that its
    replacement is built in (see replaced_dir)."""
    return os.path.realpath(final) + ".tmp"


@contextlib.contextmanager
def replaced_dir(final, ours):
    """Yield a new, empty directory beside `final` to write into; when the block ends it replaces
    `final` as a whole (swap_dir) with the files that are not `ours(name)` carried over, and when
    the block fails it is removed and `final` is untouched."""
    new = staging_dir(final)
    if os.path.exists(new):
        shutil.rmtree(new)  # left by a killed preparation
    os.makedirs(new)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    carry_over(final, new, ours)
    swap_dir(new, final)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
