"""Task declarations: losses, metrics and the registry that builds tasks by name.

Example::

    from dsparse.tasks import build_tasks

    tasks = build_tasks(["seg", "depth"], num_classes=13)
    loss = sum(task.loss(pred[name], batch[name]) for name, task in tasks.items())
"""

from dsparse.tasks.base import TASKS, Metric, Task, build_task, build_tasks, register_task
from dsparse.tasks.dense import (
    DepthTask,
    EdgeTask,
    KeypointTask,
    NormalTask,
    SegTask,
    class_weights_from_frequency,
    masked_mean,
)
from dsparse.tasks.metrics import AngleMetric, ConfusionMetric, DepthMetric, MAEMetric
from dsparse.tasks.summary import delta_t

__all__ = [
    "TASKS",
    "AngleMetric",
    "ConfusionMetric",
    "DepthMetric",
    "DepthTask",
    "EdgeTask",
    "KeypointTask",
    "MAEMetric",
    "Metric",
    "NormalTask",
    "SegTask",
    "Task",
    "build_task",
    "build_tasks",
    "class_weights_from_frequency",
    "delta_t",
    "masked_mean",
    "register_task",
]
