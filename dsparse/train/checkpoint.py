"""Atomic DeepSpeed checkpoints: a checkpoint either exists whole or not at all.

Every rank writes its part (ZeRO partitions the optimizer state) into
``checkpoints/.partial/<tag>``; after a barrier rank 0 renames the directory to
``checkpoints/<tag>`` and then replaces the ``latest`` pointer (write-temp-then-rename).
A run killed mid-save leaves only ``.partial``, which the next save clears, and
``latest`` keeps pointing at the previous complete checkpoint. Assumes all ranks share
the run directory's filesystem (one node, or shared storage on a cluster).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from dsparse.distributed import barrier, is_main
from dsparse.io import write_text_atomic
from dsparse.runs.checkpoints import (
    FILE_LIST,
    LATEST,
    STATE_FILE,
    checkpoint_step,
    is_published,
    latest_checkpoint,
    read_checkpoint_file,
    sha256_of,
    tag_of,
)

log = logging.getLogger(__name__)

PARTIAL = ".partial"
CLIENT_KEY = "dsparse"  # our state lives under one key, apart from DeepSpeed's own entries


def save_checkpoint(engine, directory: Path, step: int, client_state: dict, keep: int,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Save model, optimizer, scheduler and ``client_state`` for ``step``; returns its path.

    Must be called on every rank. ``extra(path)`` runs on rank 0 before the checkpoint is
    published, to add files (e.g. the current masks) that must be atomic with it.
    """
    directory = Path(directory)
    partial, tag = directory / PARTIAL, tag_of(step)
    if is_main():
        shutil.rmtree(partial / tag, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(partial), tag=tag, client_state={CLIENT_KEY: client_state}, save_latest=False)
    barrier()
    final = directory / tag
    if is_main():
        (partial / tag / STATE_FILE).write_text(json.dumps(client_state, indent=1, default=str))
        if extra is not None:
            extra(partial / tag)
        write_file_list(partial / tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial / tag, final)
        write_text_atomic(directory / LATEST, tag)
        _prune(directory, keep)
    barrier()
    return final


def write_file_list(path: Path) -> None:
    """Record every file of a checkpoint with its size and SHA-256, written last and atomically,
    so a resume can tell a complete checkpoint from one that lost or damaged a file."""
    files = {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": sha256_of(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.name != FILE_LIST}
    write_text_atomic(path / FILE_LIST, json.dumps(files, indent=1))


def discard_checkpoint(directory: Path, step: int) -> Path | None:
    """Unpublish the checkpoint of ``step`` (rank 0): ``latest`` moves to the newest one
    before it, or is removed when none is left, and the checkpoint is set aside as
    ``step-N.nonfinite``. Returns the new latest checkpoint."""
    directory = Path(directory)
    tags = sorted(p.name for p in directory.glob("step-*") if is_published(p) and p.name < tag_of(step))
    if tags:
        write_text_atomic(directory / LATEST, tags[-1])
    else:
        (directory / LATEST).unlink(missing_ok=True)
    set_aside(directory / tag_of(step), "nonfinite")
    return directory / tags[-1] if tags else None


def set_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint out of the ``step-N`` namespace (kept for inspection, never
    resumed, pruned or restored): ``step-N.<why>``, numbered if that exists."""
    target, index = path.with_name(f"{path.name}.{why}"), 1
    while target.exists():
        index += 1
        target = path.with_name(f"{path.name}.{why}{index}")
    os.replace(path, target)
    return target


def _prune(directory: Path, keep: int) -> None:
    tags = sorted(p for p in directory.glob("step-*") if is_published(p))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def install_checkpoint(source: Path, directory: Path) -> Path | None:
    """Copy a published checkpoint (e.g. one restored from Ray storage) into ``directory``.

    Nothing changes unless ``source`` is newer than ``directory``'s latest checkpoint. The
    copy is staged under a unique name and renamed, and ``latest`` is replaced last, so
    nodes that share the directory may call this at the same time.

    Returns:
        The installed checkpoint path, or None if ``directory`` was already as new.
    """
    source, directory = Path(source), Path(directory)
    step = checkpoint_step(source)
    current = latest_checkpoint(directory)
    if current is not None and checkpoint_step(current) >= step:
        return None
    final = directory / tag_of(step)
    staging = directory / f".restore-{os.getpid()}-{os.urandom(4).hex()}"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, staging)
    try:
        os.replace(staging, final)
    except OSError:  # another node installed the same checkpoint first
        shutil.rmtree(staging, ignore_errors=True)
    write_text_atomic(directory / LATEST, final.name)
    return final


def load_checkpoint(engine, path: Path) -> dict:
    """Restore engine state from a checkpoint directory; returns its client state.

    DeepSpeed reads its files through ``engine.checkpoint_engine.load``, which unpickles
    anything; it is pointed at :func:`read_checkpoint_file` first, so a resume runs no code
    a checkpoint carries (a crafted file is refused naming it).
    """
    path = Path(path)
    engine.checkpoint_engine.load = read_checkpoint_file
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    if loaded is None or CLIENT_KEY not in client_state:
        raise ValueError(f"checkpoint {path} could not be loaded; it is incomplete or not written by dsparse")
    return client_state[CLIENT_KEY]
