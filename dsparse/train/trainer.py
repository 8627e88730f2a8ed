"""The training loop: one code path for ``dsparse train``, ``torchrun`` and Ray workers.

Launch examples::

    dsparse train configs/synthetic_tiny.yaml                       # one process
    torchrun --nproc_per_node 2 -m dsparse train configs/synthetic_tiny.yaml
    deepspeed --num_gpus 8 -m dsparse train configs/taskonomy.yaml   # GPU node

Each step: one forward of the shared trunk and all heads, per-task losses, a NaN check
agreed on by all ranks, backward of the weighted joint loss, a DeepSpeed step.
"""

from __future__ import annotations

import json
import logging
import math
import weakref
from pathlib import Path

import torch

from dsparse.config import RunConfig, flatten
from dsparse.data.loader import TrainBatches, stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    is_main,
    trainer_threads,
)
from dsparse.io import write_text_atomic
from dsparse.sparsity.sparsifier import read_sparsifier_state
from dsparse.tracking.mlflow_tracker import RunTracker, ui_command
from dsparse.runs.checkpoints import LATEST, checkpoint_step, latest_checkpoint, latest_intact_checkpoint, tag_of
from dsparse.train.checkpoint import discard_checkpoint, load_checkpoint, save_checkpoint, set_aside
from dsparse.runs.components import build_run_model, build_run_tasks
from dsparse.evaluation.loop import evaluate, format_metrics_table
from dsparse.train.optim import build_optimizer, build_scheduler, lr_factor
from dsparse.train.progress import Progress, format_duration
from dsparse.locks import release_lock
from dsparse.train.rundir import RunDirectory, lock_run_directory, open_run_directory
from dsparse.train.sparsify import run_sparsifier

log = logging.getLogger("dsparse.train")


class NonFiniteLossError(RuntimeError):
    """A task loss became NaN or inf; the run stops and keeps its last good checkpoint."""


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_config(config: RunConfig, device: torch.device) -> dict:
    """The DeepSpeed config dict: modelled keys, then ``config_file``, then ``extra``.

    Raises:
        ValueError: an unreadable config file, batch-size keys in it, ZeRO stage 3, or
            bf16 without a GPU.
    """
    ds = config.deepspeed
    result = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": ds.zero_stage},
        # The optimizer is a torch.optim one (DeepSpeed's fused optimizers need CUDA).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": ds.gradient_clipping,
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.config_file is not None:
        result.update(_read_deepspeed_file(Path(ds.config_file)))
    result.update(ds.extra)
    stage = result.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported (masks need whole weights); use 0, 1 or 2")
    if result.get("bf16", {}).get("enabled") and device.type != "cuda":
        raise ValueError("deepspeed.bf16: true needs a CUDA GPU; set it to false on CPU "
                         "(or use a DeepSpeed config file without bf16)")
    return result


def _read_deepspeed_file(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"deepspeed.config_file {path} is not a readable JSON file: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"deepspeed.config_file {path} must hold a JSON object")
    owned = sorted(set(values) & set(BATCH_KEYS))
    if owned:
        raise ValueError(f"deepspeed.config_file {path} sets {owned}; dsparse derives the batch size from "
                         "data.batch_size and the world size, so remove them from the file")
    return values


def _build_engine(config: RunConfig, model: torch.nn.Module, device: torch.device):
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    scheduler = build_scheduler(optimizer, config.schedule, config.train.iterations)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, device))
    return engine


RESUME_MODES = (False, True, "auto")


def _on_rank_0(function, *args, share: bool = True):
    """Run ``function`` on rank 0; any exception there is raised on every rank as one
    ValueError (never a rank waiting alone in a collective). With ``share`` every rank gets
    the result, else only rank 0 (the others get None: e.g. a lock descriptor)."""
    result, problem = None, None
    if is_main():
        try:
            result = function(*args)
        except ValueError as error:
            problem = str(error)
        except Exception as error:  # OSError, a malformed file...: same on every rank
            problem = f"{type(error).__name__}: {error}"
    if share:
        result, problem = broadcast_object((result, problem))
    else:
        problem = broadcast_object(problem)
    if problem:
        raise ValueError(problem)
    return result


def _find_checkpoint(run_dir: Path, resume) -> Path | None:
    """The checkpoint to resume from (rank 0 decides, every rank raises the same error)."""
    problem, checkpoint = _on_rank_0(lambda: _resume_point(run_dir, resume))
    if problem:
        raise ValueError(problem)
    return Path(checkpoint) if checkpoint else None


def _check_run_owner(tracking, run_uid: str) -> None:
    """Refuse to start a run in an MLflow run another run directory owns (e.g. a config
    copied from a sweep trial still naming the trial's ``tracking.run_id``)."""
    if not tracking.enabled:
        return
    from mlflow.tracking import MlflowClient

    from dsparse.tracking.mlflow_tracker import resolve_tracking_uri

    owner = MlflowClient(resolve_tracking_uri(tracking)).get_run(tracking.run_id).data.tags.get("dsparse.run_uid")
    if owner is not None and owner != run_uid:
        raise ValueError(f"tracking.run_id {tracking.run_id} is the MLflow run of another run directory; a new run "
                         "must not log into it: remove tracking.run_id (and parent_run_id) from the config")


def _resume_point(run_dir: Path, resume) -> tuple[str | None, Path | None]:
    """``(problem, checkpoint)``: a resume verifies the latest checkpoint and falls back to
    the newest intact one, saying what it skipped."""
    checkpoints, pointer = run_dir / "checkpoints", run_dir / "checkpoints" / LATEST
    latest = latest_checkpoint(checkpoints)
    if not resume:
        if latest is not None:
            return (f"{run_dir} already holds checkpoints of a run; pass --resume to continue it "
                    "or choose another output_dir (e.g. --set output_dir=runs/NEW)"), None
        return None, None
    if pointer.is_file() and latest is None:
        return (f"{pointer} names {pointer.read_text().strip()!r}, which does not exist; restore that "
                "checkpoint or point 'latest' at an existing checkpoints/step-* directory"), None
    if latest is None:
        if resume is True:
            return (f"--resume: no checkpoint in {run_dir} to resume from; check output_dir, or pass "
                    "--resume-or-start to start a new run there when none exists"), None
        return None, None
    intact, skipped = latest_intact_checkpoint(checkpoints)
    for reason in skipped:
        log.warning("skipping damaged checkpoint %s", reason)
    if intact is None:
        return f"no intact checkpoint in {checkpoints} ({'; '.join(skipped)}); restore the files or start anew", None
    if skipped:  # set the damaged ones aside, so pruning and restores never count them again
        for reason in skipped:
            set_aside(checkpoints / reason.split(":", 1)[0], "damaged")
        write_text_atomic(checkpoints / LATEST, intact.name)
    return None, str(intact)


def _lock_run_dir(config: RunConfig, resume) -> int | None:
    """Rank 0 takes the run directory's lock first (every rank raises the same error)."""
    if resume is True and not Path(config.output_dir).is_dir():
        raise ValueError(f"--resume: no run directory {config.output_dir} to resume; check output_dir, or pass "
                         "--resume-or-start to start a new run there")
    return _on_rank_0(lock_run_directory, config, share=False)


def _open_run_dir(config: RunConfig, fd: int | None, checkpoint: Path | None) -> RunDirectory | None:
    """Rank 0 records the run directory; every rank raises the same error."""
    def record():
        return open_run_directory(config, fd, resuming=checkpoint is not None,
                                  step=checkpoint_step(checkpoint) if checkpoint else None)

    try:
        return _on_rank_0(record, share=False)
    except BaseException:
        if is_main():
            release_lock(fd)
        raise


def _apply_schedule(engine, config: RunConfig) -> None:
    """Make the restored optimizer follow this config's learning rate and schedule.

    A checkpoint restores the scheduler's base learning rate; a resume that changes
    ``optimizer.lr`` (allowed, see rundir.RESUME_SAFE) must take effect from the next step.
    """
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [config.optimizer.lr for _ in scheduler.base_lrs]
    factor = lr_factor(scheduler.last_epoch, config.schedule, config.train.iterations)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = config.optimizer.lr
        group["lr"] = config.optimizer.lr * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _task_losses(engine, tasks, config: RunConfig, batch: dict, device, input_dtype) -> dict[str, torch.Tensor]:
    outputs = engine(batch["rgb"].to(device, input_dtype))
    return {name: task.loss(outputs[name].float(), batch[name].to(device)) for name, task in tasks.items()}


def _check_finite(losses: dict[str, torch.Tensor], step: int, world_size: int) -> dict[str, float]:
    """Mean loss per task over ranks; every rank raises together if any rank saw NaN/inf."""
    values = all_reduce_sum(torch.stack([v.detach().float() for v in losses.values()])) / world_size
    bad = [name for name, value in zip(losses, values.tolist()) if not math.isfinite(value)]
    if bad:
        raise NonFiniteLossError(f"loss of task(s) {bad} is not finite at step {step + 1}")
    return dict(zip(losses, values.tolist()))


def _discard_poisoned(checkpoint_dir: Path, step: int) -> tuple[str, bool]:
    """After a non-finite loss at step ``step + 1``: the weights it was computed with are
    those saved at ``step``, if a checkpoint was; set it aside (``step-N.nonfinite``) so the
    last kept checkpoint holds weights that gave a finite loss. Returns what happened, for
    the message, and whether a good checkpoint is left."""
    def discard():
        latest = latest_checkpoint(checkpoint_dir)
        if latest is not None and latest.name == tag_of(step):
            kept = discard_checkpoint(checkpoint_dir, step)
            return (f"checkpoint {tag_of(step)} held the weights that gave it and was set aside as "
                    f"{tag_of(step)}.nonfinite; " + (f"the last good checkpoint is {kept.name}" if kept
                                                     else "no checkpoint is left")), kept is not None
        if latest is not None:
            return f"the last good checkpoint is {latest.name}", True
        return "no checkpoint was written", False

    try:
        return _on_rank_0(discard)
    except ValueError as error:
        return f"the bad checkpoint could not be set aside ({error})", False


class Trainer:
    """Holds the pieces of one run; :meth:`fit` trains to ``train.iterations``."""

    def __init__(self, config: RunConfig, *, resume: bool | str = False, on_validation=None, on_checkpoint=None):
        config = config.with_absolute_paths()  # a saved config must work from any directory
        self.config = config
        self.on_validation, self.on_checkpoint = on_validation, on_checkpoint
        self.rank, self.world_size, self.device = init_distributed()
        self.threads = trainer_threads(config.train.threads, config.data.num_workers)
        self.run_dir = Path(config.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        # everything a bad config or mask file can break is checked before the run directory is touched
        self.manifest = load_manifest(config.data.path)
        self.tasks = build_run_tasks(config, self.manifest)
        self.sparsifier = run_sparsifier(config, self.tasks, self.manifest, self.rank, self.world_size, self.run_dir)
        deepspeed_config(config, self.device)
        if resume not in RESUME_MODES:
            raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
        torch.manual_seed(config.seed)
        model = build_run_model(config, self.tasks).to(self.device)
        self.sparsifier.check(model)
        lock = _lock_run_dir(config, resume)
        try:
            checkpoint = _find_checkpoint(self.run_dir, resume)
        except BaseException:
            if is_main():
                release_lock(lock)
            raise
        self.directory = _open_run_dir(config, lock, checkpoint)
        if self.directory is not None:  # a Trainer dropped without fit() must not keep the directory locked
            weakref.finalize(self, self.directory.release)
        try:
            self._build(config, model, checkpoint)
        except BaseException:
            self.close()
            raise

    def _build(self, config: RunConfig, model, checkpoint: Path | None) -> None:
        """Engine, restored state and tracking (the run directory is held)."""
        if checkpoint is not None:
            self.sparsifier.load_state_dict(read_sparsifier_state(checkpoint))
        model = self.sparsifier.prepare(model)
        self.engine = _build_engine(config, model, self.device)
        self.sparsifier.bind(self.engine.optimizer)
        self.input_dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32  # also via config_file
        self.state = {"step": 0, "data_position": None, "mlflow_run_id": None, "history": []}
        if checkpoint is not None:
            self.state.update(load_checkpoint(self.engine, checkpoint))
            _apply_schedule(self.engine, config)
            log.info("resumed from %s at step %d", checkpoint, self.state["step"])
        if checkpoint is None and config.tracking.run_id:  # a fresh start told to log into an existing run
            _on_rank_0(lambda: _check_run_owner(config.tracking, self.directory.run_uid))
        copied = broadcast_object(self.directory.copied_from if self.directory else None)
        if copied:  # a copied run directory continues in an MLflow run of its own
            self.state["mlflow_run_id"] = None
        self.tracker = RunTracker(config.tracking, config.tracking.run_name or self.run_dir.name,
                                  run_id=self.state["mlflow_run_id"] or config.tracking.run_id,
                                  parent_run_id=config.tracking.parent_run_id,
                                  enabled=is_main())
        self.state["mlflow_run_id"] = broadcast_object(self.tracker.run_id)
        if self.directory is not None:  # rank 0
            tags = {"dsparse.run_uid": self.directory.run_uid}
            if self.directory.changes:
                tags[f"resume.step_{self.state['step']}.changes"] = json.dumps(self.directory.changes)
            if copied:
                tags["copied_from"] = copied
            self.tracker.set_tags(tags)

    def close(self) -> None:
        """Release the run directory (fit() does it when it returns or fails)."""
        if self.directory is not None:
            self.directory.release()
            self.directory = None

    def _spec(self, split: str, train: bool):
        return stream_spec(self.config.data, self.manifest, split, self.config.tasks, seed=self.config.seed,
                           rank=self.rank, world_size=self.world_size, train=train)

    def validate(self) -> dict[str, dict[str, float]]:
        return evaluate(self.engine.module, self.tasks, self._spec("val", train=False), self.device,
                        self.config.train.eval_batches, self.input_dtype)

    def _save(self, step: int, batches: TrainBatches) -> None:
        self.state.update(step=step, data_position=batches.position())
        path = save_checkpoint(self.engine, self.checkpoint_dir, step, dict(self.state),
                               self.config.train.keep_checkpoints,
                               extra=self.sparsifier.save)
        if self.on_checkpoint is not None:  # every rank, after the checkpoint is published
            self.on_checkpoint(step, path)

    def fit(self, stop_after: int | None = None) -> dict:
        """Train until ``train.iterations`` (or for at most ``stop_after`` more steps), then
        release the run directory.

        Returns the run summary (also written to ``summary.json`` when training completes).
        """
        try:
            return self._fit(stop_after)
        except BaseException as error:  # the MLflow run must not stay RUNNING
            self.tracker.set_tags({"error": f"{type(error).__name__}: {str(error)[:4000]}"})
            self.tracker.finish("FAILED")
            raise
        finally:
            self.close()

    def _fit(self, stop_after: int | None) -> dict:
        cfg = self.config.train
        if stop_after is not None and stop_after < 0:
            raise ValueError(f"stop_after must be >= 0, got {stop_after}")
        if self.state["step"] > cfg.iterations:
            raise ValueError(f"the checkpoint is at step {self.state['step']}, beyond train.iterations="
                             f"{cfg.iterations}; raise train.iterations to continue the run")
        if self.state["step"] == cfg.iterations and (self.run_dir / "summary.json").is_file():
            log.info("%s is already complete; returning its summary", self.run_dir)
            self.tracker.finish("FINISHED")
            return json.loads((self.run_dir / "summary.json").read_text())
        if is_main():
            self.tracker.log_params(flatten(self.config.to_dict()))
            self.tracker.log_artifact(self.run_dir / "config.yaml")
            self.tracker.log_artifact(self.run_dir / "config-history.jsonl")
            self.sparsifier.log_start(self.tracker, self.run_dir)
        start = self.state["step"]
        end = cfg.iterations if stop_after is None else min(cfg.iterations, start + stop_after)
        batches = TrainBatches(self._spec("train", train=True), self.state["data_position"])
        progress = Progress(start, cfg.iterations, self.config.data.batch_size * self.world_size)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # restored after, so a library caller keeps its own setting
        if is_main():
            log.info("%d intra-op thread(s) per training process, beside %d loader worker(s) (train.threads)",
                     self.threads, self.config.data.num_workers)
        try:
            metrics = self._loop(batches, progress, start, end)
            if end == start:  # nothing trained (e.g. --stop-after 0 to only prune)
                checkpoint = latest_checkpoint(self.checkpoint_dir)
                if checkpoint is None or checkpoint.name != tag_of(end):  # never rewrite a published one
                    self._save(end, batches)
                if end == cfg.iterations:  # finished run without summary (killed before writing it)
                    metrics = self._log_validation(end)
        finally:
            batches.close()
            torch.set_num_threads(threads_before)
        return self._finish(metrics, progress, batches, start, end)

    def _loop(self, batches: TrainBatches, progress: Progress, start: int, end: int) -> dict | None:
        cfg, engine, metrics = self.config.train, self.engine, None
        for step in range(start, end):
            batch = next(batches)
            done = step + 1
            self.sparsifier.begin_step(done, batch)
            losses = _task_losses(engine, self.tasks, self.config, batch, self.device, self.input_dtype)
            try:
                mean_losses = _check_finite(losses, step, self.world_size)
            except NonFiniteLossError as error:
                verdict, resumable = _discard_poisoned(self.checkpoint_dir, step)
                then = ("; --resume applies a new learning rate from the last good checkpoint" if resumable
                        else "; start the run again (another output_dir)")
                raise NonFiniteLossError(
                    f"{error}; {verdict}. Lower the learning rate (--set optimizer.lr=...), enable "
                    f"deepspeed.gradient_clipping, or check that task's labels{then}") from None
            engine.backward(sum(self.config.weight_of(name) * loss for name, loss in losses.items()))
            engine.step()
            if (update := self.sparsifier.step(done, batch)) is not None and is_main():
                self.tracker.log_metrics(update, done)
            if done % cfg.log_interval == 0 or done == end:
                self._log_train(done, mean_losses, progress, batches)
            if done % cfg.eval_interval == 0 or done == cfg.iterations:
                metrics = self._log_validation(done)
            if done % cfg.checkpoint_interval == 0 or done == end:
                self._save(done, batches)
        return metrics

    def _log_train(self, step: int, losses: dict[str, float], progress: Progress, batches: TrainBatches) -> None:
        lr = self.engine.get_lr()[0]
        wait = batches.wait_seconds / max(progress.elapsed(), 1e-9)
        num_bad = int(all_reduce_sum(torch.tensor([batches.num_bad], device=self.device)).item())  # all ranks
        if is_main():
            log.info(progress.line(step, losses, lr, wait))
            joint = sum(self.config.weight_of(n) * v for n, v in losses.items())
            metrics = {f"train/loss/{n}": v for n, v in losses.items()}
            metrics.update({"train/loss": joint, "train/lr": lr, "train/samples_per_s": progress.samples_per_second(step),
                            "train/data_wait_fraction": wait, "train/bad_samples": num_bad})
            self.tracker.log_metrics(metrics, step)

    def _log_validation(self, step: int) -> dict:
        metrics = self.validate()
        self.state["history"].append({"step": step, "metrics": metrics})
        if self.on_validation is not None:  # every rank (Ray Train needs equal report counts)
            self.on_validation(step, metrics)
        if is_main():
            log.info("validation at step %d:\n%s", step, format_metrics_table(metrics))
            flat = {f"val/{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}
            self.tracker.log_metrics(flat, step)
        return metrics

    def _finish(self, metrics: dict | None, progress: Progress, batches: TrainBatches, start: int, end: int) -> dict:
        complete = end == self.config.train.iterations
        summary = {
            "status": "complete" if complete else "stopped",
            "step": end,
            "iterations": self.config.train.iterations,
            "steps_this_invocation": end - start,
            "final_metrics": metrics if complete else None,
            "wall_time_s": progress.elapsed(),
            "samples_per_s": progress.samples_per_second(end),
            "data_wait_fraction": batches.wait_seconds / max(progress.elapsed(), 1e-9),
            "bad_samples_skipped": batches.num_bad,
            "world_size": self.world_size,
            "threads": self.threads,
            "sparsity": self.sparsifier.summary(),
            "mlflow_run_id": self.state["mlflow_run_id"],
            "mlflow_tracking_uri": self.tracker.uri,
            "checkpoint": str(latest_checkpoint(self.checkpoint_dir)),
            "config": self.config.to_dict(),
            "dataset": self.manifest.identity(),
        }
        if is_main():
            if complete:
                summary_text = json.dumps(summary, indent=2, default=str)
                write_text_atomic(self.run_dir / "summary.json", summary_text)
                self.tracker.log_artifact(self.run_dir / "summary.json")
                self.tracker.finish("FINISHED")
                log.info("done in %s; summary at %s; MLflow run %s: %s", format_duration(summary["wall_time_s"]),
                         self.run_dir / "summary.json", summary["mlflow_run_id"], ui_command(self.tracker.uri))
            else:
                self.tracker.finish("KILLED")
                log.info("stopped at step %d of %d; continue with --resume", end, self.config.train.iterations)
        barrier()
        return summary


def train(config: RunConfig, *, resume: bool | str = False, stop_after: int | None = None, on_validation=None,
          on_checkpoint=None) -> dict:
    """Train one run from its config; the library entry point behind ``dsparse train``.

    Args:
        config: the validated run config.
        resume: ``True`` continues from the run directory's latest checkpoint (an error if
            there is none); ``"auto"`` continues if there is one, else starts; ``False``
            starts (an error if the directory holds checkpoints). A resume may change
            only the settings in ``rundir.RESUME_SAFE``, which then take effect.
        stop_after: train at most this many steps in this invocation, then checkpoint and
            return (for time-limited allocations); ``--resume`` continues.
        on_validation: called as ``on_validation(step, metrics)`` on every rank after each
            validation (the Ray Train integration reports through it).
        on_checkpoint: called as ``on_checkpoint(step, path)`` on every rank once a
            checkpoint is published (Ray Train registers it with its storage).

    Returns:
        The run summary dict.

    Raises:
        NonFiniteLossError: a task loss became NaN/inf (names task and step).
        ValueError: bad config, dataset or run directory.
    """
    return Trainer(config, resume=resume, on_validation=on_validation,
                   on_checkpoint=on_checkpoint).fit(stop_after=stop_after)
