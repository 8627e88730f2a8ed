"""Dynamic sparse training: the drop/grow schedule and the mask update (docs/design.md, "Dynamic sparse training").

Every ``interval`` steps until ``end`` of training, each layer drops its weakest active
weights by magnitude and grows the same number back, so its density never leaves its ERK
value. Three ways to grow:

- ``"votes"`` (DiSparse dynamic): every task using the layer nominates the inactive
  positions where its own loss gradient ``|dL_t/dw|`` is largest; a position grows if
  *any* user nominates it, and the union is trimmed to the exact count (``grow_by_votes``).
- ``"gradient"`` (RigL): the same with the single pseudo-task ``"joint"`` scored on the
  joint loss, which reduces to "top ``num_grow`` inactive positions by gradient".
- ``"random"`` (SET): uniformly random inactive positions.

Grow candidates are every position inactive *after* the drop, the just-dropped ones
included, as in RigL: a weight dropped and grown back in the same update restarts at 0
like any other grown weight. ``UpdateStats.grown_masks`` names these positions; the caller
zeroes their weights and optimizer state (this module knows nothing of optimizers,
DeepSpeed or devices beyond the tensors it gets).

A layer with no inactive position (a dense or ERK-capped layer) is left alone: dropping
and then regrowing all of its dropped weights would only reset them to zero.

Floors. Each layer's count never changes, so a layer floor set by the initial counts holds
at every update. A row floor (``row_floors``: blocks per block row) is held by never
dropping a row's strongest ``c`` active units; only the others are candidates.

Everything here is a pure, deterministic function of its inputs, so ranks holding equal
weights and all-reduced scores derive identical masks. Work per layer is one top-k
selection for the drop and one per user task for the grow (linear time, ties broken by
flat index), plus a sort of the nominated positions only; no Python loop over elements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dsparse.sparsity.saliency import JOINT

__all__ = ["GROW_MODES", "DynamicSchedule", "UpdateStats", "drop_weakest", "grow_by_votes", "update_layer_masks"]

GROW_MODES = ("votes", "gradient", "random")


@dataclass
class DynamicSchedule:
    """When masks change and how much: cosine-decayed drop fraction, frozen after ``end``.

    The schedule holds no state beyond its settings: the trainer's step counter (saved in
    its checkpoints) is all a resumed run needs to continue it.
    """

    interval: int = 50
    """Update the masks every ``interval`` optimizer steps."""
    end: float = 0.75
    """Fraction of ``total_steps`` after which the masks are frozen."""
    alpha0: float = 0.5
    """Drop fraction of the first update, decaying to 0 at ``end`` (DiSparse code 0.5; RigL 0.3)."""
    total_steps: int = 20000
    """Optimizer steps of the whole run."""

    def __post_init__(self):
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (steps between mask updates), got {self.interval!r}")
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")
        if not 0.0 < self.end <= 1.0:
            raise ValueError(f"end must be in (0, 1] (the fraction of training with mask updates), got {self.end!r}")
        if not 0.0 < self.alpha0 < 1.0:
            raise ValueError(f"alpha0 must be in (0, 1) (the first drop fraction; 0.5 or 0.3 are usual), "
                             f"got {self.alpha0!r}")

    @property
    def end_step(self) -> int:
        """Last step that may update the masks: ``floor(end * total_steps)``.

        The tiny tolerance keeps products such as ``0.29 * 100 = 28.999...`` at 29.
        """
        return math.floor(self.end * self.total_steps + 1e-9)

    def is_update_step(self, step: int) -> bool:
        """Whether to update the masks after ``step`` finished optimizer steps (1-based)."""
        return 0 < step <= self.end_step and step % self.interval == 0

    def drop_fraction(self, step: int) -> float:
        """``alpha0 * (1 + cos(pi * step / (end * total_steps))) / 2``; 0 from ``end`` on."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        progress = min(step / (self.end * self.total_steps), 1.0)
        return self.alpha0 * (1.0 + math.cos(math.pi * progress)) / 2.0


@dataclass
class UpdateStats:
    """What one ``update_layer_masks`` call changed, per layer FQN (every layer of ``masks``)."""

    dropped: dict[str, int] = field(default_factory=dict)
    """Active weights removed by magnitude."""
    grown: dict[str, int] = field(default_factory=dict)
    """Positions grown (always equal to ``dropped``); includes ``regrown``."""
    regrown: dict[str, int] = field(default_factory=dict)
    """Grown positions that were dropped in the same update (they restart at 0)."""
    grown_per_task: dict[str, dict[str, int]] = field(default_factory=dict)
    """Layer -> task -> how many of the grown positions that task nominated (a position
    nominated by two tasks counts for both; ``{"joint": n}`` for RigL; ``{}`` for SET and
    for layers that did not change)."""
    grown_masks: dict[str, Tensor] = field(default_factory=dict)
    """Layer -> bool mask of the grown positions: the caller zeroes their weights and
    optimizer state."""
    nominations: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """``"votes"`` only: task -> layer -> bool mask of the positions the task nominated,
    for the layers that grew (each task's own choice before the union)."""

    @property
    def num_grown(self) -> int:
        return sum(self.grown.values())


def drop_weakest(weight: Tensor, mask: Tensor, num_drop: int) -> Tensor:
    """A new mask without the ``num_drop`` active weights of smallest ``|weight|``.

    Ties in magnitude drop the smaller flat index first, so the result is deterministic.

    Raises:
        ValueError: shapes differ, ``num_drop`` is outside [0, number of active weights],
            or an active weight is NaN/inf.
    """
    _check_same_shape("weight", weight, mask)
    active = mask.reshape(-1).nonzero().squeeze(1)  # ascending flat indices
    if not 0 <= num_drop <= active.numel():
        raise ValueError(f"num_drop must be in [0, {active.numel()}] (the active weights), got {num_drop}")
    new = mask.clone()
    if num_drop == 0:
        return new
    magnitude = weight.detach().reshape(-1)[active.to(weight.device)].abs().to(mask.device)
    if not bool(torch.isfinite(magnitude).all()):
        raise ValueError("weight has NaN/inf active entries, so the weakest cannot be ranked; "
                         "the training diverged (lower the learning rate or check the loss)")
    new.view(-1)[active[_top_k(-magnitude, num_drop)]] = False
    return new


def grow_by_votes(inactive: Tensor, task_scores: Mapping[str, Tensor], num_grow: int, *,
                  return_nominations: bool = False):
    """Grow exactly ``num_grow`` positions by the union of per-task nominations.

    Each task nominates its top ``num_grow`` eligible positions by score (ties: smaller
    flat index). ``num_grow`` each, because a task alone may claim the whole regrowth of a
    layer (for a layer with one user this is exactly RigL) and the union then always holds
    at least ``num_grow`` candidates. The union is ranked by the number of nominating tasks
    (consensus first), then by the largest score among them, then by flat index, and its
    first ``num_grow`` positions grow.

    Args:
        inactive: bool mask of the positions eligible to grow.
        task_scores: task -> score tensor of the layer's shape, ``>= 0`` (``|dL_t/dw|``
            normalised per task over every weight it uses, see ``normalize_scores``, so the
            tie-break compares tasks fairly), for the tasks using the layer.
        num_grow: positions to grow.

    Returns:
        (bool mask of grown positions, task -> number of grown positions it nominated), and
        with ``return_nominations`` a third item: task -> bool mask of the positions it
        nominated (each task's wish before the union, for mask analysis).

    Raises:
        ValueError: no task scores, a score shape that differs from ``inactive``,
            ``num_grow`` outside [0, number of eligible positions], or NaN/inf scores.
    """
    if not task_scores:
        raise ValueError("task_scores is empty; give the scores of at least one task using the layer")
    for task, score in task_scores.items():
        _check_same_shape(f"task_scores[{task!r}]", score, inactive)
    eligible = inactive.reshape(-1)
    num_eligible = int(torch.count_nonzero(eligible))
    if not 0 <= num_grow <= num_eligible:
        raise ValueError(f"num_grow must be in [0, {num_eligible}] (the eligible positions), got {num_grow}")
    grown = torch.zeros_like(inactive)
    if num_grow == 0:
        none = {task: torch.zeros_like(inactive) for task in task_scores}
        return (grown, {task: 0 for task in task_scores}) + ((none,) if return_nominations else ())
    scores = torch.stack([s.detach().reshape(-1).to(inactive.device).float() for s in task_scores.values()])
    # ineligible positions rank below every eligible one (scores are >= 0), without a gather
    scores.masked_fill_(~eligible, -math.inf)
    if not bool(torch.isfinite(scores.amax(dim=1)).all()):  # amax propagates NaN
        raise ValueError("task_scores hold NaN/inf at eligible positions, so nominations cannot be ranked; "
                         "the gradients diverged (lower the learning rate or check the loss)")
    nominated = _top_k_rows(scores, num_grow)
    votes = nominated.sum(dim=0)
    union = votes.nonzero().squeeze(1)  # ascending, i.e. by flat index
    best = torch.where(nominated[:, union], scores[:, union], -math.inf).amax(dim=0)
    # Lexicographic rank by successive stable sorts, least significant key first.
    order = torch.sort(best, descending=True, stable=True).indices
    union = union[order][torch.sort(votes[union[order]], descending=True, stable=True).indices]
    chosen = union[:num_grow]
    grown.view(-1)[chosen] = True
    per_task = dict(zip(task_scores, nominated[:, chosen].sum(dim=1).tolist()))
    if not return_nominations:
        return grown, per_task
    return grown, per_task, {task: row.reshape(inactive.shape) for task, row in zip(task_scores, nominated)}


def update_layer_masks(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    task_scores: Mapping[str, Mapping[str, Tensor]],
    users: Mapping[str, frozenset[str]],
    drop_fraction: float,
    *,
    grow: str = "votes",
    seed: int = 0,
    update_index: int = 0,
    row_floors: Mapping[str, int] | None = None,
) -> tuple[dict[str, Tensor], UpdateStats]:
    """One drop/grow update of every layer in ``masks``; each keeps its active count exactly.

    Per layer: ``num_drop = floor(drop_fraction * active)`` weakest active weights are
    dropped by magnitude, then as many positions grow among all positions inactive after
    the drop (just-dropped ones included). Layers with no inactive position are unchanged.

    Args:
        weights: FQN -> current weight (dense tensor, zeros where pruned).
        masks: FQN -> current bool keep mask; not modified.
        task_scores: task -> FQN -> growth score. ``"votes"``: one entry per task, covering
            the layers it uses (``compute_saliency(..., criterion="grad")`` on the current
            batch, then ``normalize_scores``); ``"gradient"``: the single entry ``"joint"``
            (joint-loss gradient) covering every layer; ``"random"``: ignored (may be {}).
        users: FQN -> tasks using it (``task_weight_users``); only read for ``"votes"``.
        drop_fraction: fraction of each layer's active weights to replace, in [0, 1)
            (``DynamicSchedule.drop_fraction``).
        grow: one of ``GROW_MODES``.
        seed: seed of ``"random"`` growth.
        update_index: which update this is (e.g. the step); combined with ``seed`` so
            successive random updates differ while staying reproducible.
        row_floors: FQN -> the fewest active units each row (first dimension) keeps: each
            row's strongest ``c`` active ones are never dropped (fewer drop if need be).

    Returns:
        (FQN -> new bool mask, in the order of ``masks``; UpdateStats, whose
        ``grown_masks`` say which weights the caller must zero with their optimizer state).

    Raises:
        ValueError: unknown ``grow``, ``drop_fraction`` outside [0, 1), a mask without a
            weight or of another shape, missing scores for a layer that must grow, or a
            negative ``seed``/``update_index`` with ``"random"``.
    """
    if grow not in GROW_MODES:
        raise ValueError(f"unknown grow mode {grow!r}; choose one of {GROW_MODES}")
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction!r}")
    missing = [fqn for fqn in masks if fqn not in weights]
    if missing:
        raise ValueError(f"masks name layers {missing} that have no entry in weights")
    generator = _update_generator(seed, update_index) if grow == "random" else None
    new_masks, stats = {}, UpdateStats()
    for fqn, mask in masks.items():
        _check_same_shape(f"masks[{fqn!r}]", mask, weights[fqn])
        active = int(torch.count_nonzero(mask))
        num_drop = int(drop_fraction * active) if active < mask.numel() else 0
        held = _strongest_per_row(weights[fqn], mask, (row_floors or {}).get(fqn, 0))
        if held is None:
            after_drop = drop_weakest(weights[fqn], mask, num_drop)
        else:
            num_drop = min(num_drop, active - int(torch.count_nonzero(held)))
            after_drop = drop_weakest(weights[fqn], mask & ~held, num_drop) | held
        if num_drop == 0:
            grown, per_task = torch.zeros_like(mask), {}
        elif grow == "random":
            grown, per_task = _grow_random(~after_drop, num_drop, generator), {}
        else:
            layer_scores = _layer_scores(fqn, task_scores, users, grow)
            grown, per_task, nominated = grow_by_votes(~after_drop, layer_scores, num_drop, return_nominations=True)
            if grow == "votes":
                for task, wish in nominated.items():
                    stats.nominations.setdefault(task, {})[fqn] = wish
        new_masks[fqn] = after_drop | grown
        stats.dropped[fqn] = stats.grown[fqn] = num_drop
        stats.regrown[fqn] = int(torch.count_nonzero(grown & mask))
        stats.grown_per_task[fqn] = per_task
        stats.grown_masks[fqn] = grown
    return new_masks, stats


# ---------------------------------------------------------------- internals


def _check_same_shape(name: str, tensor: Tensor, reference: Tensor) -> None:
    if tensor.shape != reference.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the layer has shape {tuple(reference.shape)}")


def _layer_scores(fqn: str, task_scores, users, grow: str) -> dict[str, Tensor]:
    """The scores voting on layer ``fqn``: its users' (votes) or the joint one (gradient)."""
    if grow == "gradient":
        if JOINT not in task_scores or fqn not in task_scores[JOINT]:
            raise ValueError(f"grow='gradient' needs task_scores[{JOINT!r}][{fqn!r}], the joint-loss gradient "
                             f"(compute_saliency(..., joint=True)); task_scores has {sorted(task_scores)}")
        return {JOINT: task_scores[JOINT][fqn]}
    if fqn not in users or not users[fqn]:
        raise ValueError(f"users has no tasks for layer {fqn!r}; pass task_weight_users(model)")
    missing = sorted(t for t in users[fqn] if fqn not in task_scores.get(t, {}))
    if missing:
        raise ValueError(f"layer {fqn!r} is used by tasks {missing} but task_scores has no score of theirs "
                         "for it; score every task on the weights it uses")
    # Task order of task_scores, so the result does not depend on frozenset iteration order.
    return {t: per_fqn[fqn] for t, per_fqn in task_scores.items() if t in users[fqn]}


def _strongest_per_row(weight: Tensor, mask: Tensor, count: int) -> Tensor | None:
    """The ``count`` largest-magnitude active entries of every row (ties: smaller index), or
    None without a floor."""
    if count <= 0:
        return None
    rows = mask.shape[0]
    values = weight.detach().reshape(rows, -1).abs().float().to(mask.device)
    active = mask.reshape(rows, -1)
    values = values.masked_fill(~active, -math.inf)
    return (_top_k_rows(values, min(count, values.shape[1])) & active).reshape(mask.shape)


def _top_k(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest of a 1-D tensor, ties broken by the smaller index (unordered).

    ``topk`` alone picks among ties arbitrarily; its k-th value serves as a threshold
    instead: everything above it, then the first tied positions. Linear time, where a
    stable sort of a multi-million-weight layer would cost several times more.
    """
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    kth = torch.topk(values, k, sorted=False).values.min()
    above = (values > kth).nonzero().squeeze(1)
    tied = (values == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, tied])


def _top_k_rows(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest of every row, ties broken by the smaller index:
    ``_top_k`` for all rows at once (one ``topk`` and a running count of the ties)."""
    kth = torch.topk(values, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    at_least = values >= kth
    if bool((at_least.sum(dim=1) == k).all()):  # no surplus ties at the threshold: the usual case
        return at_least
    above = values > kth
    tied = values == kth
    needed = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= needed))


def _update_generator(seed: int, update_index: int) -> torch.Generator:
    """A CPU generator for one update, mixing ``seed`` and ``update_index`` without collisions."""
    if seed < 0 or update_index < 0:
        raise ValueError(f"seed and update_index must be >= 0, got {seed} and {update_index}")
    state = np.random.SeedSequence([seed, update_index]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _grow_random(candidates: Tensor, num_grow: int, generator: torch.Generator) -> Tensor:
    """``num_grow`` uniformly random positions among ``candidates`` (layers draw in order)."""
    eligible = candidates.reshape(-1).nonzero().squeeze(1)
    grown = torch.zeros_like(candidates)
    if num_grow:
        pick = torch.randperm(eligible.numel(), generator=generator)[:num_grow].to(eligible.device)
        grown.view(-1)[eligible[pick]] = True
    return grown
