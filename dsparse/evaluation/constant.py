"""The trivial predictor: the best constant output per task under the task's own loss.

A model that learns must beat it. The constant (one value per output channel, the same at
every pixel and for every image) is fitted by minimising each task's training loss on
training batches, so it works for any registered task without knowing what the task is:
for segmentation it ends up on the most frequent class, for L1 tasks near the median, for
normals on the dominant direction. It is evaluated with the same metric code as real models.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from dsparse.config import RunConfig
from dsparse.data.loader import StreamSpec, eval_batches, stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.evaluation.loop import evaluate
from dsparse.runs.components import build_run_tasks
from dsparse.tasks import Task


class ConstantPredictor(nn.Module):
    """Outputs a learned per-task vector at every pixel."""

    def __init__(self, task_channels: dict[str, int]):
        super().__init__()
        self.constants = nn.ParameterDict(
            {name: nn.Parameter(torch.full((channels,), 0.1)) for name, channels in task_channels.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, _, height, width = images.shape
        return {name: value.view(1, -1, 1, 1).expand(batch, -1, height, width)
                for name, value in self.constants.items()}


def fit_constant_predictor(tasks: dict[str, Task], spec: StreamSpec, num_batches: int = 20,
                           num_steps: int = 300, lr: float = 0.05) -> ConstantPredictor:
    """Fit the constants on up to ``num_batches`` batches of ``spec`` (full-batch Adam)."""
    model = ConstantPredictor({name: task.num_channels for name, task in tasks.items()})
    batches = list(eval_batches(spec, num_batches))
    if not batches:
        raise ValueError(f"no batches in split {spec.split!r} to fit the trivial predictor on")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for batch in itertools.islice(itertools.cycle(batches), num_steps):
        outputs = model(batch["rgb"])
        loss = sum(task.loss(outputs[name], batch[name]) for name, task in tasks.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def constant_predictor_metrics(config: RunConfig, manifest=None, split: str = "val") -> dict[str, dict[str, float]]:
    """Metrics on ``split`` of the best constant predictor fitted on the training labels:
    the floor every trained model must beat (the first row of ``dsparse report``)."""
    manifest = manifest or load_manifest(config.data.path)
    tasks = build_run_tasks(config, manifest)
    fit_spec = stream_spec(config.data, manifest, "train", config.tasks, seed=config.seed, rank=0, world_size=1,
                           train=False)
    model = fit_constant_predictor(tasks, fit_spec)
    eval_spec = stream_spec(config.data, manifest, split, config.tasks, seed=config.seed, rank=0, world_size=1,
                            train=False)
    return evaluate(model, tasks, eval_spec, device=next(model.parameters()).device)
