"""Atomic DeepSpeed checkpoints: a checkpoint either exists whole or not at all.

Every rank writes its part (ZeRO partitions the optimizer state) into
``checkpoints/.partial/<tag>``; after a barrier rank 0 renames the directory to
``checkpoints/<tag>`` and then replaces the ``latest`` pointer (write-temp-then-rename).
A run killed mid-save leaves only ``.partial``, which the next save clears, and
``latest`` keeps pointing at the previous complete checkpoint. Assumes all ranks share
the run directory's filesystem (one node, or shared storage on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from dsparse.config import RunConfig, load_config
from dsparse.distributed import barrier, is_main
from dsparse.io import write_text_atomic

log = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL = ".partial"
STATE_FILE = "dsparse_state.json"
FILE_LIST = "files.json"  # every file of the checkpoint with size and SHA-256, written last
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
    files = {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.name != FILE_LIST}
    write_text_atomic(path / FILE_LIST, json.dumps(files, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why a published checkpoint cannot be used, or None if every listed file is intact.

    Checkpoints written before file lists existed are accepted unverified.
    """
    listing = Path(path) / FILE_LIST
    if not listing.is_file():
        return None if (Path(path) / STATE_FILE).is_file() else f"{STATE_FILE} is missing"
    try:
        files = json.loads(listing.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"its file list is unreadable ({error})"
    for name, expected in files.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_intact_checkpoint(directory: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint at or before ``latest`` that verifies, and why newer ones were skipped."""
    latest = latest_checkpoint(directory)
    if latest is None:
        return None, []
    skipped = []
    for candidate in sorted((p for p in Path(directory).glob("step-*") if _is_published(p) and p.name <= latest.name),
                            reverse=True):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, skipped
        skipped.append(f"{candidate.name}: {problem}")
    return None, skipped


def discard_checkpoint(directory: Path, step: int) -> Path | None:
    """Unpublish the checkpoint of ``step`` (rank 0): ``latest`` moves to the newest one
    before it, or is removed when none is left, and the checkpoint is set aside as
    ``step-N.nonfinite``. Returns the new latest checkpoint."""
    directory = Path(directory)
    tags = sorted(p.name for p in directory.glob("step-*") if _is_published(p) and p.name < tag_of(step))
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


def _is_published(path: Path) -> bool:
    return path.is_dir() and re.fullmatch(r"step-\d{8}", path.name) is not None


def published_checkpoints(directory: Path) -> list[Path]:
    """The ``step-N`` checkpoints of a directory, oldest first (set-aside ones excluded)."""
    return sorted(p for p in Path(directory).glob("step-*") if _is_published(p))


def _prune(directory: Path, keep: int) -> None:
    tags = sorted(p for p in directory.glob("step-*") if _is_published(p))
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


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors and plain values (code would run
    to read it), or cannot be read at all."""


def _deepspeed_record_types() -> list[type]:
    """The DeepSpeed classes its ZeRO partitions hold: plain records (a loss scale, the ZeRO
    stage, a parameter's offset and size in the flat buffer); building them runs no code of
    the file's choosing. Everything else in a checkpoint is tensors, numbers, strings and
    containers, which ``weights_only`` reads without an allow-list."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def read_checkpoint_file(path: str | Path, map_location=None):
    """``torch.load(weights_only=True)`` of one checkpoint file (never a full unpickle).

    Raises:
        UnsafeCheckpointError: in one line, naming the file and, for a crafted file, the
            callable it tried to reach (e.g. ``posix.system``).
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_record_types()):
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(error))
        what = f"it references {found.group(1)}" if found else "it holds pickled objects"
        raise UnsafeCheckpointError(
            f"refusing checkpoint file {path}: {what}, which is not a tensor or plain value; reading it would run "
            "code from the file. dsparse never unpickles checkpoints: use a run written by dsparse, from a source "
            "you trust") from None
    except (RuntimeError, EOFError, OSError) as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise UnsafeCheckpointError(f"checkpoint file {path} cannot be read ({type(error).__name__}: {reason}); "
                                    "it is damaged or not written by dsparse") from None


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model state dict of a checkpoint, without DeepSpeed (for eval, export, pruning,
    analysis): read by :func:`read_checkpoint_file`, so no code in the file runs."""
    path = Path(path)
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ValueError(f"{path} is not a dsparse checkpoint (no mp_rank_*_model_states.pt); "
                         "pass a run directory or one of its checkpoints/step-* directories")
    state = read_checkpoint_file(files[0])
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise UnsafeCheckpointError(f"checkpoint file {files[0]} holds no model weights ('module'); it is not "
                                    "written by dsparse")
    return state["module"]


def run_config_of(checkpoint: Path) -> RunConfig:
    """The resolved config saved beside a run's checkpoints."""
    for candidate in (checkpoint.parent.parent / "config.yaml", checkpoint / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    raise ValueError(f"cannot find the run's config.yaml next to checkpoint {checkpoint}")


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory, its checkpoints directory, or a step directory."""
    path = Path(path)
    for candidate in (path / "checkpoints", path):
        if (candidate / LATEST).is_file():
            intact, skipped = latest_intact_checkpoint(candidate)
            for reason in skipped:
                log.warning("skipping damaged checkpoint %s", reason)
            if intact is not None:
                return intact
            if skipped:
                raise ValueError(f"no intact checkpoint in {candidate} ({'; '.join(skipped)})")
    if any(path.glob("mp_rank_*_model_states.pt")):
        return path
    raise ValueError(f"no checkpoint found at {path}; pass a run directory (runs/NAME) or runs/NAME/checkpoints/step-N")
