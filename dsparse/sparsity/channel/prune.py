"""Channel masks of a model from its element scores: groups, vote, the mask set.

What a static method calls for ``sparsity.granularity: channel``; the mask set is what
``dsparse prune`` writes and a run's Sparsifier turns into the smaller model
(``shrink.shrink_model``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

from dsparse.models import prunable_parameters, unwrap_model
from dsparse.sparsity.channel.groups import ChannelGroup, channel_groups
from dsparse.sparsity.channel.shrink import channel_element_masks, channel_meta, shrink_model
from dsparse.sparsity.channel.vote import MIN_FRACTION, ChannelCost, solve_channel_vote
from dsparse.sparsity.masks import MaskSet

__all__ = ["channel_groups_of", "channel_masks", "channel_table"]

log = logging.getLogger("dsparse.sparsity")


def channel_masks(model: nn.Module, scores: dict[str, dict[str, torch.Tensor]], *, sparsity: float, budget: str,
                  scope: str, input_size: tuple[int, int], joint_task: str | None, meta: dict,
                  multiple: int = 1, min_fraction: float = MIN_FRACTION) -> MaskSet:
    """The channel vote's masks for ``model`` (dense), as element masks plus the groups.

    Args:
        scores: task -> weight FQN -> element scores, normalised per task.
        joint_task: the pseudo-task of the entangled baselines (every group is then used by
            it alone), or None to vote with the groups' real users (DiSparse).
        meta: how the masks were made (method, criterion, ...), kept in the mask set.
        multiple: each voted group keeps a multiple of this many channels (``solve_channel_vote``).
        min_fraction: every voted group keeps at least this fraction of its channels, and at
            least one (``solve_channel_vote``); 0 = no floor.
    """
    model = unwrap_model(model)
    weight = next(model.parameters())
    example = torch.zeros(1, 3, *input_size, device=weight.device, dtype=weight.dtype)
    groups = channel_groups(model, example)
    if joint_task is not None:
        groups = [dataclasses.replace(g, users=frozenset({joint_task})) for g in groups]
    cost = ChannelCost.of(model, example, budget)
    vote = solve_channel_vote(scores, groups, cost, sparsity=sparsity, scope=scope, multiple=multiple,
                              min_fraction=min_fraction)
    record = channel_meta(groups, vote.kept, vote.order)
    weights = prunable_parameters(model)
    masks = channel_element_masks(weights, record)
    task_masks = {}
    for task, kept in vote.task_kept.items():
        per_task = {name: {**entry, "kept": torch.nonzero(kept[name]).flatten().tolist()} if name in kept else entry
                    for name, entry in record.items()}
        used = scores.get(task, {})
        task_masks[task] = {fqn: mask for fqn, mask in channel_element_masks(weights, per_task).items() if fqn in used}
    num_kept = sum(int(mask.sum()) for mask in masks.values())
    num_total = sum(mask.numel() for mask in masks.values())
    meta = {**meta, "granularity": "channel", "block": None, "budget": budget, "keep_ratio": vote.keep_ratio,
            "num_kept": num_kept, "num_total": num_total, "sparsity_achieved": 1 - num_kept / num_total,
            "budget_sparsity_achieved": vote.sparsity, "channel_multiple": multiple, "cost_kept": vote.cost_kept, "cost_total": vote.cost_total,
            "input_size": list(input_size), "channels": record}
    return MaskSet(masks, meta, task_masks)


def channel_table(model: nn.Module, masks: MaskSet) -> str:
    """Per layer, the output and input channels kept, and the model's parameters (all of
    them: weights, biases, norms) and FLOPs at the crop before and after (``dsparse prune``);
    ``model`` is the dense model the masks were made for."""
    model = unwrap_model(model)
    meta = masks.meta
    record = meta["channels"]
    outs = {layer: (len(e["kept"]), e["channels"]) for e in record.values() for layer in e["producers"]}
    ins = {layer: (len(e["kept"]), e["channels"]) for e in record.values() for layer in e["consumers"]}
    lines = ["| layer | output channels kept | input channels kept |", "|---|---|---|"]
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            out, inp = outs.get(name), ins.get(name)
            lines.append(f"| {name} | {out[0]} / {out[1]} | " + (f"{inp[0]} / {inp[1]} |" if inp else "all |"))
    weight = next(model.parameters())
    example = torch.zeros(1, 3, *meta["input_size"], device=weight.device, dtype=weight.dtype)
    flops = ChannelCost.of(model, example, "flops")
    groups = channel_groups_of(record)
    kept = {name: len(entry["kept"]) for name, entry in record.items()}
    dense_params = sum(p.numel() for p in model.parameters())
    removed = dense_params - sum(p.numel() for p in shrink_model(copy.deepcopy(model), record).parameters())
    before, after = flops.total({}, groups), flops.total(kept, groups)
    lines += ["", f"parameters: {dense_params:,} -> {dense_params - removed:,} "
              f"({100 * removed / dense_params:.1f}% removed); FLOPs at {meta['input_size'][0]}x{meta['input_size'][1]}: "
              f"{before:,} -> {after:,} ({100 * (1 - after / before):.1f}% removed)"]
    return "\n".join(lines)


def channel_groups_of(record: dict) -> list[ChannelGroup]:
    """The groups of a mask set's channel record."""
    return [ChannelGroup(name, entry["channels"], tuple(entry["producers"]), tuple(entry["consumers"]),
                         tuple(entry["norms"]), frozenset(entry["users"]), entry["fixed"])
            for name, entry in record.items()]
