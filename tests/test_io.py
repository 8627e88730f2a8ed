"""Atomic writes: the target is replaced whole or left as it was, with no temporary file left."""

import pytest

from dsparse.io import atomic_path, write_bytes_atomic, write_text_atomic


def test_writes_replace_the_target_whole(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_published_files_get_the_default_permissions(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    write_text_atomic(tmp_path / "shared.json", "{}")
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path):
    import errno

    from dsparse.io import DiskFullError, atomic_path

    with pytest.raises(DiskFullError, match=r"no space left .* writing .*out\.pt; nothing was written"):
        with atomic_path(tmp_path / "out.pt") as temporary:
            temporary.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """kill -9 during a write left a hidden `.NAME.*.tmp` forever; a live writer's stays."""
    import os
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    orphan = tmp_path / f".masks.pt.{host}.{dead.pid}.x1.tmp"
    live = tmp_path / f".masks.pt.{host}.{os.getpid()}.x2.tmp"
    other = tmp_path / f".other.pt.{host}.{dead.pid}.x3.tmp"
    for path in (orphan, live, other):
        path.write_bytes(b"partial")
    write_bytes_atomic(tmp_path / "masks.pt", b"whole")
    assert not orphan.exists() and live.exists() and other.exists()
    assert (tmp_path / "masks.pt").read_bytes() == b"whole"
