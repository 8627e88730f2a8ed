"""The read side of checkpoints: find, verify and read what a run saved, without DeepSpeed.

A published checkpoint is ``checkpoints/step-NNNNNNNN/`` with ``files.json`` (every file's
size and SHA-256, written last) and ``dsparse_state.json``; ``checkpoints/latest`` names the
newest. Evaluation, export, analysis, pruning from a trained run and resume all find and
verify checkpoints here; every file is read with ``torch.load(weights_only=True)``, so no
code a checkpoint carries ever runs. The write side (atomic save, pruning old ones,
quarantine) is ``dsparse.train.checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from pathlib import Path

import torch

from dsparse.config import RunConfig
from dsparse.runs.layout import RunLayout

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "dsparse_state.json"
FILE_LIST = "files.json"  # every file of the checkpoint with size and SHA-256, written last


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def sha256_of(path: Path) -> str:
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
        if sha256_of(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_intact_checkpoint(directory: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint at or before ``latest`` that verifies, and why newer ones were skipped."""
    latest = latest_checkpoint(directory)
    if latest is None:
        return None, []
    skipped = []
    for candidate in sorted((p for p in Path(directory).glob("step-*") if is_published(p) and p.name <= latest.name),
                            reverse=True):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, skipped
        skipped.append(f"{candidate.name}: {problem}")
    return None, skipped


def is_published(path: Path) -> bool:
    return path.is_dir() and re.fullmatch(r"step-\d{8}", path.name) is not None


def published_checkpoints(directory: Path) -> list[Path]:
    """The ``step-N`` checkpoints of a directory, oldest first (set-aside ones excluded)."""
    return sorted(p for p in Path(directory).glob("step-*") if is_published(p))


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if path.is_dir() else None


def checkpoint_step(path: Path) -> int:
    """The training step a published checkpoint directory was written at."""
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])


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
    """The resolved config saved beside a run's checkpoints (or inside a loose checkpoint)."""
    run = RunLayout.of_checkpoint(checkpoint)
    for layout in ([run] if run else []) + [RunLayout(checkpoint)]:
        if layout.config.is_file():
            return layout.read_config()
    raise ValueError(f"cannot find the run's config.yaml next to checkpoint {checkpoint}")


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory, its checkpoints directory, or a step directory."""
    path = Path(path)
    for candidate in (RunLayout(path).checkpoints, path):
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
