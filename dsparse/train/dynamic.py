"""Dynamic sparse training inside the training loop: DiSparse dynamic, RigL and SET.

Every ``interval`` steps until ``end``: drop the weakest active weights of each layer,
regrow as many where the tasks' dense gradients point (DiSparse: the union of per-task
nominations; RigL: the joint-loss gradient; SET: at random), zero the changed positions'
weights and optimizer state wherever DeepSpeed keeps them, and check that every rank holds
the same masks. Masks change in place: no model copy, no optimizer or scheduler rebuild.
"""

from __future__ import annotations

import torch

from dsparse.config import RunConfig
from dsparse.models import parameter_users, prunable_parameters, unwrap_model
from dsparse.sparsity.dynamic import DynamicSchedule, update_layer_masks
from dsparse.sparsity.enforce import MaskEnforcer
from dsparse.sparsity.erk import erk_counts, random_masks
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.optim_state import zero_positions_
from dsparse.sparsity.prune import JOINT, Method, first_conv, verify_masks_agree
from dsparse.sparsity.saliency import all_reduce_scores, compute_saliency, normalize_scores
from dsparse.tasks import Task


def initial_dynamic_masks(config: RunConfig, model: torch.nn.Module, method: Method) -> MaskSet:
    """Random masks at the ERK layer densities of the global target (same on every rank)."""
    sparsity = config.sparsity
    weights = prunable_parameters(unwrap_model(model))
    keep_dense = True if sparsity.keep_first_dense is None else sparsity.keep_first_dense
    dense = [first_conv(model)] if keep_dense else []
    counts = erk_counts({n: w.shape for n, w in weights.items()}, 1.0 - sparsity.target, power=sparsity.erk_power,
                        dense=dense)
    masks = random_masks({n: w.shape for n, w in weights.items()}, counts, seed=config.seed)
    num_total = sum(w.numel() for w in weights.values())
    num_kept = sum(int(m.sum()) for m in masks.values())
    meta = {"method": method.name, "criterion": "grad", "scope": "erk", "sparsity_requested": sparsity.target,
            "sparsity_achieved": 1.0 - num_kept / num_total, "keep_ratio": num_kept / num_total,
            "dense_layers": dense, "num_kept": num_kept, "num_total": num_total, "erk_counts": counts,
            "num_updates": 0}
    return MaskSet(masks={n: m.to(w.device) for (n, m), w in zip(masks.items(), weights.values())}, meta=meta)


def schedule_of(config: RunConfig) -> DynamicSchedule:
    sparsity = config.sparsity
    return DynamicSchedule(interval=sparsity.interval, end=sparsity.end, alpha0=sparsity.alpha0,
                           total_steps=config.train.iterations)


class DynamicMasks:
    """Owns the mask updates of one run; call :meth:`maybe_update` after every optimizer step."""

    def __init__(self, engine, tasks: dict[str, Task], masks: MaskSet, enforcer: MaskEnforcer, method: Method,
                 schedule: DynamicSchedule, seed: int):
        self.engine, self.tasks, self.masks, self.enforcer = engine, tasks, masks, enforcer
        self.method, self.schedule, self.seed = method, schedule, seed
        weights = prunable_parameters(engine.module)
        if method.grow == "votes":
            users = parameter_users(engine.module)
            self.users = {name: users[name] for name in weights}
        else:
            self.users = {name: frozenset({JOINT}) for name in weights}
        self.dense = set(masks.meta.get("dense_layers", []))

    def _growth_scores(self, batches: list[dict]):
        if self.method.grow == "random":
            return {}
        with self.enforcer.dense_gradients():
            scores = compute_saliency(self.engine.module, self.tasks, batches, criterion="grad",
                                      num_batches=len(batches), joint=self.method.grow == "gradient")
        return normalize_scores(all_reduce_scores(scores))

    def maybe_update(self, step: int, batches: list[dict]) -> dict | None:
        """Update the masks if ``step`` (finished optimizer steps) is an update step.

        ``batches`` are this rank's batches to score growth on (the trainer passes the
        step's batch); their per-task gradient magnitudes are summed over ranks.

        Returns:
            Statistics for logging (dropped/grown per layer and per task, densities), or None.
        """
        if not self.schedule.is_update_step(step):
            return None
        weights = prunable_parameters(self.engine.module)
        sparse = [name for name in weights if name not in self.dense]
        scores = self._growth_scores(batches)
        old = {name: self.masks.masks[name] for name in sparse}
        new, stats = update_layer_masks(
            {name: weights[name].detach() for name in sparse}, old,
            {task: {n: s for n, s in per.items() if n in old} for task, per in scores.items()},
            {name: self.users[name] for name in sparse}, self.schedule.drop_fraction(step),
            grow=self.method.grow, seed=self.seed, update_index=step)
        for name in sparse:
            # dropped weights go to zero; grown ones (also those dropped and regrown at once)
            # restart from zero weight and zero optimizer state
            reset = old[name] & ~new[name]
            if name in stats.grown_masks:
                reset = reset | stats.grown_masks[name]
            if reset.any():
                zero_positions_(weights[name], reset, self.engine.optimizer)
            self.masks.masks[name] = new[name]
        self.enforcer.refresh()
        self.masks.meta["num_updates"] = self.masks.meta.get("num_updates", 0) + 1
        verify_masks_agree(self.masks)
        return self._report(stats)

    def _report(self, stats) -> dict:
        report = {"sparsity/dropped": sum(stats.dropped.values()), "sparsity/grown": sum(stats.grown.values())}
        for per_task in stats.grown_per_task.values():  # layer -> task -> count
            for task, count in per_task.items():
                report[f"sparsity/grown_by/{task}"] = report.get(f"sparsity/grown_by/{task}", 0) + count
        report.update({f"density/{name}": value for name, value in self.layer_densities().items()})
        return report

    def layer_densities(self) -> dict[str, float]:
        return {name: float(mask.float().mean()) for name, mask in self.masks.masks.items()}
