"""The training loop: one code path for ``dsparse train``, ``torchrun`` and Ray workers.

Launch examples::

    dsparse train synthetic_tiny                                  # one process, a preset
    torchrun --standalone --nproc_per_node 2 -m dsparse train synthetic_tiny
    deepspeed --num_gpus 8 --module dsparse train taskonomy       # GPU node

Each step: one forward of the shared trunk and all heads, per-task losses, a NaN check
agreed on by all ranks, backward of the weighted joint loss, a DeepSpeed step, then the
Sparsifier's step (a dynamic method may change the masks). What surrounds the loop lives
beside it: the engine (``engine``), the run directory (``rundir.open_run``), checkpoints
(``checkpoint.CheckpointManager``), the MLflow run (``RunTracker.for_run``), the masks
(``sparsify.run_sparsifier``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import weakref

import torch

from dsparse.config import RunConfig, flatten
from dsparse.data.loader import TrainBatches, stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.distributed import all_reduce_sum, barrier, init_distributed, intra_op_threads, is_main, trainer_threads
from dsparse.evaluation.loop import evaluate, format_metrics_table
from dsparse.io import write_text_atomic
from dsparse.runs.checkpoints import tag_of
from dsparse.runs.components import build_run_model, build_run_tasks
from dsparse.runs.layout import RunLayout
from dsparse.sparsity.sparsifier import read_sparsifier_state
from dsparse.tracking.mlflow_tracker import RunTracker, ui_command
from dsparse.train.checkpoint import TrainState, load_checkpoint
from dsparse.train.engine import apply_schedule, build_engine, deepspeed_config, input_dtype
from dsparse.train.loss_weights import build_loss_weights
from dsparse.train.progress import Progress, format_duration
from dsparse.train.rundir import open_run
from dsparse.train.sparsify import run_sparsifier

log = logging.getLogger("dsparse.train")


class NonFiniteLossError(RuntimeError):
    """A task loss became NaN or inf; the run stops and keeps its last good checkpoint."""


class Trainer:
    """Builds one run (model, masks, engine, restored state, tracking) and holds its run
    directory; :meth:`fit` trains to ``train.iterations``."""

    def __init__(self, config: RunConfig, *, resume: bool | str = False, on_validation=None, on_checkpoint=None):
        config = config.with_absolute_paths()  # a saved config must work from any directory
        self.config = config
        self.on_validation, self.on_checkpoint = on_validation, on_checkpoint
        self.rank, self.world_size, self.device = init_distributed()
        self.threads, self.cpu_budget = trainer_threads(config.train.threads, config.data.num_workers)
        # everything a bad config or mask file can break is checked before the run directory is touched
        self.manifest = load_manifest(config.data.path)
        self.tasks = build_run_tasks(config, self.manifest)
        self.sparsifier = run_sparsifier(config, self.tasks, self.manifest, self.rank, self.world_size,
                                         RunLayout(config.output_dir).path)
        deepspeed_config(config, self.device)
        torch.manual_seed(config.seed)
        model = build_run_model(config, self.tasks).to(self.device)
        self.sparsifier.check(model)
        with contextlib.ExitStack() as holding:
            self.run = holding.enter_context(open_run(config, resume))
            self._build(model)
            self._release = holding.pop_all()  # held until fit() ends (or the Trainer is dropped)
        weakref.finalize(self, self._release.close)

    def _build(self, model: torch.nn.Module) -> None:
        """Masks, engine, restored state and tracking (the run directory is held)."""
        checkpoint = self.run.resume_from
        if checkpoint is not None:
            self.sparsifier.load_state_dict(read_sparsifier_state(checkpoint))
        model = self.sparsifier.prepare(model)
        self.engine = build_engine(self.config, model, self.device, self.sparsifier.param_groups())
        self.sparsifier.bind(self.engine.optimizer)
        self.input_dtype = input_dtype(self.engine)
        self.state = TrainState()
        self.loss_weights = build_loss_weights(self.config)
        if checkpoint is not None:
            self.state = load_checkpoint(self.engine, checkpoint)
            self.loss_weights.load_state_dict(self.state.loss_weighting)
            apply_schedule(self.engine, self.config)
            log.info("resumed from %s at step %d", checkpoint, self.state.step)
        self.tracker = RunTracker.for_run(self.config, self.run, self.state.mlflow_run_id, self.state.step)
        self.state.mlflow_run_id = self.tracker.run_id

    def close(self) -> None:
        """Release the run directory (fit() does it when it returns or fails)."""
        self._release.close()

    def _spec(self, split: str, train: bool):
        return stream_spec(self.config.data, self.manifest, split, self.config.tasks, seed=self.config.seed,
                           rank=self.rank, world_size=self.world_size, train=train, device=self.device)

    def validate(self) -> dict[str, dict[str, float]]:
        return evaluate(self.engine.module, self.tasks, self._spec("val", train=False), self.device,
                        self.config.train.eval_batches, self.input_dtype)

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
        iterations, layout = self.config.train.iterations, self.run.layout
        if stop_after is not None and stop_after < 0:
            raise ValueError(f"stop_after must be >= 0, got {stop_after}")
        if self.state.step > iterations:
            raise ValueError(f"the checkpoint is at step {self.state.step}, beyond train.iterations="
                             f"{iterations}; raise train.iterations to continue the run")
        if self.state.step == iterations and (summary := layout.read_summary()) is not None:
            log.info("%s is already complete; returning its summary", layout.path)
            self.tracker.finish("FINISHED")
            return summary
        if is_main():
            self.tracker.log_params(flatten(self.config.to_dict()))
            self.tracker.log_artifact(layout.config)
            self.tracker.log_artifact(layout.history)
            self.sparsifier.log_start(self.tracker, layout.mask_table)
        start = self.state.step
        end = iterations if stop_after is None else min(iterations, start + stop_after)
        batches = TrainBatches(self._spec("train", train=True), self.state.data_position)
        progress = Progress(start, iterations, self.config.data.batch_size * self.world_size)
        if is_main():
            log.info("%d intra-op thread(s) per training process (train.threads=%s%s), beside %d loader worker(s); "
                     "OpenMP wait policy %s", self.threads, self.config.train.threads or "auto",
                     "" if self.cpu_budget is None else ": " + ", ".join(
                         f"{k} {v}" for k, v in self.cpu_budget.items() if v is not None and k != "threads"),
                     self.config.data.num_workers, os.environ.get("OMP_WAIT_POLICY", "unset (spinning)"))
        try:
            with intra_op_threads(self.threads):
                metrics = None
                for step in range(start + 1, end + 1):
                    if (validated := self._train_step(step, next(batches), batches, progress, end)) is not None:
                        metrics = validated
                if end == start:  # nothing trained (e.g. --stop-after 0 to only prune)
                    latest = self.run.checkpoints.latest()
                    if latest is None or latest.name != tag_of(end):  # never rewrite a published one
                        self._save(end, batches)
                    if end == iterations:  # finished run without summary (killed before writing it)
                        metrics = self._log_validation(end)
        finally:
            batches.close()
        return self._finish(metrics, progress, batches, start, end)

    def _train_step(self, step: int, batch: dict, batches: TrainBatches, progress: Progress, end: int) -> dict | None:
        """Step ``step`` (1-based) on ``batch``; returns the validation metrics if it validated."""
        self.sparsifier.begin_step(step, batch)
        outputs = self.engine(batch["rgb"].to(self.device, self.input_dtype))
        losses = {name: task.loss(outputs[name].float(), batch[name].to(self.device))
                  for name, task in self.tasks.items()}
        mean_losses = self._mean_losses(losses, step)
        weights = self.loss_weights.weights(step)
        self.loss_weights.observe(step, mean_losses)
        self.engine.backward(sum(weights[name] * loss for name, loss in losses.items()))
        self.engine.step()
        if (update := self.sparsifier.step(step, batch)) is not None and is_main():
            self.tracker.log_metrics(update, step)
        settings, metrics = self.config.train, None
        if step % settings.log_interval == 0 or step == end:
            self._log_train(step, mean_losses, weights, progress, batches)
        if step % settings.eval_interval == 0 or step == settings.iterations:
            metrics = self._log_validation(step)
        if self.run.checkpoints.due(step, end):
            self._save(step, batches)
        return metrics

    def _mean_losses(self, losses: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Mean loss per task over ranks; every rank raises together if any rank saw NaN/inf,
        after setting aside the checkpoint whose weights gave it."""
        values = all_reduce_sum(torch.stack([v.detach().float() for v in losses.values()])) / self.world_size
        bad = [name for name, value in zip(losses, values.tolist()) if not math.isfinite(value)]
        if bad:
            verdict, resumable = self.run.checkpoints.set_aside_poisoned(step)
            then = ("; --resume applies a new learning rate from the last good checkpoint" if resumable
                    else "; start the run again (another output_dir)")
            raise NonFiniteLossError(
                f"loss of task(s) {bad} is not finite at step {step}; {verdict}. Lower the learning rate "
                f"(--set optimizer.lr=...), enable deepspeed.gradient_clipping, or check that task's labels{then}")
        return dict(zip(losses, values.tolist()))

    def _save(self, step: int, batches: TrainBatches) -> None:
        self.state.step, self.state.data_position = step, batches.position()
        self.state.loss_weighting = self.loss_weights.state_dict() or None
        path = self.run.checkpoints.save(self.engine, step, self.state, extra=self.sparsifier.save)
        if self.on_checkpoint is not None:  # every rank, after the checkpoint is published
            self.on_checkpoint(step, path)

    def _log_train(self, step: int, losses: dict[str, float], weights: dict[str, float], progress: Progress,
                   batches: TrainBatches) -> None:
        lr = self.engine.get_lr()[0]
        wait = batches.wait_seconds / max(progress.elapsed(), 1e-9)
        num_bad = int(all_reduce_sum(torch.tensor([batches.num_bad], device=self.device)).item())  # all ranks
        if is_main():
            log.info(progress.line(step, losses, lr, wait))
            metrics = {f"train/loss/{n}": v for n, v in losses.items()}
            if self.config.train.loss_weighting != "fixed":
                metrics.update({f"train/task_weight/{n}": w for n, w in weights.items()})
            metrics.update({"train/loss": sum(weights[n] * v for n, v in losses.items()),
                            "train/lr": lr, "train/samples_per_s": progress.samples_per_second(step),
                            "train/data_wait_fraction": wait, "train/bad_samples": num_bad})
            self.tracker.log_metrics(metrics, step)

    def _log_validation(self, step: int) -> dict:
        metrics = self.validate()
        self.state.history.append({"step": step, "metrics": metrics})
        if self.on_validation is not None:  # every rank (Ray Train needs equal report counts)
            self.on_validation(step, metrics)
        if is_main():
            log.info("validation at step %d:\n%s", step, format_metrics_table(metrics))
            flat = {f"val/{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}
            self.tracker.log_metrics(flat, step)
        return metrics

    def _finish(self, metrics: dict | None, progress: Progress, batches: TrainBatches, start: int, end: int) -> dict:
        iterations, layout = self.config.train.iterations, self.run.layout
        complete = end == iterations
        summary = {
            "status": "complete" if complete else "stopped",
            "step": end,
            "iterations": iterations,
            "steps_this_invocation": end - start,
            "final_metrics": metrics if complete else None,
            "wall_time_s": progress.elapsed(),
            "samples_per_s": progress.samples_per_second(end),
            "data_wait_fraction": batches.wait_seconds / max(progress.elapsed(), 1e-9),
            "bad_samples_skipped": batches.num_bad,
            "world_size": self.world_size,
            "threads": self.threads,
            "cpu_budget": self.cpu_budget,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "sparsity": self.sparsifier.summary(),
            "mlflow_run_id": self.state.mlflow_run_id,
            "mlflow_tracking_uri": self.tracker.uri,
            "checkpoint": str(self.run.checkpoints.latest()),
            "config": self.config.to_dict(),
            "dataset": self.manifest.identity(),
        }
        if is_main():
            if complete:
                self.tracker.log_metrics(self.sparsifier.sparsity_metrics(), end)
                write_text_atomic(layout.summary, json.dumps(summary, indent=2, default=str))
                self.tracker.log_artifact(layout.summary)
                self.tracker.finish("FINISHED")
                log.info("done in %s; summary at %s; MLflow run %s: %s", format_duration(summary["wall_time_s"]),
                         layout.summary, summary["mlflow_run_id"], ui_command(self.tracker.uri))
            else:
                self.tracker.finish("KILLED")
                log.info("stopped at step %d of %d; continue with --resume", end, iterations)
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
