"""One Ray Train worker of a sweep trial: dsparse's own training loop, plus the Ray glue.

* Reports: every rank calls ``ray.train.report`` at every validation and at every
  checkpoint, so all ranks report equally often (Ray Train hangs otherwise). Metrics are
  the latest validation metrics; rank 0 attaches each published dsparse checkpoint, which
  Ray Train copies to the trial's storage (shared disk or cloud bucket).
* Restarts: a restarted worker group, possibly on other nodes, first installs the latest
  checkpoint Ray Train holds into the trial directory if that directory lacks it, then
  resumes with dsparse's ``resume="auto"`` logic (model, optimizer, masks, data position).
* Deterministic errors (a bad config, missing data, a NaN loss) would fail the same way on
  every retry, so they end the worker group cleanly and are left in ``ERROR_FILE`` for the
  trial driver to raise without spending the retries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dsparse.config import config_from_dict
from dsparse.io import write_text_atomic

ERROR_FILE = "trial_error.json"


class _Reporter:
    """``on_validation``/``on_checkpoint`` callbacks of :func:`dsparse.train.trainer.train`."""

    def __init__(self, rank: int):
        self.rank = rank
        self.metrics: dict[str, float] = {}

    def validation(self, step: int, metrics: dict) -> None:
        import ray.train

        self.metrics = {f"val/{task}/{name}": value for task, values in metrics.items()
                        for name, value in values.items()}
        ray.train.report({"step": step, **self.metrics})

    def checkpoint(self, step: int, path: Path) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if self.rank == 0 else None
        ray.train.report({"step": step, **self.metrics}, checkpoint=checkpoint)


def restore_registered_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Install Ray Train's latest checkpoint of this trial into ``checkpoint_dir`` if newer.

    One worker per node copies (local rank 0); all wait at a barrier afterwards.
    """
    import ray.train

    from dsparse.train.checkpoint import install_checkpoint
    from dsparse.distributed import barrier

    registered = ray.train.get_checkpoint()
    installed = None
    if registered is not None and ray.train.get_context().get_local_rank() == 0:
        with registered.as_directory() as source:
            installed = install_checkpoint(Path(source), checkpoint_dir)
    barrier()
    return installed


def record_placement(run_dir: Path, rank: int) -> None:
    """Write ``workers.json``: which node, host and process runs each rank (latest attempt)."""
    import socket

    import ray

    from dsparse.distributed import gather_objects

    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid()}
    placement = gather_objects(here)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "workers.json",
                          json.dumps(sorted(placement, key=lambda worker: worker["rank"]), indent=1))


def worker_loop(loop_config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: the process group is up; train one trial."""
    import ray.train

    from dsparse.runs import RunLayout
    from dsparse.train.trainer import NonFiniteLossError, train

    config = config_from_dict(loop_config["raw"], loop_config["overrides"])
    run_dir = Path(config.output_dir)
    rank = ray.train.get_context().get_world_rank()
    record_placement(run_dir, rank)
    restore_registered_checkpoint(RunLayout(run_dir).checkpoints)
    reporter = _Reporter(rank)
    try:
        train(config, resume="auto", on_validation=reporter.validation, on_checkpoint=reporter.checkpoint)
    except (ValueError, NonFiniteLossError) as error:
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / ERROR_FILE, json.dumps({"type": type(error).__name__, "message": str(error)}))
        return


def read_error(run_dir: Path) -> str | None:
    """The deterministic error a trial's workers stopped on, as ``Type: message``, if any."""
    path = Path(run_dir) / ERROR_FILE
    if not path.is_file():
        return None
    error = json.loads(path.read_text())
    return f"{error['type']}: {error['message']}"
