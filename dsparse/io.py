"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file dsparse publishes (masks, shards, checkpoint pointers, summaries, sweep state)
goes through here: write a temporary file in the same directory, flush it to disk, then
``os.replace`` it over the target. A crash or an exception leaves the target untouched and
no temporary file behind; a kill leaves one, named with the host and pid of its writer,
which the next write of the same target removes once that pid is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DiskFullError", "atomic_path", "check_output_dir", "check_output_file", "load_tensor_file", "read_json",
           "write_bytes_atomic", "write_text_atomic"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(ValueError):
    """The disk (or quota) filled while writing a file; nothing was published."""


def _file_mode() -> int:
    """What ``open`` would create (0666 less the umask); mkstemp's 0600 would hide shared
    datasets and run files from other users and containers."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_HOST = socket.gethostname().replace("/", "_")


def _remove_orphans(directory: Path, owner: str) -> None:
    """Delete temporary files of this target left by writers on this host that died (a
    ``kill -9`` mid-write): their names carry the writer's pid. Live writers' files stay."""
    try:
        entries = [entry for entry in os.scandir(directory) if entry.name.startswith(owner)
                   and entry.name.endswith(".tmp")]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(owner):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is fsynced and renamed to
    ``path``, on an exception it is deleted. For writers that want a file name
    (``torch.save``, ``tarfile.open``). The parent directory is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f".{path.name}.{_HOST}."
    _remove_orphans(path.parent, owner)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{owner}{os.getpid()}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, _file_mode())
        os.replace(temporary, path)
    except BaseException as error:
        full = _out_of_space(error, path.parent)  # before the partial file is removed
        temporary.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"no space left on the device (or quota) writing {path}; nothing was written: free "
                                f"space there or write elsewhere") from error
        raise


def _out_of_space(error: BaseException, directory: Path) -> bool:
    """Whether a failed write failed for want of space: by its errno, or, for writers that
    lose it (torch.save reports a full disk as `unexpected pos`), by the space left."""
    if isinstance(error, OSError) and error.errno in _FULL:
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


def check_output_file(path: str | Path, overwrite: bool, option: str = "--out") -> Path:
    """Refuse, before any work, a file target that exists (unless ``overwrite``) or is a
    directory: nothing a user has is replaced without being asked.

    Raises:
        ValueError: in one line, naming the option, the path and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; name the file to write (e.g. {path / 'NAME'})")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ValueError(f"{option} {path} exists; pass --overwrite to replace it, or choose another {option}")
    return path


def check_output_dir(path: str | Path, overwrite: bool, option: str = "--out") -> Path:
    """Refuse, before any work, a directory target that is a file, or that holds files
    (unless ``overwrite``, which lets the writer replace the files it writes there)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; name a directory to write into")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{option} {path} is not empty; pass --overwrite to replace the files written there, or "
                         f"choose another {option}")
    return path


def load_tensor_file(path: str | Path, what: str, fix: str):
    """``torch.load(weights_only=True)`` of a file dsparse wrote (no pickled classes), on CPU.

    Raises:
        ValueError: in one line, naming ``what`` and ``path``, the first line of the
            reason, and ``fix`` (torch's own messages run over many lines).
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{what} {path} cannot be read ({type(error).__name__}: {reason}); {fix}") from error


def read_json(path: str | Path, what: str, error: type[ValueError] = ValueError):
    """Parsed JSON of ``path``; ``error`` (a ValueError) in one line naming ``what`` and the
    file when it is not valid JSON (json's own message gives line and column)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as reason:
        raise error(f"{what} {path} is not valid JSON ({reason})") from None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
