"""Marking a temporary file or folder as in use, so that a crash cannot leave the mark behind.

The process using it holds an exclusive ``flock`` on the file or folder itself for as long as it uses
it; the kernel drops the lock when the process exits, however it exits (``kill -9`` included), so what
a dead process left is collectable at once. A collector takes the same lock without waiting and leaves
alone whatever it cannot lock. The lock must be taken when the thing is created, before a collector
can see it: the artifact store creates and locks under its shared guard, and collects under the
exclusive one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def hold(path: Path) -> int:
    """Lock ``path`` (a file or a folder) for this process; returns the descriptor to close when done.

    Raises ``BlockingIOError`` when another process holds it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[bool]:
    """``True`` while this process holds ``path``'s lock, ``False`` when another process holds it (or this
    one may not open it, and so cannot tell).

    Only regular files and folders carry locks; anything else (a link, a FIFO) is never held.
    """
    try:
        fd = hold(path)
    except (BlockingIOError, PermissionError):
        yield False
        return
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP):
            raise
        yield True
        return
    try:
        yield True
    finally:
        os.close(fd)


def is_held(path: Path) -> bool:
    """Whether a running process holds ``path`` (a vanished path is held by nobody)."""
    try:
        with claimed(path) as ours:
            return not ours
    except FileNotFoundError:
        return False


def remove_unless_held(path: Path) -> bool:
    """Remove ``path`` (a folder with all it holds) unless a running process holds it; ``True`` when it
    is gone. Links are removed, never followed."""
    try:
        with claimed(path) as ours:
            if not ours:
                return False
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
    except FileNotFoundError:
        pass
    return True


@contextlib.contextmanager
def held_folder(where: Path, prefix: str, guard: contextlib.AbstractContextManager[None]) -> Iterator[Path]:
    """A new folder in ``where``, held (:func:`hold`) for as long as the block runs and removed after it. It is
    created and locked inside ``guard`` (the store's shared guard), so a collector holding the exclusive guard never
    sees it unlocked."""
    with guard:
        path = Path(tempfile.mkdtemp(dir=where, prefix=prefix))
        fd = hold(path)
    try:
        yield path
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
