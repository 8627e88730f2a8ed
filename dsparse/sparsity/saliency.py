"""Disentangled saliency: one score per weight *per task* (docs/design.md, "Disentangled saliency").

DiSparse decides what to prune by letting every task vote on the weights it uses, so it
needs, for each task ``t``, a score ``S_t(w) >= 0`` computed from ``L_t`` alone, only for
the weights ``t`` uses (``U(w)``, declared by the model, see ``parameter_users``). The
entangled baselines use the same machinery with a single pseudo-task ``"joint"`` scored
on the weighted joint loss over every prunable weight.

Cost. A naive implementation runs one forward and one backward per task. Here every
batch gets ONE forward pass of the whole model, then one ``torch.autograd.grad`` per
task over the retained graph, differentiating only the weights that task uses. With a
backward about twice a forward that is ``1 + 2T`` instead of ``3T`` forward-units
(``benchmarks/bench_saliency.py`` measures it). ``autograd.grad`` returns gradients
instead of accumulating them, so ``param.grad`` is never touched and scoring may run in
the middle of training.

Mode. The forward runs in train mode, as in SNIP and the DiSparse code: a freshly
initialised network in eval mode normalises with running statistics that mean nothing
yet. Train-mode BatchNorm would also update its running statistics, which scoring must
not do, so every buffer of the model is snapshotted before and restored after scoring
(simpler and more general than patching momentum, which cannot stop
``num_batches_tracked`` from counting). Each module's training flag is restored too.

Usage::

    scores = compute_saliency(model, tasks, batches, criterion="snip", num_batches=50)
    scores = normalize_scores(all_reduce_scores(scores))   # then vote
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from dsparse.models import parameter_users, prunable_parameters, unwrap_model
from dsparse.sparsity.criteria import DataFreeCriterion, get_criterion
from dsparse.tasks import Task
from dsparse.distributed import all_reduce_sum

ScoreSet = dict[str, dict[str, Tensor]]
"""Task (or ``JOINT``) -> weight FQN -> score tensor (float64 sums from gradient criteria, float32 after normalize_scores) of the weight's shape, >= 0."""

JOINT = "joint"
"""Pseudo-task of the entangled baselines: the weighted joint loss over all prunable weights."""


def task_weight_users(model: nn.Module) -> dict[str, frozenset[str]]:
    """``parameter_users`` restricted to prunable weights, in ``prunable_parameters`` order."""
    users = parameter_users(model)
    return {fqn: users[fqn] for fqn in prunable_parameters(model)}


def compute_saliency(
    model: nn.Module,
    tasks: dict[str, Task],
    batches: Iterable[dict] | None,
    *,
    criterion: str = "snip",
    num_batches: int = 50,
    joint: bool = False,
    task_weights: dict[str, float] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    weights: dict[str, Tensor] | None = None,
    users: dict[str, frozenset[str]] | None = None,
) -> ScoreSet:
    """Per-task saliency of every prunable weight, accumulated over this rank's batches.

    Args:
        model: a multitask model declaring its task structure (plain or wrapped).
        tasks: the tasks to score, in the run's order; each must be a task of the model.
        batches: batches as produced by the loader (``rgb`` plus one target per task);
            only the first ``num_batches`` are read, and none for data-free criteria.
        criterion: a key of ``dsparse.sparsity.criteria.CRITERIA``.
        num_batches: batches to accumulate over (data-dependent criteria).
        joint: score the single pseudo-task ``"joint"`` on ``sum_t lambda_t L_t`` over
            all prunable weights (the entangled SNIP baseline) instead of every task.
        task_weights: ``lambda_t`` of the joint loss; missing tasks weigh 1.
        seed: seed of the ``random`` criterion.
        device: where batches go and scores live; default the model's device.
        weights: FQN -> the tensor to differentiate for each prunable weight; default the
            model's ``prunable_parameters``. A mask applier passes its own (for example
            the dense probes of block-sparse layers).
        users: FQN -> tasks using each weight; default ``task_weight_users(model)``
            (needed when ``model``'s layers were swapped after the users were read).

    Returns:
        ScoreSet: task -> {fqn: score} for the weights that task uses, in
        ``prunable_parameters`` order (or ``{"joint": {...}}`` over all of them).

    Raises:
        ValueError: unknown criterion, bad ``num_batches``, tasks the model does not
            have, ``task_weights`` for unknown tasks, frozen weights to differentiate,
            a batch without a task's target, or fewer batches than ``num_batches``.
    """
    scorer = get_criterion(criterion)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    net = unwrap_model(model)
    groups = _score_groups(task_weight_users(net) if users is None else users, tasks, joint)
    lambdas = _joint_weights(tasks, task_weights, joint)
    weights = prunable_parameters(net) if weights is None else weights
    if device is None:
        device = next(net.parameters()).device
    if isinstance(scorer, DataFreeCriterion):
        field = scorer.scores(weights, seed)
        return {group: {fqn: field[fqn].clone() for fqn in fqns} for group, fqns in groups.items()}
    _check_differentiable(weights)
    if batches is None:
        raise ValueError(f"criterion {criterion} needs batches; got None")
    batch_iter = itertools.islice(iter(batches), num_batches)
    with _scoring_mode(model, net):
        totals, seen = _accumulate(net, tasks, groups, lambdas, weights, scorer, batch_iter, device)
    if seen < num_batches:
        raise ValueError(
            f"criterion {criterion} needs {num_batches} batches but the data gave only {seen}; "
            "lower --num-batches or use more data"
        )
    return {
        group: {fqn: scorer.finish(total, weights[fqn].detach()) for fqn, total in per_fqn.items()}
        for group, per_fqn in totals.items()
    }


def task_gradients(model: nn.Module, tasks: dict[str, Task], batch: dict,
                   targets: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Per-task gradients of one batch: one train-mode forward (buffers and flags restored,
    as for scoring), then one ``autograd.grad`` per task of ``targets`` on the retained graph.

    Args:
        model: the multitask model (plain, not a DeepSpeed engine).
        tasks: every task of the model's outputs that a target needs.
        batch: ``rgb`` plus each target task's label.
        targets: task -> FQN -> tensor to differentiate (weights or probes).

    Returns:
        task -> FQN -> float64 gradient of ``L_task`` (zeros where the loss does not reach).
    """
    net = unwrap_model(model)
    device = next(net.parameters()).device
    gradients: dict[str, dict[str, Tensor]] = {}
    if not targets:
        return gradients
    with _scoring_mode(model, net):
        images = _target(batch, "rgb").to(device, next(net.parameters()).dtype)
        outputs = net(images)
        jobs = list(targets)
        for index, task in enumerate(jobs):
            loss = tasks[task].loss(outputs[task].float(), _target(batch, task).to(device))
            names = list(targets[task])
            grads = torch.autograd.grad(loss, [targets[task][n] for n in names], retain_graph=index < len(jobs) - 1,
                                        allow_unused=True, materialize_grads=True)
            gradients[task] = {n: g.detach().double() for n, g in zip(names, grads)}
    return gradients


def normalize_scores(scores: ScoreSet) -> ScoreSet:
    """Divide each task's scores by their sum over all the weights that task uses.

    Without this, a task whose loss (and so gradients) is larger would dominate the vote.
    A task whose scores sum to 0 is returned as is (copied). The sum runs in float64 so a
    large model's total does not lose its small terms.

    Returns:
        A new ScoreSet; the input is not modified.
    """
    normalized: ScoreSet = {}
    for task, per_fqn in scores.items():
        total = sum((s.double().sum() for s in per_fqn.values()), torch.zeros((), dtype=torch.float64))
        scale = 1.0 / total if total > 0 else torch.ones((), dtype=torch.float64)
        normalized[task] = {fqn: (s.double() * scale.to(s.device)).float() for fqn, s in per_fqn.items()}
    return normalized


def all_reduce_scores(scores: ScoreSet) -> ScoreSet:
    """Sum every task's scores across ranks: ONE all-reduce per task on a flat buffer.

    Every rank must hold the same tasks, FQNs and shapes (the same model and tasks). The
    buffer is packed in sorted task and FQN order, so the layout does not depend on how
    each rank built its dicts; the result keeps the input's key order. Scores of one task
    must share a device and dtype (``compute_saliency`` guarantees it).

    Returns:
        A new ScoreSet holding the sums (views into one buffer per task); on a single
        rank or without a process group, the input itself.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return scores
    if torch.distributed.get_world_size() == 1:
        return scores
    reduced: ScoreSet = {}
    for task in sorted(scores):
        per_fqn = scores[task]
        order = sorted(per_fqn)
        if not order:
            reduced[task] = {}
            continue
        flat = torch.cat([per_fqn[fqn].reshape(-1) for fqn in order])
        all_reduce_sum(flat)
        pieces = dict(zip(order, flat.split([per_fqn[fqn].numel() for fqn in order])))
        reduced[task] = {fqn: pieces[fqn].view_as(per_fqn[fqn]) for fqn in per_fqn}
    return {task: reduced[task] for task in scores}


# ---------------------------------------------------------------- internals


def _score_groups(users: dict[str, frozenset[str]], tasks: dict[str, Task], joint: bool) -> dict[str, list[str]]:
    """Score group (task or JOINT) -> FQNs it is scored on, in ``users`` order."""
    if not tasks:
        raise ValueError("tasks is empty; give at least one task to score")
    model_tasks = set().union(*users.values()) if users else set()
    unknown = [t for t in tasks if t not in model_tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are not tasks of the model, which has {sorted(model_tasks)}")
    if joint:
        return {JOINT: list(users)}
    return {t: [fqn for fqn, u in users.items() if t in u] for t in tasks}


def _joint_weights(tasks: dict[str, Task], task_weights: dict[str, float] | None, joint: bool) -> dict[str, float]:
    task_weights = dict(task_weights or {})
    unknown = sorted(set(task_weights) - set(tasks))
    if unknown:
        raise ValueError(f"task_weights names tasks {unknown} that are not scored; tasks are {list(tasks)}")
    if task_weights and not joint:
        warnings.warn("task_weights has no effect unless joint=True (each task is scored on its own loss)",
                      stacklevel=3)
    return {t: float(task_weights.get(t, 1.0)) for t in tasks}


def _check_differentiable(weights: dict[str, Tensor]) -> None:
    frozen = [fqn for fqn, w in weights.items() if not w.requires_grad]
    if frozen:
        raise ValueError(
            f"prunable weights {frozen} have requires_grad=False, so their gradient-based saliency "
            "cannot be computed; unfreeze them or use a data-free criterion (magnitude, random)"
        )


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, net: nn.Module) -> Iterator[None]:
    """Train-mode forward without side effects: restore every buffer and training flag."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in net.buffers()]
    net.train()
    try:
        with torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, flag in flags:
            module.training = flag


def _accumulate(net, tasks, groups, lambdas, weights, scorer, batch_iter, device):
    """Run the batches; return ({group: {fqn: summed batch terms}}, number of batches)."""
    # float64 sums: a rank's partial sums and the all-reduce add in a different order than
    # one rank would, and float32 rounding could flip a weight at the vote's boundary,
    # breaking "1 rank and 2 ranks derive the same masks".
    totals = {g: {fqn: torch.zeros_like(weights[fqn], dtype=torch.float64) for fqn in fqns}
              for g, fqns in groups.items()}
    seen = 0
    for batch in batch_iter:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        images = _target(batch, "rgb")
        outputs = net(images.to(next(net.parameters()).dtype))  # bf16 models take bf16 input
        losses = {t: task.loss(outputs[t].float(), _target(batch, t)) for t, task in tasks.items()}
        if JOINT in groups:
            losses = {JOINT: sum(lambdas[t] * loss for t, loss in losses.items())}
        jobs = [g for g in groups if groups[g]]
        for index, group in enumerate(jobs):
            params = [weights[fqn] for fqn in groups[group]]
            # allow_unused + materialize: a declared user whose loss does not reach a weight
            # (e.g. a head of a task not being scored, under joint) scores 0, not an error.
            grads = torch.autograd.grad(losses[group], params, retain_graph=index < len(jobs) - 1,
                                        allow_unused=True, materialize_grads=True)
            with torch.no_grad():
                for fqn, grad, param in zip(groups[group], grads, params):
                    totals[group][fqn].add_(scorer.batch_term(grad, param.detach()))
        seen += 1
    return totals, seen


def _target(batch: dict, task: str) -> Tensor:
    if task not in batch:
        raise ValueError(f"batch has no entry {task!r}; it has {sorted(batch)}")
    return batch[task]
