"""Evaluate a trained checkpoint on a dataset split, optionally against a baseline run.

Library entry point behind ``dsparse eval``; runs in one process without DeepSpeed (the
checkpoint's model weights are read directly).
"""

from __future__ import annotations

from pathlib import Path

from dsparse.config import RunConfig
from dsparse.data.loader import stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.tasks import delta_t
from dsparse.distributed import device_and_backend
from dsparse.export import load_sparse
from dsparse.io import read_json
from dsparse.progress import ProgressMeter
from dsparse.sparsity.sparsifier import checkpoint_masks, read_sparsifier_state, swap_sparse_layers
from dsparse.train.checkpoint import load_model_weights, resolve_checkpoint, run_config_of
from dsparse.train.components import build_run_model, build_run_tasks
from dsparse.train.evaluate import evaluate


def load_baseline(path: str | Path) -> dict:
    """A baseline run's ``summary.json`` (from its run directory, or the file itself).

    Raises:
        ValueError: in one line, for anything else (a config file, an unfinished run, a
            file that is not JSON).
    """
    path = Path(path)
    summary = path / "summary.json" if path.is_dir() else path
    if not summary.is_file() or summary.name != "summary.json":
        raise ValueError(f"baseline {path} is not a finished run directory or its summary.json; pass the dense "
                         "run's directory (runs/NAME) once it has finished")
    data = read_json(summary, "baseline")
    if not isinstance(data, dict) or not data.get("final_metrics") or not isinstance(data.get("config"), dict):
        raise ValueError(f"baseline {summary} holds no final metrics (is the run finished?)")
    return data


def check_comparable(baseline: dict, config: RunConfig, dataset: dict, where: str) -> None:
    """Refuse a baseline trained on other tasks or another dataset: ``Delta_T`` would mean nothing."""
    tasks = baseline["config"].get("tasks")
    if sorted(tasks or []) != sorted(config.tasks):
        raise ValueError(f"baseline {where} has tasks {tasks}, this run {config.tasks}; compare runs on the same tasks")
    theirs = baseline.get("dataset")
    if theirs is None:  # summaries written before datasets were recorded: compare the location
        same = Path(baseline["config"]["data"]["path"]).resolve() == Path(config.data.path).resolve()
        theirs = {"path": baseline["config"]["data"]["path"]}
    else:
        same = theirs == dataset
    if not same:
        raise ValueError(f"baseline {where} was trained on another dataset ({theirs}), this run on {dataset}; "
                         "compare runs on the same dataset")


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
    if Path(checkpoint).is_file():  # a sparse model from `dsparse export` (runs and checkpoints are directories)
        path = Path(checkpoint)
        model, config = load_sparse(path)
    else:
        path = resolve_checkpoint(checkpoint)
        config = run_config_of(path)
        model = None
    if data_path is not None:
        config.data.path = str(data_path)
    manifest = load_manifest(config.data.path)
    tasks = build_run_tasks(config, manifest)
    baseline_summary = None
    if baseline is not None:  # checked before the (long) evaluation
        baseline_summary = load_baseline(baseline)
        check_comparable(baseline_summary, config, manifest.identity(), str(baseline))
    if model is None:
        model = build_run_model(config, tasks)
        swap_sparse_layers(model, checkpoint_masks(read_sparsifier_state(path)))  # block runs store only kept blocks
        model.load_state_dict(load_model_weights(path))
    device, _ = device_and_backend()
    spec = stream_spec(config.data, manifest, split, config.tasks, seed=config.seed, rank=0, world_size=1,
                       train=False)
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


def constant_predictor_metrics(config: RunConfig, manifest=None, split: str = "val") -> dict[str, dict[str, float]]:
    """Metrics on ``split`` of the best constant predictor fitted on the training labels:
    the floor every trained model must beat (the first row of ``dsparse report``)."""
    from dsparse.train.trivial import fit_constant_predictor

    manifest = manifest or load_manifest(config.data.path)
    tasks = build_run_tasks(config, manifest)
    fit_spec = stream_spec(config.data, manifest, "train", config.tasks, seed=config.seed, rank=0, world_size=1,
                           train=False)
    model = fit_constant_predictor(tasks, fit_spec)
    eval_spec = stream_spec(config.data, manifest, split, config.tasks, seed=config.seed, rank=0, world_size=1,
                            train=False)
    return evaluate(model, tasks, eval_spec, device=next(model.parameters()).device)
