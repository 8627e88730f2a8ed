"""Atomic DeepSpeed checkpoints: a checkpoint either exists whole or not at all.

Every rank writes its part (ZeRO partitions the optimizer state) into
``checkpoints/.partial/<tag>``; after a barrier rank 0 renames the directory to
``checkpoints/<tag>`` and then replaces the ``latest`` pointer (write-temp-then-rename).
A run killed mid-save leaves only ``.partial``, which the next save clears, and
``latest`` keeps pointing at the previous complete checkpoint. Assumes all ranks share
the run directory's filesystem (one node, or shared storage on a cluster).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dsparse.config import TrainConfig
from dsparse.distributed import barrier, is_main, on_rank_0
from dsparse.io import write_text_atomic
from dsparse.runs.checkpoints import (
    FILE_LIST,
    LATEST,
    STATE_FILE,
    checkpoint_step,
    is_published,
    latest_checkpoint,
    latest_intact_checkpoint,
    read_checkpoint_file,
    sha256_of,
    tag_of,
)

log = logging.getLogger("dsparse.train")

PARTIAL = ".partial"
CLIENT_KEY = "dsparse"  # our state lives under one key, apart from DeepSpeed's own entries


@dataclass
class TrainState:
    """What a checkpoint restores besides the engine: how far the run is, where its data
    stream stands, its MLflow run and its validation history."""

    step: int = 0
    """Optimizer steps finished; the loop's ``step`` counts the one in progress, from 1."""
    data_position: dict | None = None
    mlflow_run_id: str | None = None
    history: list[dict] = field(default_factory=list)
    """``{"step", "metrics"}`` of every validation."""
    loss_weighting: dict | None = None
    """The adaptive loss weighting's window (``dsparse.train.loss_weights``), None when fixed."""

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


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


def load_checkpoint(engine, path: Path) -> TrainState:
    """Restore engine state from a checkpoint directory; returns the run's state.

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
    return TrainState.from_dict(client_state[CLIENT_KEY])


class CheckpointManager:
    """A training run's checkpoints: where it resumes from, when it saves, and setting aside
    the ones that cannot be trusted (damaged files, weights that gave a non-finite loss).

    Every method runs on every rank; where one rank must decide (rank 0), every rank gets
    its answer or raises its error.
    """

    def __init__(self, directory: Path, settings: TrainConfig):
        self.directory = Path(directory)
        self.interval, self.keep = settings.checkpoint_interval, settings.keep_checkpoints

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def resume_point(self, resume: bool | str) -> Path | None:
        """The checkpoint to resume from (``resume`` as in ``open_run``); a resume verifies
        the latest checkpoint and falls back to the newest intact one, saying what it
        skipped and setting the damaged ones aside.

        Raises:
            ValueError: a fresh start into a directory with checkpoints, a resume with none,
                a ``latest`` pointer to nothing, or no intact checkpoint.
        """
        checkpoint = on_rank_0(self._choose, resume)
        return Path(checkpoint) if checkpoint else None

    def _choose(self, resume: bool | str) -> str | None:
        run_dir, pointer = self.directory.parent, self.directory / LATEST
        latest = self.latest()
        if not resume:
            if latest is not None:
                raise ValueError(f"{run_dir} already holds checkpoints of a run; pass --resume to continue it "
                                 "or choose another output_dir (e.g. --set output_dir=runs/NEW)")
            return None
        if pointer.is_file() and latest is None:
            raise ValueError(f"{pointer} names {pointer.read_text().strip()!r}, which does not exist; restore that "
                             "checkpoint or point 'latest' at an existing checkpoints/step-* directory")
        if latest is None:
            if resume is True:
                raise ValueError(f"--resume: no checkpoint in {run_dir} to resume from; check output_dir, or pass "
                                 "--resume-or-start to start a new run there when none exists")
            return None
        intact, skipped = latest_intact_checkpoint(self.directory)
        for reason in skipped:
            log.warning("skipping damaged checkpoint %s", reason)
        if intact is None:
            raise ValueError(f"no intact checkpoint in {self.directory} ({'; '.join(skipped)}); restore the files "
                             "or start anew")
        if skipped:  # set the damaged ones aside, so pruning and restores never count them again
            for reason in skipped:
                set_aside(self.directory / reason.split(":", 1)[0], "damaged")
            write_text_atomic(self.directory / LATEST, intact.name)
        return str(intact)

    def due(self, step: int, end: int) -> bool:
        """Whether the step just finished (1-based) is saved: on the interval, and the last."""
        return step % self.interval == 0 or step == end

    def save(self, engine, step: int, state: TrainState, extra: Callable[[Path], None] | None = None) -> Path:
        """Publish the checkpoint of ``step`` with ``state`` (every rank; see :func:`save_checkpoint`)."""
        return save_checkpoint(engine, self.directory, step, dataclasses.asdict(state), self.keep, extra=extra)

    def set_aside_poisoned(self, step: int) -> tuple[str, bool]:
        """After a non-finite loss at ``step`` (1-based): the weights it was computed with are
        those saved at ``step - 1``, if a checkpoint was; set it aside (``step-N.nonfinite``)
        so the last kept checkpoint holds weights that gave a finite loss.

        Returns:
            what happened (for the message), and whether a good checkpoint is left.
        """
        before = step - 1

        def discard():
            latest = self.latest()
            if latest is not None and latest.name == tag_of(before):
                kept = discard_checkpoint(self.directory, before)
                return (f"checkpoint {tag_of(before)} held the weights that gave it and was set aside as "
                        f"{tag_of(before)}.nonfinite; " + (f"the last good checkpoint is {kept.name}" if kept
                                                           else "no checkpoint is left")), kept is not None
            if latest is not None:
                return f"the last good checkpoint is {latest.name}", True
            return "no checkpoint was written", False

        try:
            return on_rank_0(discard)
        except ValueError as error:
            return f"the bad checkpoint could not be set aside ({error})", False
