"""The unanimous vote on channel groups, exact to one channel of one group.

Each task's score of a channel is the sum of its (per-task normalised) element scores over
every weight removed with it (the channel's output row in each producer and its input
slice in each consumer) divided by what removing it saves in the budget's unit: saliency
per parameter (or per FLOP) removed. A channel of a wide layer holds many more weights
than one of a narrow layer, so raw sums let wide layers win every global ranking and empty
the narrow ones (on the tiny model with SNIP-like scores, no sparsity above about 1% kept
every group); per unit of cost the ranking is the greedy order of the knapsack the budget
poses. The channel scores are then normalised again per task. The vote runs
on channels exactly as on weights (``dsparse.sparsity.vote``): each task keeps the top
fraction of the channels it uses, and a channel survives if any user keeps it, so a channel
that several tasks use goes only when all of them vote to remove it. Fixed groups (the
stem's output, the heads' predictions) stay outside the vote.

The budget counts the prunable weights (``params``) or the multiply-accumulates of the
convolutions and linear layers at the training crop (``flops``, two per MAC) of the model
rebuilt with the kept channels. Neither is additive over channels (a layer's size is its
kept outputs times its kept inputs), but the vote's kept sets are nested in the number of
channels kept, so the cost grows with it and a bisection over that number finds the count
whose cost is closest to the target (the smaller on a tie).

Kept counts can be rounded up to a multiple (``multiple``, ``sparsity.channel_multiple``):
CPU and GPU kernels work on channels in SIMD or tensor-core widths of 8 or 16, and a layer
of 21 or 87 channels runs at the speed of the next multiple or falls off the fast path
altogether (ONNX Runtime's blocked convolutions need multiples of 8). The extra channels
of a group are the best-scored ones its vote removed, so no channel any task voted to keep
is removed; counts stay monotone in the vote's size, and the bisection then meets the
budget to within one multiple of one group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dsparse.sparsity.channel.groups import ChannelGroup
from dsparse.sparsity.vote import MIN_DENSITY, VoteResult, _check_sparsity, solve_vote

__all__ = ["BUDGETS", "ChannelCost", "ChannelVote", "channel_scores", "round_up", "solve_channel_vote"]

BUDGETS = ("params", "flops")


@dataclass(frozen=True)
class ChannelCost:
    """What each prunable layer costs per (output channel x input channel): its kernel area
    for ``params``, times its output pixels at the crop for ``flops`` (x2)."""

    unit: dict[str, int]
    """Layer FQN -> cost of one output channel times one input channel."""
    out_channels: dict[str, int]
    in_channels: dict[str, int]

    @classmethod
    def of(cls, model: nn.Module, example_input: torch.Tensor, budget: str) -> ChannelCost:
        if budget not in BUDGETS:
            raise ValueError(f"sparsity.budget must be one of {', '.join(BUDGETS)}; got {budget!r}")
        layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        pixels: dict[str, int] = {}
        if budget == "flops":
            def record(name):
                def hook(module, inputs, out) -> None:
                    pixels.setdefault(name, out[0, 0].numel())
                return hook

            hooks = [m.register_forward_hook(record(name)) for name, m in layers.items()]
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    model(example_input[:1])
            finally:
                model.train(was_training)
                for hook in hooks:
                    hook.remove()
        unit, outs, ins = {}, {}, {}
        for name, module in layers.items():
            area = module.weight[0, 0].numel()
            unit[name] = area if budget == "params" else 2 * area * pixels.get(name, 0)
            outs[name], ins[name] = module.weight.shape[0], module.weight.shape[1]
        return cls(unit, outs, ins)

    def per_channel(self, group: ChannelGroup) -> int:
        """What one channel of ``group`` costs at full width: its rows and input slices."""
        return (sum(self.unit[layer] * self.in_channels[layer] for layer in group.producers)
                + sum(self.unit[layer] * self.out_channels[layer] for layer in group.consumers))

    def total(self, kept: dict[str, int], groups: list[ChannelGroup]) -> int:
        """The cost with ``kept[group] `` channels of each group (every channel of a group not listed)."""
        outs, ins = dict(self.out_channels), dict(self.in_channels)
        for group in groups:
            count = kept.get(group.name, group.channels)
            for layer in group.producers:
                outs[layer] = count
            for layer in group.consumers:
                ins[layer] = count
        return sum(self.unit[layer] * outs[layer] * ins[layer] for layer in self.unit)


def channel_scores(scores: dict[str, dict[str, torch.Tensor]], groups: list[ChannelGroup], cost: ChannelCost
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """task -> group name -> ``[channels]`` scores per unit of cost of the voted (non-fixed)
    groups, each task's summing to 1 over the channels it uses."""
    pooled: dict[str, dict[str, torch.Tensor]] = {}
    for task, per_weight in scores.items():
        for group in groups:
            if group.fixed or task not in group.users:
                continue
            total = torch.zeros(group.channels, dtype=torch.float64)
            for layer in group.producers:
                if (score := per_weight.get(f"{layer}.weight")) is not None:
                    total += score.detach().double().cpu().reshape(group.channels, -1).sum(1)
            for layer in group.consumers:
                if (score := per_weight.get(f"{layer}.weight")) is not None:
                    total += score.detach().double().cpu().transpose(0, 1).reshape(group.channels, -1).sum(1)
            pooled.setdefault(task, {})[group.name] = total / max(1, cost.per_channel(group))
    for task, per_group in pooled.items():
        norm = sum(float(v.sum()) for v in per_group.values())
        pooled[task] = {name: (v / norm if norm > 0 else v).float() for name, v in per_group.items()}
    return pooled


@dataclass
class ChannelVote:
    """The kept channels of every group (fixed groups: all), and each task's before the vote."""

    kept: dict[str, torch.Tensor]
    """Group name -> bool ``[channels]``."""
    task_kept: dict[str, dict[str, torch.Tensor]]
    """task -> group name -> bool ``[channels]`` (the voted groups the task uses)."""
    order: dict[str, list[int]]
    """Group name -> its channels, best first (the largest score of any user): what a
    re-vote that rounds up again adds first."""
    keep_ratio: float
    cost_kept: int
    cost_total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.cost_kept / self.cost_total


MIN_FRACTION = MIN_DENSITY["channel"]
"""Default floor: every voted group keeps at least this fraction of its channels (and at
least one); ``MIN_DENSITY`` says why."""


def solve_channel_vote(scores: dict[str, dict[str, torch.Tensor]], groups: list[ChannelGroup], cost: ChannelCost, *,
                       sparsity: float, scope: str = "global", min_fraction: float = MIN_FRACTION,
                       multiple: int = 1) -> ChannelVote:
    """Vote on channels and keep the channel count whose cost best matches ``sparsity``.

    Every voted group first keeps its floor, ``ceil(min_fraction * channels)`` channels (at
    least one; none with ``min_fraction=0``): those its users score highest (the largest
    normalised score of any user, ties to the lower index). The vote runs on the other
    channels, and the floors count against the budget.

    Args:
        scores: task -> weight FQN -> element scores (normalised per task).
        groups: the model's channel groups (``channel_groups``).
        cost: the budget's cost model.
        sparsity: fraction of the budget (params or FLOPs) to remove, in (0, 1).
        scope: as for ``solve_vote``: ``layerwise`` ranks each group separately.
        min_fraction: the floor, in [0, 1).
        multiple: round every voted group's kept count up to a multiple of this (or to all
            its channels), adding its best-scored removed channels.

    Raises:
        ValueError: a sparsity the fixed groups and floors alone exceed (with the largest
            reachable one), or, without floors, one that empties some group (naming it and
            the largest sparsity that keeps a channel in every group).
    """
    _check_sparsity(sparsity)
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"the channel floor must be in [0, 1), got {min_fraction}")
    if multiple < 1:
        raise ValueError(f"sparsity.channel_multiple must be at least 1 (1 = no rounding), got {multiple}")
    voted = [g for g in groups if not g.fixed]
    if not voted:
        raise ValueError("the model has no prunable channel group (only the stem and the heads' outputs)")
    pooled = channel_scores(scores, groups, cost)
    order = {g.name: _order(g, pooled) for g in voted}
    floors = {g.name: _floor(g, order[g.name], min_fraction) for g in voted}
    rest = {name: ~floor for name, floor in floors.items()}
    users = {g.name: g.users for g in voted if bool(rest[g.name].any())}
    rest_scores = {task: {name: score[rest[name]] for name, score in per.items() if name in users}
                   for task, per in pooled.items()}
    total = cost.total({}, groups)
    target = round((1.0 - float(sparsity)) * total)
    num_rest = sum(int(rest[name].sum()) for name in users)

    def expand(masks: dict[str, torch.Tensor], name: str, rounded: bool = True) -> torch.Tensor:
        kept = floors[name].clone()
        if name in masks:
            kept[rest[name]] = masks[name]
        return round_up(kept, order[name], multiple) if rounded else kept

    def vote(num_keep: int) -> tuple[int, VoteResult | None]:
        result = solve_vote(rest_scores, users, num_keep=num_keep, scope=scope) if users else None
        masks = result.masks if result is not None else {}
        return cost.total({g.name: int(expand(masks, g.name).sum()) for g in voted}, groups), result

    low, high = 0, num_rest
    kept_low, result_low = vote(low)
    if kept_low > target:
        floors_too = ", and every group's floor" if min_fraction else ""
        raise ValueError(f"sparsity {sparsity} keeps {target:,} of {total:,} but the channels that stay (the stem's, "
                         f"the heads' outputs{floors_too}) alone cost {kept_low:,}: the largest reachable sparsity is "
                         f"{1 - kept_low / total:.4g}; lower the sparsity" + (" or the floor" if min_fraction else ""))
    while high - low > 1:  # invariant: cost(low) <= target < cost(high) (or high = every channel)
        middle = (low + high) // 2
        kept, result = vote(middle)
        if kept <= target:
            low, kept_low, result_low = middle, kept, result
        else:
            high = middle
    kept_high, result_high = vote(high)
    cost_kept, result = (kept_high, result_high) if kept_high - target < target - kept_low else (kept_low, result_low)
    masks = result.masks if result is not None else {}
    kept = {g.name: expand(masks, g.name) if not g.fixed else torch.ones(g.channels, dtype=torch.bool)
            for g in groups}
    empty = [g.name for g in voted if not bool(kept[g.name].any())]
    if empty:
        raise ValueError(f"sparsity {sparsity} leaves channel group {empty[0]} with no channel"
                         f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}, which disconnects the "
                         f"network; the largest sparsity keeping a channel in every group is "
                         f"{_largest_connected(vote, num_rest, total):.4g}, or keep a floor of channels per group")
    task_kept = {task: {g.name: expand(result.task_masks[task] if result is not None else {}, g.name, rounded=False)
                        for g in voted if task in g.users} for task in pooled}
    return ChannelVote(kept, task_kept, order, result.keep_ratio if result is not None else 1.0, cost_kept, total)


def round_up(kept: torch.Tensor, order: list[int], multiple: int) -> torch.Tensor:
    """``kept`` (bool ``[channels]``) with the first removed channels of ``order`` added
    until its count is a multiple of ``multiple`` (or every channel); an empty group stays
    empty."""
    count = int(kept.sum())
    want = min(kept.numel(), -(-count // multiple) * multiple)
    if want == count:
        return kept
    kept = kept.clone()
    missing = [c for c in order if not kept[c]]
    kept[torch.tensor(missing[:want - count], dtype=torch.long)] = True
    return kept


def _order(group: ChannelGroup, pooled: dict[str, dict[str, torch.Tensor]]) -> list[int]:
    """The group's channels by the largest score of any user, best first (ties: lower index)."""
    best = torch.stack([per[group.name] for per in pooled.values() if group.name in per]).amax(0)
    return torch.argsort(-best, stable=True).tolist()


def _floor(group: ChannelGroup, order: list[int], min_fraction: float) -> torch.Tensor:
    """The group's floor channels: the first of ``order``."""
    count = math.ceil(min_fraction * group.channels) if min_fraction > 0 else 0
    floor = torch.zeros(group.channels, dtype=torch.bool)
    floor[torch.tensor(order[:max(1, count) if count else 0], dtype=torch.long)] = True
    return floor


def _largest_connected(vote, num_channels: int, total: int) -> float:
    """The largest sparsity at which no voted group is empty (emptiness only shrinks as
    more channels are kept, the kept sets being nested)."""
    low, high = 0, num_channels  # vote(low) empties a group, vote(high) keeps every channel
    while high - low > 1:
        middle = (low + high) // 2
        if all(bool(mask.any()) for mask in vote(middle)[1].masks.values()):
            high = middle
        else:
            low = middle
    return 1.0 - vote(high)[0] / total
