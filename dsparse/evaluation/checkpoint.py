"""Evaluate a trained checkpoint on a dataset split, optionally against a baseline run.

Library entry point behind ``dsparse eval``; runs in one process without DeepSpeed (the
checkpoint's model weights are read directly).
"""

from __future__ import annotations

from pathlib import Path

from dsparse.data.loader import stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.distributed import device_and_backend
from dsparse.evaluation.baselines import check_comparable, load_baseline
from dsparse.evaluation.loop import evaluate
from dsparse.export import load_sparse
from dsparse.progress import ProgressMeter
from dsparse.runs.components import build_run_tasks
from dsparse.runs.restore import restore_run
from dsparse.tasks import delta_t


def evaluate_checkpoint(checkpoint: str | Path, *, data_path: str | None = None, split: str = "val",
                        baseline: str | Path | None = None, max_batches: int | None = None) -> dict:
    """Metrics of a checkpoint on ``split``; with ``baseline``, also ``Delta_T`` against it.

    Args:
        checkpoint: a run directory, its checkpoints directory, a ``step-*`` directory, or
            a file written by ``dsparse export``.
        data_path: dataset directory (default: the one in the run's config).
        split: dataset split to evaluate.
        baseline: a finished dense baseline run on the same tasks and dataset (its
            directory or summary.json).
        max_batches: evaluate at most this many batches (None = the whole split).

    Returns:
        ``{"checkpoint", "data", "split", "metrics", "delta_t"?}``.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"--max-batches must be at least 1, got {max_batches!r} (leave it out to evaluate the "
                         "whole split)")
    if Path(checkpoint).is_file():  # a model from `dsparse export` (runs and checkpoints are directories)
        path = Path(checkpoint)
        if path.suffix == ".onnx":
            from dsparse.onnx_export import load_onnx

            model, config = load_onnx(path)  # runs in ONNX Runtime
        else:
            model, config = load_sparse(path)
        if data_path is not None:
            config.data.path = str(data_path)
        manifest = load_manifest(config.data.path)
        tasks = build_run_tasks(config, manifest)
    else:
        run = restore_run(checkpoint, data_path=data_path)
        path, config, manifest, tasks, model = run.checkpoint, run.config, run.manifest, run.tasks, run.model
    baseline_summary = None
    if baseline is not None:  # checked before the (long) evaluation
        baseline_summary = load_baseline(baseline)
        check_comparable(baseline_summary, config, manifest.identity(), str(baseline))
    device, _ = device_and_backend()
    spec = stream_spec(config.data, manifest, split, config.tasks, seed=config.seed, rank=0, world_size=1,
                       train=False, device=device)
    total = manifest.splits[split].num_samples  # stream_spec refused an unknown split
    if max_batches is not None:
        total = min(total, max_batches * config.data.eval_batch_size)
    meter = ProgressMeter(f"evaluating on {split}", total, "samples")
    metrics = evaluate(model.to(device), tasks, spec, device, max_batches, progress=meter)
    result = {"checkpoint": str(path), "data": config.data.path, "split": split, "metrics": metrics}
    if baseline_summary is not None:
        result["baseline"] = str(baseline)
        result["delta_t"] = delta_t(metrics, baseline_summary["final_metrics"], tasks)
    return result
