"""The run directory's contract: one owner at a time, an identity, and what resume may change.

Why: a run directory is the unit users resume, evaluate and compare. Two runs writing
into one directory, a resume that silently ignores (or half-applies) a changed setting,
or a copied directory that keeps logging into the original's MLflow run all damage
results without an error. So:

* **One owner.** The training process on rank 0 holds an exclusive ``flock`` on
  ``<run>/.lock`` for the run's life. The kernel drops it when the process dies, so a
  crash never leaves the directory locked; the lock file names the holder (pid, host),
  and a second run into the directory fails at once naming it.
* **Identity.** ``run.json`` records a run id and the directory's absolute path. A
  resume from another path is a copy: it gets its own MLflow run.
* **Resume contract.** ``config.yaml`` is the resolved config the run trains with.
  ``--resume`` compares the new config with it before anything is written: the keys in
  :data:`RESUME_SAFE` are applied (and recorded in ``config-history.jsonl``), any other
  difference is refused in one line listing the keys.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dsparse.config import RunConfig, dump_config, flatten, load_config
from dsparse.io import write_text_atomic
from dsparse.locks import acquire_lock, release_lock

log = logging.getLogger(__name__)

IDENTITY_FILE = "run.json"
HISTORY_FILE = "config-history.jsonl"
CONFIG_FILE = "config.yaml"
# Settings a resumed run can change and honour: how long and how often, and the learning
# rate and its schedule (applied to the restored optimizer, see Trainer). The output
# directory may differ for a moved or copied run.
RESUME_SAFE = ("train.iterations", "train.eval_interval", "train.checkpoint_interval", "train.log_interval",
               "train.eval_batches", "train.keep_checkpoints", "train.threads", "optimizer.lr", "schedule.",
               "data.num_workers", "data.eval_batch_size", "output_dir")


def _safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE)


def config_changes(saved: RunConfig, new: RunConfig) -> tuple[dict, dict]:
    """``(safe, refused)``: each ``{key: [saved value, new value]}`` over the flattened configs."""
    old, now = flatten(saved.to_dict()), flatten(new.to_dict())
    changed = {key: [old.get(key), now.get(key)] for key in sorted(set(old) | set(now)) if old.get(key) != now.get(key)}
    safe = {k: v for k, v in changed.items() if _safe(k)}
    return safe, {k: v for k, v in changed.items() if k not in safe}


@dataclass
class RunDirectory:
    """A run directory owned by this process (rank 0); see the module docstring."""

    path: Path
    run_uid: str
    copied_from: str | None = None
    changes: dict = field(default_factory=dict)
    _lock_fd: int | None = None

    def release(self) -> None:
        """Clear the holder line (a clean exit) and drop the lock."""
        release_lock(self._lock_fd)
        self._lock_fd = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def lock_run_directory(config: RunConfig) -> int | None:
    """Create the run directory if needed and lock it (before a checkpoint is chosen, so a
    running run's checkpoints are never read half-written)."""
    path = Path(config.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return acquire_lock(path)


def open_run_directory(config: RunConfig, fd: int | None, *, resuming: bool, step: int | None) -> RunDirectory:
    """Check a resume against ``config.yaml``, then record the run (the lock ``fd`` is held).

    Args:
        config: the config this process will train with.
        fd: the lock from :func:`lock_run_directory`; released on an error.
        resuming: a checkpoint will be loaded (``step`` is its step).

    Raises:
        ValueError: the resume changes settings it cannot honour (nothing is written then).
    """
    path = Path(config.output_dir)
    try:
        identity = _read_identity(path)
        changes = {}
        if resuming and (path / CONFIG_FILE).is_file():
            saved = load_config(str(path / CONFIG_FILE)).with_absolute_paths()  # older runs saved relative paths
            changes, refused = config_changes(saved, config)
            if refused:
                listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
                raise ValueError(f"--resume cannot change {listed} (the checkpoint was trained with the first "
                                 f"values); resume with those, or start a new run (another output_dir). "
                                 f"Changeable on resume: {', '.join(RESUME_SAFE)}")
        here = str(path.resolve())
        copied_from = original_of(path)
        # The same directory keeps its identity, also when it starts again without a checkpoint
        # (a sweep trial restarted before its first one): it is still the same run.
        if identity is None:
            identity = {"run_uid": uuid.uuid4().hex, "path": here, "host": socket.gethostname(), "created": _now()}
        elif copied_from is not None:
            log.warning("%s is a copy of the run directory %s: it continues in its own MLflow run", here, copied_from)
            identity = {"run_uid": uuid.uuid4().hex, "path": here, "host": socket.gethostname(), "created": _now(),
                        "copied_from": copied_from}
        write_text_atomic(path / IDENTITY_FILE, json.dumps(identity, indent=2) + "\n")
        dump_config(config, path / CONFIG_FILE)  # atomic
        _append_history(path, {"time": _now(), "event": "resume" if resuming else "start", "step": step or 0,
                               "changes": changes})
        if changes:
            log.info("resume applies %s", ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items()))
    except BaseException:
        release_lock(fd)
        raise
    return RunDirectory(path, identity["run_uid"], copied_from, changes, fd)


def original_of(path: str | Path) -> str | None:
    """The run directory ``path`` was copied from (its ``run.json`` names another path), or
    None for the original itself. Read-only: analysis and training decide copies alike."""
    identity = _read_identity(Path(path))
    if identity is None or identity.get("path") == str(Path(path).resolve()):
        return None
    return identity.get("path")


def run_uid_of(path: str | Path) -> str | None:
    """The identity of a run directory (``run.json``), which its MLflow run carries as the
    ``dsparse.run_uid`` tag."""
    return (_read_identity(Path(path)) or {}).get("run_uid")


def _read_identity(path: Path) -> dict | None:
    try:
        return json.loads((path / IDENTITY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _append_history(path: Path, entry: dict) -> None:
    with open(path / HISTORY_FILE, "a") as history:
        history.write(json.dumps(entry, default=str) + "\n")
