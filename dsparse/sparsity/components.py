"""Where the sparsity went: a model's prunable weights grouped into *components* by their
users, the shared trunk (used by every task), each task's own head, and, in a branched
model, each branch (used by a subset of tasks).

AdapMTL learns one threshold per component, and every method's summary reports sparsity
per component: two runs with the same global sparsity can differ in whether they pruned
the trunk or the heads.
"""

from __future__ import annotations

import torch

__all__ = ["TRUNK", "component_of", "component_sparsity", "components"]

TRUNK = "trunk"
"""The component of the weights every task uses."""


def component_of(users: frozenset[str], tasks: frozenset[str]) -> str:
    """The component a weight with ``users`` belongs to among ``tasks`` (all the model's):
    ``trunk`` if every task uses it, else its users joined by ``-`` (a head: one task; MLflow
    metric names allow no ``+``)."""
    return TRUNK if users == tasks else "-".join(sorted(users))


def components(users: dict[str, frozenset[str]]) -> dict[str, str]:
    """FQN -> component name, for every FQN of ``users`` (weight FQN -> tasks using it).

    Raises:
        ValueError: a task named like the trunk (``trunk``), which would merge two components.
    """
    tasks = frozenset().union(*users.values()) if users else frozenset()
    if TRUNK in tasks and len(tasks) > 1:
        raise ValueError(f"a task is named {TRUNK!r}, the name of the shared component; rename the task")
    return {fqn: component_of(task_set, tasks) for fqn, task_set in users.items()}


def component_sparsity(masks: dict[str, torch.Tensor], users: dict[str, frozenset[str]]) -> dict[str, dict]:
    """Component -> ``{"weights", "kept", "sparsity"}`` of keep ``masks`` (FQN -> bool), in
    order of first appearance (the trunk first in a trunk-and-heads model)."""
    result: dict[str, dict] = {}
    for fqn, component in components({fqn: users[fqn] for fqn in masks}).items():
        entry = result.setdefault(component, {"weights": 0, "kept": 0})
        entry["weights"] += masks[fqn].numel()
        entry["kept"] += int(torch.count_nonzero(masks[fqn]))
    for entry in result.values():
        entry["sparsity"] = 1.0 - entry["kept"] / entry["weights"]
    return result
