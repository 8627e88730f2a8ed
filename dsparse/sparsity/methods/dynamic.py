"""Dynamic sparse training methods: DiSparse dynamic, RigL and SET (docs/design.md,
"Dynamic sparse training").

They start from random masks at Erdos-Renyi-Kernel layer densities and, every
``interval`` steps until ``end``, drop the weakest active weights of each layer and regrow
as many where the method points: DiSparse by the union of per-task nominations of the
dense per-task gradients, RigL by the joint-loss gradient, SET at random. Changed
positions restart from zero weight and zero optimizer state, wherever the optimizer keeps
it, and every rank must end with the same masks. Masks change in place: no model copy, no
optimizer or scheduler rebuild.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from dsparse.models import prunable_parameters, unwrap_model
from dsparse.sparsity.block.geometry import BlockUnits, mask_units
from dsparse.sparsity.block.vote import row_floors
from dsparse.sparsity.dynamic import DynamicSchedule, update_layer_masks
from dsparse.sparsity.erk import erk_counts, random_masks
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.methods.base import MaskInputs, Method, first_conv, register_method, verify_masks_agree
from dsparse.sparsity.saliency import (
    JOINT,
    ScoreSet,
    all_reduce_scores,
    compute_saliency,
    normalize_scores,
    task_gradients,
)
from dsparse.sparsity.vote import layer_floors


class DynamicMethod(Method):
    """ERK random start, then drop by magnitude and regrow by ``grow`` on a schedule."""

    dynamic = True
    takes_masks = False
    starts_from = "random ERK masks"
    criterion = "grad"
    grow: ClassVar[str] = ""
    """How ``update_layer_masks`` regrows: votes | gradient | random."""

    def initial_masks(self, model: torch.nn.Module, inputs: MaskInputs) -> MaskSet:
        """Random masks at the ERK layer densities of the global target (same on every rank).

        With blocks, each layer keeps its ERK density times its number of blocks, rounded
        (within half a block of its ERK count), and the blocks are drawn at random.

        Floors (``sparsity.min_density``): element masks give every layer at least its
        ``layer_floors`` count in the ERK solve; block masks every block row its
        ``row_floors`` blocks, drawn first; ``update`` keeps both.
        """
        self.check(inputs.settings)
        settings = inputs.settings
        weights = prunable_parameters(unwrap_model(model))
        dense = [first_conv(model)] if settings.first_conv_dense(dynamic=True) else []
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        units = mask_units(settings.granularity, settings.block, shapes)
        unit_shapes = {n: units.unit_shape(n, shape) for n, shape in shapes.items()}
        min_density = settings.floor_density()
        per_row = self.row_floors(units, min_density, dense)
        if per_row:  # in elements for ERK: the floor blocks' size at most
            floors = {n: min(math.prod(shapes[n]), c * unit_shapes[n][0] * units.block ** 2) for n, c in per_row.items()}
        else:
            floors = layer_floors({n: math.prod(s) for n, s in shapes.items()}, min_density, dense)
        erk = dict(power=settings.erk_power, dense=dense)
        counts = erk_counts(shapes, 1.0 - settings.target, **erk, floors=floors)
        plain = erk_counts(shapes, 1.0 - settings.target, **erk) if floors else counts
        unit_counts = {n: round(counts[n] / math.prod(shapes[n]) * math.prod(unit_shapes[n])) for n in shapes}
        unit_counts = {n: max(count, per_row.get(n, 0) * unit_shapes[n][0]) for n, count in unit_counts.items()}
        drawn = random_masks(unit_shapes, unit_counts, seed=inputs.seed, row_floors=per_row)
        masks = {n: units.expand(n, mask).to(weights[n].device) for n, mask in drawn.items()}
        num_total = sum(w.numel() for w in weights.values())
        num_kept = sum(int(m.sum()) for m in masks.values())
        meta = {"method": self.name, "criterion": self.criterion, "scope": "erk", "sparsity_requested": settings.target,
                "sparsity_achieved": 1.0 - num_kept / num_total, "keep_ratio": num_kept / num_total,
                "dense_layers": dense, "num_kept": num_kept, "num_total": num_total, "erk_counts": unit_counts,
                "num_updates": 0, "min_density": min_density,
                "layers_at_floor": [n for n in shapes if counts[n] > plain[n]], **units.meta()}
        return MaskSet(masks=masks, meta=meta)

    @staticmethod
    def row_floors(units, min_density: float, dense) -> dict[str, int]:
        """Blocks per block row that every update keeps (block masks only)."""
        return row_floors(units, min_density, dense) if isinstance(units, BlockUnits) else {}

    def schedule(self, inputs: MaskInputs) -> DynamicSchedule:
        settings = inputs.settings
        return DynamicSchedule(interval=settings.interval, end=settings.end, alpha0=settings.alpha0,
                               total_steps=inputs.total_steps)

    def begin_step(self, step: int, batch: dict, state) -> None:
        """On an update step, take what the step's own joint gradient cannot give (before
        the step changes the weights), then record that joint gradient during the step."""
        if self.schedule(state.inputs).is_update_step(step):
            targets = state.applier.start_capture()
            state.capture = {"per_task": self.task_gradients(batch, targets, state)}
            state.applier.arm_capture()

    def task_gradients(self, batch: dict, targets, state) -> dict[str, dict[str, torch.Tensor]]:
        """Gradients the joint one does not determine (none, unless votes need them)."""
        return {}

    def captured_scores(self, joint: dict[str, torch.Tensor], per_task, state) -> ScoreSet:
        """Growth scores from the step's joint gradient: ``|dL/dw|`` of the joint loss."""
        return {JOINT: {name: grad.double().abs() for name, grad in joint.items()}}

    def growth_scores(self, state, batches: list[dict]) -> ScoreSet:
        """Growth scores, summed over ranks and normalised: from the training step's own
        forward and backward when the step was captured, else from a forward and backward
        on this rank's ``batches`` (the Sparsifier used outside a training loop)."""
        if state.capture is not None:
            per_task = state.capture["per_task"]
            joint = state.applier.finish_capture()
            state.capture = None
            if set(joint) != set(state.masks.masks):
                raise RuntimeError("the training step did not backpropagate through every masked weight between "
                                   "Sparsifier.begin_step and Sparsifier.step")
            return normalize_scores(all_reduce_scores(self.captured_scores(joint, per_task, state)))
        joint = self.grow == "gradient"  # RigL: the training loss, weighted as the trainer weighs it
        with state.applier.dense_gradients() as targets:
            scores = compute_saliency(state.model, state.inputs.tasks, batches, criterion=self.criterion,
                                      num_batches=len(batches), joint=joint, weights=targets, users=state.users,
                                      task_weights=dict(state.inputs.task_weights) if joint else None)
        return normalize_scores(all_reduce_scores(scores))

    def growth_users(self, state) -> dict[str, frozenset[str]]:
        return {name: frozenset({JOINT}) for name in state.masks.masks}

    def update(self, step: int, batches: list[dict], state) -> dict | None:
        """Drop and regrow every sparse layer if ``step`` is an update step, in the masks'
        units (weights or blocks: magnitudes and scores are summed per block).

        Returns:
            Statistics for logging (dropped/grown per layer and per task, densities), or None.
        """
        schedule = self.schedule(state.inputs)
        if not schedule.is_update_step(step):
            return None
        masks, units = state.masks, state.units
        dense = set(masks.meta.get("dense_layers", []))
        sparse = [name for name in masks.masks if name not in dense]
        scores = self.growth_scores(state, batches)
        users = self.growth_users(state)
        weights = state.applier.weights()
        old = {name: units.unit_mask(name, masks.masks[name]) for name in sparse}
        new, stats = update_layer_masks(
            {name: units.pool(name, weights[name].abs().float()) for name in sparse}, old,
            {task: {n: units.pool(n, s) for n, s in per.items() if n in old} for task, per in scores.items()},
            {name: users[name] for name in sparse}, schedule.drop_fraction(step),
            grow=self.grow, seed=state.inputs.seed, update_index=step,
            row_floors=self.row_floors(units, masks.meta.get("min_density") or 0.0, dense))
        # dropped weights go to zero; grown ones (also those dropped and regrown at once)
        # restart from zero weight and zero optimizer state
        reset = {name: units.expand(name, (old[name] & ~new[name]) | stats.grown_masks[name]) for name in sparse}
        state.applier.update({name: units.expand(name, new[name]) for name in sparse}, reset, state.optimizer)
        if stats.nominations:  # each task's wish at this update, kept with the masks for `dsparse analyze`
            masks.task_masks = {task: {name: units.expand(name, wish) for name, wish in per.items()}
                                for task, per in stats.nominations.items()}
        num_kept, num_total = masks.num_kept, masks.num_total  # blocks of unequal size move
        masks.meta.update(num_updates=masks.meta.get("num_updates", 0) + 1, num_kept=num_kept,
                          keep_ratio=num_kept / num_total, sparsity_achieved=1.0 - num_kept / num_total)
        verify_masks_agree(masks)
        return self._report(stats, masks)

    def _report(self, stats, masks: MaskSet) -> dict:
        report = {"sparsity/dropped": sum(stats.dropped.values()), "sparsity/grown": sum(stats.grown.values())}
        for per_task in stats.grown_per_task.values():  # layer -> task -> count
            for task, count in per_task.items():
                report[f"sparsity/grown_by/{task}"] = report.get(f"sparsity/grown_by/{task}", 0) + count
        report.update({f"density/{name}": value for name, value in layer_densities(masks).items()})
        if stats.nominations:
            report.update(nomination_iou(masks))
        return report

    def summary(self, state) -> dict:
        return {"num_updates": state.masks.meta.get("num_updates", 0), "layer_density": layer_densities(state.masks)}


def derived_task(inputs: MaskInputs, targets: dict[str, torch.Tensor]) -> str | None:
    """The task whose gradient on shared weights is derived from the joint one: the one with
    the largest loss weight (the last such in task order), which keeps the float32 rounding
    of the joint gradient smallest relative to that task's own gradient. None (every task
    computed directly) when the weights are in bf16/fp16, whose rounding would swamp it."""
    if any(t.dtype not in (torch.float32, torch.float64) for t in targets.values()):
        return None
    tasks = list(inputs.tasks)
    weights = [float(inputs.task_weights.get(t, 1.0)) for t in tasks]
    return max(reversed(tasks), key=lambda t: weights[tasks.index(t)])


def nomination_iou(masks: MaskSet) -> dict[str, float]:
    """``sparsity/task_iou/<a>-<b>``: the mean over layers of the IoU of two tasks' nominations at
    the latest update, i.e. how much the tasks agree on where to grow (over training, in
    MLflow; per layer with ``dsparse analyze``)."""
    sums: dict[tuple[str, str], list[float]] = {}
    for pairs in masks.task_mask_iou().values():
        for pair, value in pairs.items():
            sums.setdefault(pair, []).append(value)
    return {f"sparsity/task_iou/{a}-{b}": sum(values) / len(values) for (a, b), values in sums.items()}


def layer_densities(masks: MaskSet) -> dict[str, float]:
    return {name: float(mask.float().mean()) for name, mask in masks.masks.items()}


@register_method("disparse_dynamic")
class DiSparseDynamic(DynamicMethod):
    """Regrow where any user task's own gradient nominates (the union), trimmed to ERK."""

    grow = "votes"

    def growth_users(self, state) -> dict[str, frozenset[str]]:
        return state.users

    def task_gradients(self, batch: dict, targets, state) -> dict[str, dict[str, torch.Tensor]]:
        """Every task but the last, on the shared weights it uses: one forward of the plain
        model (DeepSpeed's engine must see only its own backward) and one backward per task.
        Heads and the last task follow from the step's joint gradient."""
        derived = derived_task(state.inputs, targets)
        wanted = {task: {n: targets[n] for n in targets if task in state.users[n] and len(state.users[n]) > 1}
                  for task in state.inputs.tasks if task != derived}
        return task_gradients(state.model, state.inputs.tasks, batch, {t: w for t, w in wanted.items() if w})

    def captured_scores(self, joint: dict[str, torch.Tensor], per_task, state) -> ScoreSet:
        """``|dL_t/dw|`` per task: a weight with one user takes the joint gradient over that
        task's loss weight; on shared weights one task's (``derived_task``) is the joint
        gradient minus the others' (in float64), the others' were computed directly."""
        tasks = list(state.inputs.tasks)
        weight = {t: float(state.inputs.task_weights.get(t, 1.0)) for t in tasks}
        last = next((t for t in tasks if t not in per_task and any(
            t in state.users[n] and len(state.users[n]) > 1 for n in joint)), None)
        scores: ScoreSet = {t: {} for t in tasks}
        for name, grad in joint.items():
            users = [t for t in tasks if t in state.users[name]]
            remainder = grad.double()
            for task in users:
                if len(users) == 1:
                    scores[task][name] = (remainder / weight[task]).abs()
                elif task != last:
                    own = per_task[task][name]
                    scores[task][name] = own.abs()
                    remainder = remainder - weight[task] * own
            if len(users) > 1 and last in users:
                scores[last][name] = (remainder / weight[last]).abs()
        return {t: scores[t] for t in tasks if scores[t]}


@register_method("rigl")
class RigL(DynamicMethod):
    """Regrow by the dense gradient of the joint loss."""

    grow = "gradient"


@register_method("set")
class SET(DynamicMethod):
    """Regrow at random."""

    grow = "random"

    def begin_step(self, step: int, batch: dict, state) -> None:
        """Random growth needs no gradient."""

    def growth_scores(self, state, batches: list[dict]) -> ScoreSet:
        return {}
