"""Task extraction: a trained multitask run cut down to the tasks one device needs.

    dsparse export RUN --tasks seg,depth --out seg_depth.dsparse.pt   # or --format onnx

The other tasks' heads go, and so do the branches only they use (a branched model). Under
channel masks the channel vote is also re-run without the dropped tasks' votes
(``revote``): a shared channel that only a dropped task kept goes too, so the model gets
smaller again. Every kept task still reads that channel's downstream layers, so re-voting
changes the kept tasks' outputs where such channels were (fine-tune, or keep them with
``revote=False``, which leaves the kept tasks' outputs exactly as they were). Each task's
channel choice comes from the mask set's per-task masks (``MaskSet.task_masks``), which
include every group's floor, so no group ends up empty.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from dsparse.config import RunConfig
from dsparse.models import unwrap_model
from dsparse.sparsity.channel.shrink import channel_element_masks, shrink_model
from dsparse.sparsity.channel.vote import round_up
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.saliency import JOINT
from dsparse.tasks import Task

__all__ = ["ExtractedRun", "extract_tasks", "rename", "select_tasks"]


@dataclass
class ExtractedRun:
    model: nn.Module
    config: RunConfig
    masks: MaskSet | None
    tasks: dict[str, Task]
    renamed: dict[str, str]
    """Old module FQN -> new one, for the modules that remain (branch indices may shift)."""


def extract_tasks(model: nn.Module, config: RunConfig, masks: MaskSet | None, tasks: dict[str, Task],
                  keep: list[str], *, revote: bool = True) -> ExtractedRun:
    """Cut a restored run (``dsparse.runs.restore.restore_run``) down to the tasks ``keep``,
    in place on ``model``.

    Raises:
        ValueError: a task the run does not have, or no task.
    """
    keep = list(dict.fromkeys(keep))
    unknown = [t for t in keep if t not in tasks]
    if unknown or not keep:
        raise ValueError(f"--tasks names {', '.join(unknown) or 'no task'}, which the run does not have; it has "
                         f"{', '.join(tasks)}")
    inner = unwrap_model(model)
    renamed = select_tasks(inner, keep)
    config = copy.deepcopy(config)
    config.tasks = [t for t in config.tasks if t in keep]
    config.task_weights = {t: w for t, w in config.task_weights.items() if t in keep}
    if config.model.branches is not None:
        groups = [[t for t in group if t in keep] for group in config.model.branches]
        config.model.branches = [group for group in groups if group]
    if masks is not None:
        masks = _renamed_masks(masks, renamed, keep)
        if masks.meta.get("granularity") == "channel" and revote:
            masks = _revote(inner, masks, keep)
    return ExtractedRun(model, config, masks, {t: tasks[t] for t in tasks if t in keep}, renamed)


def select_tasks(model: nn.Module, keep: list[str]) -> dict[str, str]:
    """Keep only the heads (and branches) of ``keep`` on ``model``, in place, and return the
    old FQN -> new FQN of every module that remains.

    The old modules are held until the new names are read: a module freed by the selection
    could otherwise hand its ``id`` to a container the selection creates, and a dropped
    module's name would map onto it.
    """
    before = list(model.named_modules())
    model.select_tasks(keep)
    after = {id(module): name for name, module in model.named_modules()}
    return {name: after[id(module)] for name, module in before if id(module) in after}


def rename(fqn: str, renamed: dict[str, str]) -> str | None:
    """A parameter or module FQN after extraction, None if its module went."""
    module, _, leaf = fqn.rpartition(".")
    for candidate, suffix in ((fqn, ""), (module, f".{leaf}")):
        if candidate in renamed:
            return renamed[candidate] + suffix
    return None


def _renamed_masks(masks: MaskSet, renamed: dict[str, str], keep: list[str]) -> MaskSet:
    kept = {new: mask for fqn, mask in masks.masks.items() if (new := rename(fqn, renamed)) is not None}
    task_masks = None if masks.task_masks is None else {
        task: {rename(fqn, renamed): mask for fqn, mask in per.items() if rename(fqn, renamed) is not None}
        for task, per in masks.task_masks.items() if task in keep}
    meta = {**masks.meta, "extracted_tasks": keep}
    if "channels" in meta:
        record = {}
        for entry in meta["channels"].values():
            roles = {role: [new for layer in entry[role] if (new := rename(layer, renamed)) is not None]
                     for role in ("producers", "consumers", "norms")}
            if roles["producers"]:
                users = entry["users"] if JOINT in entry["users"] else sorted(set(entry["users"]) & set(keep))
                record[roles["producers"][0]] = {**entry, **roles, "users": users}
        meta["channels"] = record
    return MaskSet(kept, meta, task_masks)


def _revote(model: nn.Module, masks: MaskSet, keep: list[str]) -> MaskSet:
    """Keep, in every voted group, only the channels some kept task keeps (its per-task
    mask), and shrink the (already smaller) model to them."""
    record, task_masks = masks.meta["channels"], masks.task_masks or {}
    multiple = masks.meta.get("channel_multiple", 1)
    relative, updated = {}, {}
    for name, entry in record.items():
        old = torch.tensor(entry["kept"], dtype=torch.long)
        was_kept = torch.zeros(entry["channels"], dtype=torch.bool)
        was_kept[old] = True
        new = torch.zeros(entry["channels"], dtype=torch.bool)
        voters = [t for t in entry["users"] if t in task_masks] if not entry["fixed"] else []
        for task in voters:
            new |= _task_channels(entry, task_masks[task])
        new &= was_kept
        if not voters or not bool(new.any()):  # fixed, an entangled baseline's, or nothing to re-vote
            new = was_kept
        elif "order" in entry:  # rounded up again, from the channels the model still has
            new = round_up(new, [c for c in entry["order"] if was_kept[c]], multiple)
        new_kept = [int(i) for i in old if new[i]]
        positions = [index for index, channel in enumerate(old.tolist()) if new[channel]]
        relative[name] = {**entry, "channels": len(old), "kept": positions}
        updated[name] = {**entry, "kept": new_kept}
    shrink_model(model, relative)
    meta = {**masks.meta, "channels": updated, "revoted": True}
    element = channel_element_masks(masks.masks, updated)
    meta["num_kept"] = sum(int(m.sum()) for m in element.values())
    meta["num_total"] = sum(m.numel() for m in element.values())
    meta["sparsity_achieved"] = 1 - meta["num_kept"] / meta["num_total"]
    return MaskSet(element, meta, {t: per for t, per in task_masks.items() if t in keep})


def _task_channels(entry: dict, task_masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The channels of one group a task keeps, read off its per-task element masks: the
    output rows of a producer it uses, else the input slices of a consumer."""
    for layer in entry["producers"]:
        if (mask := task_masks.get(f"{layer}.weight")) is not None:
            return mask.reshape(mask.shape[0], -1).any(1)
    for layer in entry["consumers"]:
        if (mask := task_masks.get(f"{layer}.weight")) is not None:
            return mask.transpose(0, 1).reshape(mask.shape[1], -1).any(1)
    return torch.zeros(entry["channels"], dtype=torch.bool)
