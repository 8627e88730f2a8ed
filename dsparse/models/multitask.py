"""Multitask networks and the structure they declare: which tasks use which parameters.

DiSparse scores and votes per task, so pruning code must know the *users* of every
weight: the tasks whose loss depends on it (docs/design.md, "Vocabulary"). Guessing that from
parameter names ("head" in the name...) breaks on the first branched network, so the
model declares it: ``task_modules()`` lists modules with the task set that uses every
parameter under them, and ``parameter_users`` turns that into a map keyed by parameter
FQN, the key every mask and per-layer setting in dsparse uses.

A head is any module called as ``head(features, output_size)`` that returns the task's
prediction at ``output_size`` (see ``ASPPHead``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TaskStructure(Protocol):
    """A model that declares which tasks use which of its parameters."""

    def task_modules(self) -> list[tuple[nn.Module, frozenset[str]]]:
        """Each ``(module, users)``: every parameter under ``module`` is used by exactly
        ``users``. A shared trunk maps to all tasks, ``heads[t]`` to ``{t}``; a branched
        model declares a block shared by a subset. Declarations may nest: the innermost
        declaration that contains a parameter decides its users (see ``parameter_users``).
        """
        ...


def _check_heads(heads: dict[str, nn.Module]) -> nn.ModuleDict:
    if not heads:
        raise ValueError("a multitask model needs at least one head, got none")
    for name, head in heads.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task names must be non-empty strings without '.', got {name!r}")
        if not isinstance(head, nn.Module):
            raise TypeError(f"head of task {name!r} must be an nn.Module, got {type(head).__name__}")
    return nn.ModuleDict(heads)


def _select_tasks(all_tasks: tuple[str, ...], tasks: Iterable[str] | None) -> tuple[str, ...]:
    """The requested tasks in the model's own order, so outputs never depend on call order."""
    if tasks is None:
        return all_tasks
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a collection of task names, e.g. [{tasks!r}], not a string")
    requested = set(tasks)
    unknown = requested.difference(all_tasks)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; the model has {list(all_tasks)}")
    if not requested:
        raise ValueError("tasks is empty; pass None for all tasks")
    return tuple(t for t in all_tasks if t in requested)


class MultiTaskNet(nn.Module):
    """One trunk shared by every task, then one head per task.

    Args:
        trunk: maps an image batch [B, 3, H, W] to features.
        heads: task name -> head; the dict order is the model's task order.

    Raises:
        ValueError: on no heads or a task name that cannot be a module name.
    """

    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.trunk = trunk
        self.heads = _check_heads(heads)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features shared by all heads."""
        return self.trunk(x)

    def forward_heads(
        self, features: torch.Tensor, output_size: Sequence[int], tasks: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the heads of ``tasks`` (default all) on precomputed trunk features."""
        return {t: self.heads[t](features, output_size) for t in _select_tasks(self.tasks, tasks)}

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Predict every task (or only ``tasks``) with a single trunk pass.

        Returns:
            task -> [B, C_t, H, W] at the input size, in the model's task order.
        """
        return self.forward_heads(self.forward_features(x), x.shape[-2:], tasks)

    def task_modules(self) -> list[tuple[nn.Module, frozenset[str]]]:
        everyone = frozenset(self.tasks)
        return [(self.trunk, everyone)] + [(head, frozenset({t})) for t, head in self.heads.items()]

    def select_tasks(self, tasks: Iterable[str]) -> None:
        """Keep only the heads of ``tasks``, in place (task extraction for deployment)."""
        kept = _select_tasks(self.tasks, tasks)
        self.heads = nn.ModuleDict({t: self.heads[t] for t in kept})


class BranchedMultiTaskNet(nn.Module):
    """A shared early trunk, then branches each shared by a subset of tasks, then heads.

    Example: tasks {seg, depth} share one branch and {normal} has its own; the shared
    part's weights are used by all three, the first branch's by seg and depth only.

    Args:
        shared: maps the image batch to features consumed by every branch.
        branches: ``(users, branch)`` pairs; the user sets must partition the head names.
        heads: task name -> head, fed by the branch that lists the task.

    Raises:
        ValueError: if a task is in no branch or in two, a branch lists an unknown task
            or none, or there are no heads.
    """

    def __init__(
        self,
        shared: nn.Module,
        branches: Sequence[tuple[Iterable[str], nn.Module]],
        heads: dict[str, nn.Module],
    ):
        super().__init__()
        self.shared = shared
        self.heads = _check_heads(heads)
        branches = list(branches)
        self.branch_users = tuple(frozenset(users) for users, _ in branches)
        self.branches = nn.ModuleList(branch for _, branch in branches)
        self._check_partition()

    def _check_partition(self) -> None:
        seen: set[str] = set()
        for users in self.branch_users:
            if not users:
                raise ValueError("every branch must be used by at least one task")
            unknown = users.difference(self.tasks)
            if unknown:
                raise ValueError(f"branch lists tasks {sorted(unknown)} that have no head")
            if users & seen:
                raise ValueError(f"tasks {sorted(users & seen)} are listed in two branches")
            seen |= users
        missing = set(self.tasks) - seen
        if missing:
            raise ValueError(f"tasks {sorted(missing)} are in no branch")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of the shared part, consumed by every branch."""
        return self.shared(x)

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Predict every task (or only ``tasks``); branches no requested task uses are skipped.

        Returns:
            task -> [B, C_t, H, W] at the input size, in the model's task order.
        """
        selected = _select_tasks(self.tasks, tasks)
        shared = self.forward_features(x)
        outputs = {}
        for users, branch in zip(self.branch_users, self.branches):
            wanted = [t for t in selected if t in users]
            if wanted:
                features = branch(shared)
                outputs.update({t: self.heads[t](features, x.shape[-2:]) for t in wanted})
        return {t: outputs[t] for t in selected}

    def select_tasks(self, tasks: Iterable[str]) -> None:
        """Keep only the heads of ``tasks`` and the branches they use, in place; a branch's
        users become the kept tasks among them."""
        kept = _select_tasks(self.tasks, tasks)
        pairs = [(users & set(kept), branch) for users, branch in zip(self.branch_users, self.branches)
                 if users & set(kept)]
        self.heads = nn.ModuleDict({t: self.heads[t] for t in kept})
        self.branch_users = tuple(frozenset(users) for users, _ in pairs)
        self.branches = nn.ModuleList(branch for _, branch in pairs)

    def task_modules(self) -> list[tuple[nn.Module, frozenset[str]]]:
        declared = [(self.shared, frozenset(self.tasks))]
        declared += list(zip(self.branches, self.branch_users))
        return declared + [(head, frozenset({t})) for t, head in self.heads.items()]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DeepSpeed/DDP (``.module``) and ``torch.compile`` (``._orig_mod``)
    wrappers, so FQNs never carry a wrapper prefix.

    Unwrapping stops at the first object whose *class* defines ``task_modules``: the
    DeepSpeed engine forwards unknown attributes to its module, so an instance check
    would mistake the engine for the model.
    """
    while not hasattr(type(model), "task_modules"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _claims(declarations: list[tuple[nn.Module, frozenset[str]]]) -> dict[int, set[frozenset[str]]]:
    """Parameter id -> user sets claiming it, where a parameter reached through a declared
    descendant of a declared module is claimed by the descendant only (innermost wins)."""
    declared_ids = {id(module) for module, _ in declarations}
    claims: dict[int, set[frozenset[str]]] = {}
    for module, users in declarations:
        for name, param in module.named_parameters(remove_duplicate=False):
            owner = module
            nested = False
            for part in name.split(".")[:-1]:
                owner = getattr(owner, part)
                nested = nested or id(owner) in declared_ids
            if not nested:
                claims.setdefault(id(param), set()).add(users)
    return claims


def _declarations(model: nn.Module) -> list[tuple[nn.Module, frozenset[str]]]:
    if not isinstance(model, TaskStructure):
        raise TypeError(
            f"{type(model).__name__} does not declare its task structure; implement "
            "task_modules() (see dsparse.models.TaskStructure)"
        )
    members = {id(m) for m in model.modules()}
    users_of: dict[int, frozenset[str]] = {}
    declarations = []
    # submodules that declare their own users (e.g. the soft thresholds a sparsifier attaches)
    attached = [pair for m in model.modules() if m is not model and isinstance(m, TaskStructure)
                for pair in m.task_modules()]
    for module, users in [*model.task_modules(), *attached]:
        users = frozenset(users)
        if not users or not all(isinstance(t, str) for t in users):
            raise ValueError(
                f"users of {type(module).__name__} must be a non-empty set of task names, got {set(users)}"
            )
        if id(module) not in members:
            raise ValueError(f"declared {type(module).__name__} is not a submodule of the model")
        if users_of.setdefault(id(module), users) != users:
            first = sorted(users_of[id(module)])
            raise ValueError(f"{type(module).__name__} is declared twice, with users {first} and {sorted(users)}")
        declarations.append((module, users))
    return declarations


def parameter_users(model: nn.Module) -> dict[str, frozenset[str]]:
    """Map every parameter FQN to the set of tasks whose loss depends on it.

    The users come from ``model.task_modules()``, and from the ``task_modules()`` of any
    submodule that declares its own (the soft thresholds of ``dsparse.sparsity.soft_threshold``).
    When declared modules nest, the
    innermost declaration containing a parameter decides (so a model may declare its
    whole body for all tasks and override parts of it). A parameter reached through two
    declarations that are not nested (e.g. a weight tied between two heads) is an error
    if their user sets differ, since neither is more specific.

    Args:
        model: a ``TaskStructure`` model, or a wrapper of one (DeepSpeed engine, DDP,
            ``torch.compile``).

    Returns:
        FQN -> users, in ``named_parameters()`` order of the unwrapped model.

    Raises:
        TypeError: if the (unwrapped) model does not implement ``task_modules()``.
        ValueError: naming every parameter no declaration covers or that two
            declarations give different users, or on a malformed declaration.
    """
    model = unwrap_model(model)
    claims = _claims(_declarations(model))
    users: dict[str, frozenset[str]] = {}
    uncovered, conflicting = [], []
    for name, param in model.named_parameters():
        sets = claims.get(id(param), set())
        if not sets:
            uncovered.append(name)
        elif len(sets) > 1:
            conflicting.append(f"{name} {sorted(sorted(s) for s in sets)}")
        else:
            users[name] = next(iter(sets))
    if uncovered or conflicting:
        problems = []
        if uncovered:
            problems.append(f"not covered by any task_modules() entry: {uncovered}")
        if conflicting:
            problems.append(f"declared with different users: {conflicting}")
        raise ValueError(
            f"{type(model).__name__} declares its task structure wrongly; parameters " + "; ".join(problems)
        )
    return users


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """FQN -> weight of every ``Conv2d`` and ``Linear``, in module order.

    Biases and norm parameters stay dense (docs/design.md, "Vocabulary"). FQNs are those of the
    unwrapped model, the same keys ``parameter_users`` returns; a weight shared by two
    layers appears once.
    """
    model = unwrap_model(model)
    fqn_of = {id(p): name for name, p in model.named_parameters()}
    weights: dict[str, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight is not None:
            weights.setdefault(fqn_of[id(module.weight)], module.weight)
    return weights
