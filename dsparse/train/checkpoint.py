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
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from dsparse.distributed import barrier, is_main
from dsparse.io import write_text_atomic

LATEST = "latest"
PARTIAL = ".partial"
STATE_FILE = "dsparse_state.json"
CLIENT_KEY = "dsparse"  # our state lives under one key, apart from DeepSpeed's own entries


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial / tag, final)
        write_text_atomic(directory / LATEST, tag)
        _prune(directory, keep)
    barrier()
    return final


def discard_checkpoint(directory: Path, step: int) -> Path | None:
    """Unpublish the checkpoint of ``step`` (rank 0): ``latest`` moves to the newest one
    before it, or is removed when none is left. Returns the new latest checkpoint."""
    directory = Path(directory)
    tags = sorted(p.name for p in directory.glob("step-*") if p.is_dir() and p.name < tag_of(step))
    if tags:
        write_text_atomic(directory / LATEST, tags[-1])
    else:
        (directory / LATEST).unlink(missing_ok=True)
    shutil.rmtree(directory / tag_of(step), ignore_errors=True)
    return directory / tags[-1] if tags else None


def _prune(directory: Path, keep: int) -> None:
    tags = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if path.is_dir() else None


def checkpoint_step(path: Path) -> int:
    """The training step a published checkpoint directory was written at."""
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])


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
    """Restore engine state from a checkpoint directory; returns its client state."""
    path = Path(path)
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    if loaded is None or CLIENT_KEY not in client_state:
        raise ValueError(f"checkpoint {path} could not be loaded; it is incomplete or not written by dsparse")
    return client_state[CLIENT_KEY]


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model state dict of a checkpoint, without DeepSpeed (for eval and export)."""
    path = Path(path)
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ValueError(f"{path} is not a dsparse checkpoint (no mp_rank_*_model_states.pt); "
                         "pass a run directory or one of its checkpoints/step-* directories")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return state["module"]


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory, its checkpoints directory, or a step directory."""
    path = Path(path)
    for candidate in (path / "checkpoints", path):
        if (candidate / LATEST).is_file():
            latest = latest_checkpoint(candidate)
            if latest is not None:
                return latest
    if any(path.glob("mp_rank_*_model_states.pt")):
        return path
    raise ValueError(f"no checkpoint found at {path}; pass a run directory (runs/NAME) or runs/NAME/checkpoints/step-N")
