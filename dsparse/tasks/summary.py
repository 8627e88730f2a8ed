"""The multitask summary ``Delta_T`` (docs/design.md, "Metrics and Delta_T").

``Delta_T = (1/T) sum_t (1/|M_t|) sum_{m in M_t} (-1)^{l_m} (m - m_base) / m_base * 100``

with ``l_m = 1`` when lower is better, so a positive ``Delta_T`` means the run beats the
baseline on average. Every task weighs the same regardless of how many metrics it reports,
and the metric set ``M_t`` is the task's declared ``metric_lower_is_better`` keys, so a run
cannot improve its score by leaving a metric out.

AdapMTL's tables (ACM MM 2024) *sum* the per-metric changes within a task instead
(``within_task="sum"``, ``dsparse report --delta-t per-task-sum``), so a task with more
metrics weighs more; offered to put published numbers beside one's own, never the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from dsparse.tasks.base import Task


WITHIN_TASK = ("mean", "sum")


def _value(results: Mapping[str, Mapping[str, float]], which: str, task: str, metric: str) -> float:
    if task not in results or metric not in results[task]:
        raise ValueError(f"{which} has no value for task {task!r} metric {metric!r}")
    value = float(results[task][metric])
    if not math.isfinite(value):
        raise ValueError(f"{which} value for task {task!r} metric {metric!r} is {value}")
    return value


def delta_t(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    tasks: Mapping[str, Task],
    within_task: str = "mean",
) -> float:
    """Mean relative improvement (percent) of ``metrics`` over ``baseline``.

    Args:
        metrics: ``{task: {metric: value}}`` of the run, e.g. from ``Metric.compute``.
        baseline: the same for the dense baseline of the same run configuration.
        tasks: the tasks to average over; each supplies its metric names and directions.
        within_task: ``"mean"`` (the standard) or ``"sum"`` (AdapMTL's) of a task's metric changes.

    Returns:
        ``Delta_T`` in percent.

    Raises:
        ValueError: no tasks; a task/metric missing from ``metrics`` or ``baseline``;
            a non-finite value; or a baseline value of 0 (the relative change is undefined).
    """
    if not tasks:
        raise ValueError("delta_t needs at least one task")
    if within_task not in WITHIN_TASK:
        raise ValueError(f"within_task must be one of {sorted(WITHIN_TASK)}, got {within_task!r}")
    per_task = []
    for name, task in tasks.items():
        terms = []
        for metric, lower_is_better in task.metric_lower_is_better.items():
            base = _value(baseline, "baseline", name, metric)
            if base == 0:
                raise ValueError(
                    f"baseline value for task {name!r} metric {metric!r} is 0; "
                    "the relative change is undefined"
                )
            value = _value(metrics, "metrics", name, metric)
            sign = -1.0 if lower_is_better else 1.0
            terms.append(sign * (value - base) / base * 100.0)
        per_task.append(sum(terms) / (len(terms) if within_task == "mean" else 1))
    return sum(per_task) / len(per_task)
