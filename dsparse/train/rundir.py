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

:func:`open_run` does all of it for a training run, on every rank (rank 0 decides, every
rank raises the same error), and releases the directory when its block ends.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsparse.config import RunConfig, dump_config, flatten, load_config
from dsparse.distributed import is_main, on_rank_0
from dsparse.io import write_text_atomic
from dsparse.locks import acquire_lock, release_lock
from dsparse.runs.checkpoints import checkpoint_step
from dsparse.runs.layout import RunLayout
from dsparse.train.checkpoint import CheckpointManager

log = logging.getLogger(__name__)

RESUME_MODES = (False, True, "auto")
"""``resume``: False starts (refusing a directory with checkpoints), True continues (refusing
one without), ``"auto"`` continues if it can, else starts (requeued jobs)."""
# Settings a resumed run can change and honour: how long and how often, and the learning
# rate and its schedule (applied to the restored optimizer, see Trainer). The output
# directory may differ for a moved or copied run.
RESUME_SAFE = ("train.iterations", "train.eval_interval", "train.checkpoint_interval", "train.log_interval",
               "train.eval_batches", "train.keep_checkpoints", "train.threads", "optimizer.lr", "schedule.",
               "data.num_workers", "data.eval_batch_size", "data.decode_on", "output_dir")


def _safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE)


def config_changes(saved: RunConfig, new: RunConfig) -> tuple[dict, dict]:
    """``(safe, refused)``: each ``{key: [saved value, new value]}`` over the flattened configs."""
    old, now = flatten(saved.to_dict()), flatten(new.to_dict())
    changed = {key: [old.get(key), now.get(key)] for key in sorted(set(old) | set(now)) if old.get(key) != now.get(key)}
    safe = {k: v for k, v in changed.items() if _safe(k)}
    return safe, {k: v for k, v in changed.items() if k not in safe}


@dataclass
class OpenRun:
    """A run directory this training process holds (see :func:`open_run`).

    Attributes:
        layout: where its files are.
        checkpoints: its checkpoints (resume point, cadence, quarantine).
        resume_from: the checkpoint training continues from, None when it starts.
        run_uid: its identity (``run.json``), which its MLflow run is tagged with.
        copied_from: the directory it was copied from (then it gets an MLflow run of its own).
        changes: ``{key: [saved, new]}`` the resume applies (``RESUME_SAFE`` keys).
    """

    layout: RunLayout
    checkpoints: CheckpointManager
    resume_from: Path | None
    run_uid: str
    copied_from: str | None = None
    changes: dict = field(default_factory=dict)


@contextlib.contextmanager
def open_run(config: RunConfig, resume: bool | str = False) -> Iterator[OpenRun]:
    """Hold ``config.output_dir`` for a training run: lock it (rank 0), choose the
    checkpoint to resume from, check the resume against the saved config, record the
    run's identity, config and history; release the lock when the block ends.

    Raises:
        ValueError: the same on every rank: a bad ``resume``, a directory held by another
            run, no checkpoint to resume (or one to overwrite), or a resume that changes
            settings it cannot honour (nothing is written then).
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
    layout = RunLayout(config.output_dir)
    if resume is True and not layout.path.is_dir():
        raise ValueError(f"--resume: no run directory {layout.path} to resume; check output_dir, or pass "
                         "--resume-or-start to start a new run there")
    lock = on_rank_0(lock_run_directory, config, share=False)  # before a checkpoint is chosen
    try:
        checkpoints = CheckpointManager(layout.checkpoints, config.train)
        resume_from = checkpoints.resume_point(resume)
        step = checkpoint_step(resume_from) if resume_from is not None else None
        identity = on_rank_0(lambda: _record_run(config, resuming=resume_from is not None, step=step))
        yield OpenRun(layout, checkpoints, resume_from, *identity)
    finally:
        if is_main():
            release_lock(lock)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def lock_run_directory(config: RunConfig) -> int | None:
    """Create the run directory if needed and lock it (before a checkpoint is chosen, so a
    running run's checkpoints are never read half-written)."""
    path = Path(config.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return acquire_lock(path)


def _record_run(config: RunConfig, *, resuming: bool, step: int | None) -> tuple[str, str | None, dict]:
    """Check a resume against ``config.yaml``, then record the run (rank 0, lock held).

    Returns:
        ``(run_uid, copied_from, changes)``.

    Raises:
        ValueError: the resume changes settings it cannot honour (nothing is written then).
    """
    layout = RunLayout(config.output_dir)
    identity = layout.read_identity()
    changes = {}
    if resuming and layout.config.is_file():
        saved = load_config(str(layout.config)).with_absolute_paths()  # older runs saved relative paths
        changes, refused = config_changes(saved, config)
        if refused:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise ValueError(f"--resume cannot change {listed} (the checkpoint was trained with the first "
                             f"values); resume with those, or start a new run (another output_dir). "
                             f"Changeable on resume: {', '.join(RESUME_SAFE)}")
    here = str(layout.path.resolve())
    copied_from = layout.original()
    # The same directory keeps its identity, also when it starts again without a checkpoint
    # (a sweep trial restarted before its first one): it is still the same run.
    if identity is None:
        identity = {"run_uid": uuid.uuid4().hex, "path": here, "host": socket.gethostname(), "created": _now()}
    elif copied_from is not None:
        log.warning("%s is a copy of the run directory %s: it continues in its own MLflow run", here, copied_from)
        identity = {"run_uid": uuid.uuid4().hex, "path": here, "host": socket.gethostname(), "created": _now(),
                    "copied_from": copied_from}
    write_text_atomic(layout.identity, json.dumps(identity, indent=2) + "\n")
    dump_config(config, layout.config)  # atomic
    with open(layout.history, "a") as history:
        history.write(json.dumps({"time": _now(), "event": "resume" if resuming else "start", "step": step or 0,
                                  "changes": changes}, default=str) + "\n")
    if changes:
        log.info("resume applies %s", ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items()))
    return identity["run_uid"], copied_from, changes
