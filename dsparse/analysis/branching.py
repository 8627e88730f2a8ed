"""From the watershed to an architecture: share the trunk up to where tasks stop agreeing,
then give each task group its own copy of the later stages.

Groups come from clustering the tasks by their mask IoU in the layers from the watershed
on: average linkage, merging the two most similar groups (highest mean pairwise IoU) until
``num_groups`` remain; ties go to the pair met first in task order. The branch point is the
trunk stage that holds the watershed layer (a stem watershed branches from ``layer1``,
since the stem is shared by construction).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from dsparse.analysis.masks import MaskAnalysis
from dsparse.config import RunConfig

BRANCHABLE = ("layer1", "layer2", "layer3", "layer4")
log = logging.getLogger("dsparse.analysis")


@dataclass
class BranchPlan:
    """Where to branch and which tasks share a branch, and why."""

    branch_from: str
    groups: list[list[str]]
    watershed: str
    group_iou: dict[str, float]
    """``a-b`` -> mean IoU of the pair from the watershed on (what the grouping used)."""


def stage_of(layer: str) -> str:
    """The trunk stage of a layer FQN (``trunk.layer3.0.conv1.weight`` -> ``layer3``;
    ``shared.``/``branches.N.`` prefixes of branched models are read the same way)."""
    for part in layer.split("."):
        if part == "stem" or part in BRANCHABLE:
            return part
    raise ValueError(f"layer {layer!r} is not in a ResNet trunk stage (stem, layer1..layer4); --branch needs the "
                     "watershed inside the trunk")


def group_tasks(tasks: list[str], similarity: dict[tuple[str, str], float], num_groups: int) -> list[list[str]]:
    """Average-linkage clustering of ``tasks`` into ``num_groups`` groups by pairwise
    ``similarity`` (IoU); a pair without a value counts as 0. Groups and their members
    follow task order."""
    if not 1 <= num_groups <= len(tasks):
        raise ValueError(f"--groups must be between 1 and the number of tasks ({len(tasks)}), got {num_groups}")

    def value(a: str, b: str) -> float:
        found = similarity.get((a, b), similarity.get((b, a), 0.0))
        return 0.0 if found is None or math.isnan(found) else found

    groups = [[task] for task in tasks]
    while len(groups) > num_groups:
        best, best_value = None, -math.inf
        for i, j in itertools.combinations(range(len(groups)), 2):
            linkage = sum(value(a, b) for a in groups[i] for b in groups[j]) / (len(groups[i]) * len(groups[j]))
            if linkage > best_value:
                best, best_value = (i, j), linkage
        i, j = best
        groups[i] = sorted(groups[i] + groups[j], key=tasks.index)
        del groups[j]
    return groups


def plan_branches(analysis: MaskAnalysis, num_groups: int | None = None) -> BranchPlan:
    """Branch point and task groups from a mask analysis (default: one branch per task).

    Raises:
        ValueError: if the analysis has no watershed or it lies outside the trunk stages.
    """
    if analysis.watershed is None:
        raise ValueError("no watershed: fewer than two layers are shared by two tasks, so there is nothing to branch")
    stage = stage_of(analysis.watershed)
    branch_from = "layer1" if stage == "stem" else stage
    shared = analysis.shared_layers
    after = shared[shared.index(analysis.watershed):]
    similarity = analysis.pair_iou_matrix(after)
    groups = group_tasks(analysis.tasks, similarity, num_groups or len(analysis.tasks))
    return BranchPlan(branch_from, groups, analysis.watershed,
                      {f"{a}-{b}": None if math.isnan(v) else v for (a, b), v in similarity.items()})


def branched_config(config: RunConfig, plan: BranchPlan, *, same_params: bool = False,
                    task_channels: dict[str, int] | None = None) -> RunConfig:
    """``config`` with the model branched as ``plan`` says and its own output directory.

    With ``same_params`` the trunk width is lowered to the widest whose branched network has
    no more parameters than ``config``'s shared one (needs ``task_channels``), so the two
    compare at the same size and sparsity.

    Raises:
        ValueError: if the plan's tasks differ from the config's, or no width fits.
    """
    if sorted(t for g in plan.groups for t in g) != sorted(config.tasks):
        raise ValueError(f"the masks' tasks {sorted(t for g in plan.groups for t in g)} differ from the run config's "
                         f"{sorted(config.tasks)}; analyse masks made for this config")
    if config.sparsity.masks is not None and config.sparsity.method is None:
        raise ValueError(f"the analysed run trained with the mask file {config.sparsity.masks}, which fits the shared "
                         "model only; set sparsity.method in the config (--config) so the branched model is pruned "
                         "anew")
    branched = copy.deepcopy(config)
    branched.model.branches = [list(group) for group in plan.groups]
    branched.model.branch_from = plan.branch_from
    branched.sparsity.masks = None  # masks and trained weights of the shared model do not fit the branched one
    if branched.sparsity.from_checkpoint is not None:
        log.warning("the branched model trains from scratch: the shared model's weights (%s) do not fit it",
                    branched.sparsity.from_checkpoint)
        branched.sparsity.from_checkpoint = None
    run = Path(config.output_dir)
    # beside the run; a sweep trial's goes beside the sweep's trials, never among them
    branched.output_dir = str(run.parent.parent / "branched" / run.name if run.parent.name == "trials"
                              else run.with_name(run.name + "-branched"))
    # a new run: never log into the analysed run's MLflow run (or its sweep's)
    branched.tracking.run_id = branched.tracking.parent_run_id = branched.tracking.run_name = None
    if same_params:
        if task_channels is None:
            raise ValueError("same_params needs the tasks' output channels (task_channels)")
        branched.model.base_width = matching_width(config, branched, task_channels)
    return branched


def count_parameters(config: RunConfig, task_channels: dict[str, int]) -> int:
    from dsparse.runs.components import build_configured_model

    return sum(p.numel() for p in build_configured_model(config.model, task_channels).parameters())


def matching_width(shared: RunConfig, branched: RunConfig, task_channels: dict[str, int]) -> int:
    """The largest trunk width whose branched model has at most the shared model's parameters."""
    budget = count_parameters(shared, task_channels)
    trial = copy.deepcopy(branched)
    for width in range(shared.model.base_width, 0, -1):
        trial.model.base_width = width
        if count_parameters(trial, task_channels) <= budget:
            return width
    raise ValueError("no trunk width gives the branched model as few parameters as the shared one")
