"""What a task is, and the registry that turns task names from a config into tasks.

A task is declared once (LibMTL style): its name, how its label is stored and which pixels
it covers (a :class:`~dsparse.tasks.labels.LabelSpec`), how many channels its head
outputs, its loss, a factory for its metric, and which direction is better for every
metric key. The
trainer, the evaluation loop, the saliency code and the ``Delta_T`` summary only talk to
tasks through this interface, so adding a task means writing one class and decorating it
with :func:`register_task`.

Metrics keep their sufficient statistics in ONE flat float64 tensor (``Metric.state``) so
a distributed evaluation reduces every metric with a single ``all_reduce(SUM)`` and every
rank then calls :meth:`Metric.compute` on identical numbers. float64 because the sums run
over millions of pixels, where float32 counts stop being exact above 2**24.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from dsparse.tasks.labels import LabelSpec
from dsparse.registry import Registry


class Metric(abc.ABC):
    """A stateful metric whose whole state is a fixed-size, sum-reducible tensor.

    Subclasses implement :meth:`_statistics`, which maps one batch to the increment of the
    state, and :meth:`compute`, which maps the state to named values. Because the state is
    a plain sum, accumulating two batches, concatenating them, or summing the states of two
    metric objects (what ``all_reduce`` does) all give the same result.
    """

    def __init__(self, num_stats: int) -> None:
        self.state = torch.zeros(num_stats, dtype=torch.float64)

    @abc.abstractmethod
    def _statistics(self, pred: Tensor, target: Tensor) -> Tensor:
        """Return this batch's contribution to ``state`` (same length, any float dtype)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """Turn the accumulated state into metric values; NaN where nothing valid was seen."""

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Accumulate one batch of predictions ``[B, C, H, W]`` and targets.

        The state follows the prediction's device, so an evaluation on GPU keeps its state
        on GPU where ``all_reduce`` with NCCL expects it.
        """
        with torch.no_grad():
            if self.state.device != pred.device:
                self.state = self.state.to(pred.device)
            self.state += self._statistics(pred.detach(), target).to(torch.float64)

    def reset(self) -> None:
        """Zero the state in place (keeps its device)."""
        self.state.zero_()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_stats={self.state.numel()})"


class Task(abc.ABC):
    """One prediction task of a multitask model, built for one dataset.

    Class attributes (declared by each subclass):
        name: registry name, set by :func:`register_task`.
        label: how the label is encoded, decoded, flipped and masked; the dataset writer,
            the loader, the loss and the metric all read it from here.
        metric_lower_is_better: for every key :meth:`Metric.compute` returns, whether a
            lower value is better; ``Delta_T`` uses it for the sign of each term.
        key_metric: the headline metric used for model selection and short reports.
        options: which keyword options of :func:`build_task` the task consumes.

    Instance attribute:
        num_channels: channels the task's head must output.
    """

    name: ClassVar[str] = ""
    label: ClassVar[LabelSpec]
    metric_lower_is_better: ClassVar[dict[str, bool]] = {}
    key_metric: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()

    num_channels: int

    @abc.abstractmethod
    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Scalar loss; finite (0, with a gradient path) when the batch has no valid pixel."""

    @abc.abstractmethod
    def new_metric(self) -> Metric:
        """A fresh, zeroed metric object for this task."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_channels={self.num_channels})"


TASKS: Registry[type[Task]] = Registry("task")

# Options that build_task/build_tasks accept; each task class lists the ones it uses.
_OPTION_NAMES = ("num_classes", "class_weights")


def register_task(name: str):
    """Class decorator adding a :class:`Task` subclass to :data:`TASKS` under ``name``.

    Raises:
        ValueError: if ``name`` is taken, or the class's ``key_metric`` is not one of its
            ``metric_lower_is_better`` keys (a typo there would only surface at report time).
    """

    def decorate(cls: type[Task]) -> type[Task]:
        TASKS.refuse_taken(name)
        if cls.key_metric not in cls.metric_lower_is_better:
            raise ValueError(
                f"{cls.__name__}.key_metric {cls.key_metric!r} is not one of its metrics "
                f"{sorted(cls.metric_lower_is_better)}"
            )
        if not isinstance(getattr(cls, "label", None), LabelSpec):
            raise ValueError(f"{cls.__name__}.label must be a LabelSpec (how its label is stored)")
        unknown = set(cls.options) - set(_OPTION_NAMES)
        if unknown:
            raise ValueError(f"{cls.__name__}.options has unknown entries {sorted(unknown)}")
        return TASKS.register(name)(cls)

    return decorate


def _task_class(name: str) -> type[Task]:
    return TASKS.lookup(name)


def _instantiate(cls: type[Task], options: dict[str, Any]) -> Task:
    return cls(**{key: value for key, value in options.items() if key in cls.options})


def _warn_unused(options: dict[str, Any], classes: list[type[Task]]) -> None:
    used = {key for cls in classes for key in cls.options}
    for key, value in options.items():
        if value is not None and key not in used:
            names = [cls.name for cls in classes]
            warnings.warn(f"{key} has no effect for tasks {names}", stacklevel=3)


def build_task(
    name: str,
    *,
    num_classes: int | None = None,
    class_weights: Tensor | list[float] | None = None,
) -> Task:
    """Build one registered task.

    Args:
        name: a key of :data:`TASKS`.
        num_classes: number of segmentation classes (required by ``seg``).
        class_weights: optional per-class loss weights for ``seg``, length ``num_classes``.

    Returns:
        The task object.

    Raises:
        ValueError: unknown name (the message lists the known ones) or invalid options.
    """
    cls = _task_class(name)
    options = {"num_classes": num_classes, "class_weights": class_weights}
    _warn_unused(options, [cls])
    return _instantiate(cls, options)


def build_tasks(
    names: list[str],
    *,
    num_classes: int | None = None,
    class_weights: Tensor | list[float] | None = None,
) -> dict[str, Task]:
    """Build the tasks of a run, keyed and ordered as given.

    The order matters: it fixes the order of heads, of per-task losses and of the
    per-task saliency scores, so every rank and every resumed run must agree on it.

    Args:
        names: a non-empty list of unique task names from :data:`TASKS`.
        num_classes: passed to the tasks that use it (``seg``).
        class_weights: passed to the tasks that use it (``seg``).

    Returns:
        ``{name: task}`` in the order of ``names``.

    Raises:
        ValueError: empty list, duplicate names, unknown names, or invalid options.
        TypeError: ``names`` is a single string instead of a list.
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a list of task names, got the string {names!r}")
    names = list(names)
    if not names:
        raise ValueError(f"names must list at least one task; known tasks: {sorted(TASKS)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate task names {duplicates} in {names}; list each task once")
    classes = [_task_class(n) for n in names]
    options = {"num_classes": num_classes, "class_weights": class_weights}
    _warn_unused(options, classes)
    return {name: _instantiate(cls, options) for name, cls in zip(names, classes)}
