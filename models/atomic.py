"""Files that appear whole or not at all, and locks that let one process make a file others wait for.

A file is written under a temp name beside its final one (same folder, so the rename
cannot cross file systems), synced, and renamed over the final name: a reader sees the
old file or the complete new one, whatever kills the writer. A writer holds an flock on
its temp file until the rename, so the next writer of the same name can tell a dead
writer's leftover (unlocked: removed) from a live one's (locked: left alone).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
from pathlib import Path
from typing import Callable

try:  # absent on Windows: no locks there, and leftovers are only ignored
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def write_error(e: OSError, path) -> str:
    """One line for a failed write of path, saying when the disk or a size limit is the cause."""
    reason = e.strerror or str(e)
    if e.errno in FULL:
        reason += " (no space left on the disk, or a file size limit reached)"
    return f"cannot write {path}: {reason}"


def temp_glob(path: Path) -> str:
    return str(path.with_name(f".{glob.escape(path.name)}.*.tmp"))


@contextlib.contextmanager
def writing(path, mode: int = 0o644):
    """A binary file to write path's new content into; it replaces path when the block ends,
    and is removed if the block raises (a SIGKILL leaves it for the next writer to remove)."""
    path = Path(path)
    remove_dead_temps(path)
    fd, tmp = _locked_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp makes it private; a model file is not a secret
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # before close: closing releases the lock that protects tmp
        _sync_folder(path.parent)
    except BaseException:  # KeyboardInterrupt included: never leave a half file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _locked_temp(path: Path) -> tuple[int, str]:
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)
        # another writer's cleanup may have taken the name between mkstemp and flock
        if _same_file(tmp, fd):
            return fd, tmp
        os.close(fd)


def remove_dead_temps(path: Path) -> None:
    """Remove temp files of path that no live writer holds."""
    if fcntl is None:
        return
    for name in glob.glob(temp_glob(path)):
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(name, fd):  # not renamed over path since we opened it
                os.unlink(name)
        except OSError:
            pass  # locked: its writer is alive
        finally:
            os.close(fd)


def _same_file(name: str, fd: int) -> bool:
    try:
        st = os.stat(name)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _sync_folder(folder: Path) -> None:
    """The rename itself reaches the disk (a crash of the machine, not only of the process)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def lock(path, on_wait: Callable[[], None] | None = None):
    """Take an exclusive lock named after path (a hidden .lock file beside it), for making path once;
    on_wait is called when another process holds it, before waiting. Returns the lock file: closing it
    (the end of a with block) releases the lock."""
    path = Path(path)
    f = open(path.with_name(f".{path.name}.lock"), "a")
    if fcntl is not None:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(f, fcntl.LOCK_EX)
        except BaseException:
            f.close()
            raise
    return f
