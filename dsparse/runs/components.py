"""Turning a config plus a dataset manifest into tasks and a model.

Shared by training, evaluation and (later) pruning, so all of them build exactly the
same network for a run.
"""

from __future__ import annotations

import torch

from dsparse.config import ModelConfig, RunConfig
from dsparse.data.manifest import Manifest
from dsparse.models import build_branched_model, build_model
from dsparse.tasks import TASKS, Task, build_tasks, class_weights_from_frequency


def build_run_tasks(config: RunConfig, manifest: Manifest) -> dict[str, Task]:
    """The run's tasks, checked against the task registry and the dataset's labels."""
    unknown = [t for t in config.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    missing = [t for t in config.tasks if t not in manifest.tasks]
    if missing:
        raise ValueError(f"dataset {config.data.path} has no labels for task(s) {missing}; "
                         f"it has {manifest.tasks}. Pick tasks from those.")
    uses_seg = "seg" in config.tasks
    num_classes = manifest.num_classes if uses_seg else None
    weights = None
    if uses_seg and config.data.class_weights and manifest.class_weights is not None:
        weights = manifest.class_weights
    elif uses_seg and config.data.class_weights:
        if manifest.class_pixel_frequency is None:
            raise ValueError(f"data.class_weights: true needs class pixel frequencies, and the manifest of "
                             f"{config.data.path} has none; rewrite the dataset with `dsparse data convert` "
                             "(it computes them) or set data.class_weights: false")
        weights = class_weights_from_frequency(manifest.class_pixel_frequency)
    return build_tasks(config.tasks, num_classes=num_classes, class_weights=weights)


def build_run_model(config: RunConfig, tasks: dict[str, Task]) -> torch.nn.Module:
    return build_configured_model(config.model, {name: task.num_channels for name, task in tasks.items()})


def build_configured_model(model_cfg: ModelConfig, task_channels: dict[str, int]) -> torch.nn.Module:
    """The network a ``model`` config section describes: one shared trunk, or a trunk
    shared up to ``branch_from`` with a copy of the rest per task group (``branches``)."""
    options = dict(base_width=model_cfg.base_width, output_stride=model_cfg.output_stride,
                   head_dilations=tuple(model_cfg.head_dilations), head_hidden=model_cfg.head_hidden,
                   stem_pool=model_cfg.stem_pool)
    if model_cfg.branches is None:
        return build_model(model_cfg.arch, task_channels, **options)
    return build_branched_model(model_cfg.arch, task_channels, [set(group) for group in model_cfg.branches],
                                branch_from=model_cfg.branch_from, **options)
