"""Distributed evaluation: each rank scores its part of the split, metric sums are all-reduced."""

from __future__ import annotations

import torch

from dsparse.data.loader import StreamSpec, eval_batches
from dsparse.tasks import Task
from dsparse.distributed import all_reduce_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, tasks: dict[str, Task], spec: StreamSpec, device: torch.device,
             max_batches: int | None = None, input_dtype: torch.dtype = torch.float32,
             progress=None) -> dict[str, dict[str, float]]:
    """Metrics of every task over one pass of ``spec`` (identical on all ranks).

    Must be called on every rank: the final all-reduce is collective. ``progress`` (a
    ``ProgressMeter``) counts the evaluated samples.
    """
    was_training = model.training
    model.eval()
    metrics = {name: task.new_metric() for name, task in tasks.items()}
    for batch in eval_batches(spec, max_batches):
        outputs = model(batch["rgb"].to(device, input_dtype))
        for name, metric in metrics.items():
            metric.update(outputs[name].float(), batch[name].to(device))
        if progress is not None:
            progress.add(len(batch["rgb"]))
    results = {}
    for name, metric in metrics.items():
        metric.state = all_reduce_sum(metric.state.to(device))
        results[name] = metric.compute()
    model.train(was_training)
    return results


def format_metrics_table(results: dict[str, dict[str, float]], deltas: dict[str, float] | None = None) -> str:
    """A plain-text table, one row per task metric."""
    rows = [("task", "metric", "value")]
    for task, values in results.items():
        for metric, value in values.items():
            rows.append((task, metric, f"{value:.4f}"))
    if deltas:
        for name, value in deltas.items():
            rows.append(("all", name, f"{value:+.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
