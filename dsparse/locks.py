"""Directory locks: one writer at a time, named when refused, dropped when its holder dies.

A lock is an exclusive ``flock`` on ``DIR/.lock`` that holds one line naming its holder
(pid, host, since when). The kernel drops it when the holder exits, however it exits, so a
``kill -9`` never leaves a directory locked; the next holder says whom it took over from.
Run directories (``dsparse.train.rundir``) and dataset directories being written
(``dsparse.data.writer``) are locked this way.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
from pathlib import Path

__all__ = ["LOCK_FILE", "acquire_lock", "holding_lock", "release_lock"]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"

_HELD: set[int] = set()  # lock descriptors of this process, closed in forked children


def _close_in_child() -> None:
    """A forked child (a DataLoader or writer worker) must not keep a directory locked after
    its parent dies, so it closes its copies of the lock descriptors."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def acquire_lock(path: Path, what: str = "run directory",
                 fix: str = "wait for that run to finish, or choose another output_dir "
                            "(e.g. --set output_dir=runs/NEW)") -> int | None:
    """Hold ``path/.lock`` exclusively; raise ValueError naming ``what``, the holder and
    ``fix`` if another process holds it.

    Returns None (with a warning) on a filesystem without ``flock`` support.
    """
    lock = Path(path) / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(f"{what} {path} is in use by {holder}; {fix}") from None
    except OSError as error:  # e.g. ENOLCK on a network filesystem without flock
        os.close(fd)
        log.warning("cannot lock %s (%s); continuing without a lock: do not start a second writer there", lock,
                    error.strerror or error)
        return None
    _HELD.add(fd)
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
        log.warning("%s %s was last held by %s, which ended without releasing it (crashed or killed); taking it "
                    "over", what, path, previous)
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    me = f"pid {os.getpid()} on host {socket.gethostname()} (since {since})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    return fd


def release_lock(fd: int | None) -> None:
    """Clear the holder line and drop a lock this process holds (a no-op otherwise)."""
    if fd is None or fd not in _HELD:
        return
    _HELD.discard(fd)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor drops the flock


@contextlib.contextmanager
def holding_lock(path: Path, what: str, fix: str, *, remove_when_done: bool = False):
    """``acquire_lock`` for the body of a ``with``, released however it ends. With
    ``remove_when_done`` the lock file goes too when the body succeeds (a finished dataset
    carries none; a later writer finds the manifest instead)."""
    fd = acquire_lock(path, what, fix)
    try:
        yield fd
        if remove_when_done and fd is not None:
            (Path(path) / LOCK_FILE).unlink(missing_ok=True)
    finally:
        release_lock(fd)
