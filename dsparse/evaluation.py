"""Evaluate a trained checkpoint on a dataset split, optionally against a baseline run.

Library entry point behind ``dsparse eval``; runs in one process without DeepSpeed (the
checkpoint's model weights are read directly).
"""

from __future__ import annotations

import json
from pathlib import Path

from dsparse.config import RunConfig, load_config
from dsparse.data.loader import stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.tasks import delta_t
from dsparse.distributed import device_and_backend
from dsparse.export import is_export_file, load_sparse
from dsparse.sparsity.sparsifier import checkpoint_masks, read_sparsifier_state, swap_sparse_layers
from dsparse.train.checkpoint import load_model_weights, resolve_checkpoint
from dsparse.train.components import build_run_model, build_run_tasks
from dsparse.train.evaluate import evaluate


def run_config_of(checkpoint: Path) -> RunConfig:
    """The resolved config saved beside a run's checkpoints."""
    for candidate in (checkpoint.parent.parent / "config.yaml", checkpoint / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    raise ValueError(f"cannot find the run's config.yaml next to checkpoint {checkpoint}")


def load_baseline_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    """Per-task metrics of a baseline: a run directory, its summary.json, or an eval JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise ValueError(f"baseline {path} not found; pass a finished run directory (with summary.json) "
                         "or a JSON written by dsparse eval --out")
    data = json.loads(path.read_text())
    metrics = data.get("final_metrics") or data.get("metrics")
    if not metrics:
        raise ValueError(f"baseline {path} holds no per-task metrics (is the run finished?)")
    return metrics


def evaluate_checkpoint(checkpoint: str | Path, *, data_path: str | None = None, split: str = "val",
                        baseline: str | Path | None = None, max_batches: int | None = None) -> dict:
    """Metrics of a checkpoint on ``split``; with ``baseline``, also ``Delta_T`` against it.

    Args:
        checkpoint: a run directory, its checkpoints directory, a ``step-*`` directory, or
            a file written by ``dsparse export``.
        data_path: dataset directory (default: the one in the run's config).
        split: dataset split to evaluate.
        baseline: a dense baseline run (directory or summary.json) or eval JSON.
        max_batches: evaluate at most this many batches (None = the whole split).

    Returns:
        ``{"checkpoint", "data", "split", "metrics", "delta_t"?}``.
    """
    if is_export_file(checkpoint):  # a sparse model from `dsparse export`: block-sparse layers
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
    if model is None:
        model = build_run_model(config, tasks)
        swap_sparse_layers(model, checkpoint_masks(read_sparsifier_state(path)))  # block runs store only kept blocks
        model.load_state_dict(load_model_weights(path))
    device, _ = device_and_backend()
    spec = stream_spec(config.data, manifest, split, config.tasks, seed=config.seed, rank=0, world_size=1,
                       train=False)
    metrics = evaluate(model.to(device), tasks, spec, device, max_batches)
    result = {"checkpoint": str(path), "data": config.data.path, "split": split, "metrics": metrics}
    if baseline is not None:
        result["baseline"] = str(baseline)
        result["delta_t"] = delta_t(metrics, load_baseline_metrics(baseline), tasks)
    return result
