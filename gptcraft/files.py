"""Every file and folder gptcraft writes or deletes goes through here: atomic writes, whole folders
swapped in, hashes, opens that never follow a link.

The rule: gptcraft creates, replaces and deletes only what it can prove is its own, and never
follows a link to do so. A file is created fresh, never written through a symbolic link someone
left in its place: a whole file is written to a temporary file (opened with O_EXCL | O_NOFOLLOW)
and renamed over the target, which replaces a link rather than the file it points to; a file
that is appended to (log.jsonl) is opened with O_NOFOLLOW, and a link there is refused.
Temporary files carry a name only gptcraft makes, `.gptcraft-tmp-<name>-<pid>-<random>`, so that
clearing the ones a killed process left never touches a user's `results.tmp.csv`. A folder built
whole (a dataset, an export, ckpt.dcp/) carries a marker file, `.gptcraft-folder`: only a folder
that holds it (or nothing at all) is replaced or deleted, with its permissions kept; anything
else is refused with one line naming the folder and the way out.
"""

import contextlib
import errno
import glob
import hashlib
import os
import secrets
import shutil
import stat

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


class FolderError(GptcraftError, OSError):
    """A folder gptcraft would replace or delete is not provably its own; the message says the way out."""


# Written into every folder gptcraft builds whole (a dataset, a Hugging Face export, ckpt.dcp/):
# only a folder that holds it, or nothing at all, is ever replaced or deleted.
MARKER = ".gptcraft-folder"
MARKER_TEXT = b"gptcraft made this folder and may replace it as a whole; it keeps files it did not write\n"


def make_dir(path):
    """Create the directory `path` with gptcraft's marker in it. It may exist as an empty folder (a
    torch.distributed.checkpoint rank makes it as it starts a save), never as a link or a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # the folders the user named above it
    try:
        os.mkdir(path)
    except FileExistsError:
        if os.path.islink(path) or not os.path.isdir(path):
            raise
    write_atomic(os.path.join(path, MARKER), lambda f: f.write(MARKER_TEXT))


def is_own_dir(path, names=None):
    """True for a real directory (not a link) that gptcraft made: it holds the marker, or every name
    in it is one that `names(name)` says gptcraft writes there (an empty folder holds nothing else)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    return MARKER in entries or all(names is not None and names(n) for n in entries)


def check_own_dir(path, names=None, way_out="move it away or choose another folder"):
    """Refuse, with one line naming `path` and `way_out`, a link, a file or a folder of others' files
    where gptcraft would put or replace a folder of its own; a missing path is fine."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        raise LinkError(f"{path} is a symbolic link; gptcraft does not replace or delete through links: {way_out}")
    if not os.path.isdir(path):
        raise FolderError(f"{path} is a file, not a folder gptcraft made: {way_out}")
    if not is_own_dir(path, names):
        others = sorted(os.listdir(path))
        listed = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise FolderError(f"{path} holds files gptcraft did not write ({listed}); it is left as it is: {way_out}")


def remove_dir(path, names=None, way_out="move it away or choose another folder"):
    """Delete the directory `path` if gptcraft made it (check_own_dir refuses anything else)."""
    check_own_dir(path, names, way_out)
    if os.path.lexists(path):
        shutil.rmtree(path)  # removes links inside it, never what they point to


def restore_interrupted(final, names=None, way_out="move it away or choose another folder"):
    """After a crash between the two renames of swap_dir only `final`.old exists: rename it back."""
    old = final + ".old"
    if not os.path.lexists(final) and os.path.lexists(old):
        check_own_dir(old, names, way_out)
        os.replace(old, final)


def swap_dir(new, final, names=None, way_out="move it away or choose another folder"):
    """Put directory `new` in the place of `final` by two renames (final -> final.old, new -> final),
    then remove the old one, with `final`'s permissions kept. `final` and `final`.old must be
    gptcraft's own (check_own_dir); a crash between the renames leaves final.old complete, and the
    next swap renames it back first. Links are never followed: one at `final` is refused."""
    old = final + ".old"
    restore_interrupted(final, names, way_out)
    check_own_dir(final, names, way_out)
    remove_dir(old, names, way_out)  # the replaced folder of a swap that stopped before its last step
    if os.path.exists(final):
        os.chmod(new, stat.S_IMODE(os.stat(final).st_mode))
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    remove_dir(old, names, way_out)


def carry_over(old, new, ours):
    """Give directory `new` what `old` holds besides the files named `ours(name)` (the user's own: an
    input.txt, notes), hard-linked where the file system allows: the swap then loses none of them,
    and a crash before it leaves `old` as it was."""
    if not os.path.isdir(old):
        return
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if ours(name) or name == MARKER or os.path.lexists(dst):
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dst, follow_symlinks=False)


def replaceable_dir(final, way_out):
    """The real path of the folder `final` names (a link the user named is followed: data/owt ->
    /big/disk/owt), after checking that gptcraft may build a folder beside it and swap it in: `final`
    is missing, empty or gptcraft's, not read-only, not the current folder; `final`.tmp and .old are
    gptcraft's. An interrupted swap is undone first. FolderError (one line) otherwise."""
    path = os.path.realpath(final)
    here = os.path.realpath(os.getcwd())
    if here == path or here.startswith(path + os.sep):
        raise FolderError(f"{final} is the current folder or holds it; run from another folder: {way_out}")
    restore_interrupted(path, way_out=way_out)
    for p in (path, path + ".tmp", path + ".old"):
        check_own_dir(p, way_out=way_out)
    if os.path.isdir(path) and not os.stat(path).st_mode & stat.S_IWUSR:
        raise FolderError(f"{final} is read-only; make it writable or {way_out}")
    return path


def staging_dir(final):
    """The directory beside `final` that its replacement is built in (see replaced_dir)."""
    return final + ".tmp"


@contextlib.contextmanager
def replaced_dir(final, ours, way_out="choose another --out_dir"):
    """Yield a new, empty directory beside `final` to write into; when the block ends it replaces
    `final` as a whole (swap_dir) with the files that are not `ours(name)` carried over, and when
    the block fails it is removed and `final` is untouched. Refused before anything is written
    unless `final` is gptcraft's to replace (replaceable_dir)."""
    final = replaceable_dir(final, way_out)
    new = staging_dir(final)
    remove_dir(new, way_out=way_out)  # left by a killed preparation
    make_dir(new)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    carry_over(final, new, ours)
    swap_dir(new, final, way_out=way_out)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
