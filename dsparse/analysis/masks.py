"""What the per-task masks say about a multitask network (docs/design.md, "Mask analysis").

Before the vote each task keeps its own mask ``K_t``. Where two tasks keep largely the same
weights of a layer they want the same features from it; where that overlap falls away the
tasks diverge. DiSparse's paper reads this as the *watershed*: the layer along the trunk
where task relatedness drops most sharply, a natural point to stop sharing.

``analyze_masks`` turns one ``MaskSet`` into that picture: per layer (forward order) the IoU
of every task pair's keep masks, the final mask's density, and the watershed.

The watershed rule: over the layers that at least two tasks use, in forward (module) order,
take the mean IoU over the task pairs that use each layer. Split that sequence into an
earlier and a later part, each fitted by its own mean, where the squared error is least (a
least-squares change point): the watershed is the first layer of the later part, and the
drop is the earlier part's mean minus the later part's. Only splits where agreement falls
count (a rise or a flat line has no watershed); ties go to the earlier split. Layers kept
dense by the method (every task keeps all of them, IoU 1 by construction) are left out.

Why not the largest drop between two consecutive layers: module order interleaves layers
that run in parallel (a ResNet block's 1x1 shortcut sits between its convolutions and the
next block's), and a shortcut's IoU can be far above its neighbours', so the raw drop after
it wins although agreement fell gradually before. A change point weighs every layer once
and cannot be moved by one outlier.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from dsparse.sparsity.criteria import CRITERIA, needs_data
from dsparse.sparsity.masks import MaskSet

Pair = tuple[str, str]


@dataclass
class MaskAnalysis:
    """Per-layer task agreement and density of one mask set.

    Attributes:
        tasks: the tasks with masks, in the mask set's order.
        layers: every masked layer, in forward (module) order.
        density: layer -> kept fraction of the final (voted) mask.
        iou: layer -> task pair -> IoU of the pair's keep masks, for the layers both use.
        watershed: the first layer after the change point of mean IoU, or None.
        watershed_drop: mean IoU of the layers before it minus that of the layers from it on.
    """

    tasks: list[str]
    layers: list[str]
    density: dict[str, float]
    iou: dict[str, dict[Pair, float]]
    watershed: str | None = None
    watershed_drop: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def pairs(self) -> list[Pair]:
        return list(itertools.combinations(self.tasks, 2))

    @property
    def shared_layers(self) -> list[str]:
        """Layers at least two tasks use (where an IoU exists), in forward order."""
        return [layer for layer in self.layers if self.iou.get(layer)]

    def mean_iou(self, layer: str) -> float:
        values = list(self.iou.get(layer, {}).values())
        return sum(values) / len(values) if values else math.nan

    def pair_iou_matrix(self, layers: list[str] | None = None) -> dict[Pair, float]:
        """Mean IoU of every pair over ``layers`` (default: all shared ones) it uses."""
        layers = self.shared_layers if layers is None else layers
        result = {}
        for pair in self.pairs:
            values = [self.iou[layer][pair] for layer in layers if pair in self.iou.get(layer, {})]
            result[pair] = sum(values) / len(values) if values else math.nan
        return result

    def rows(self) -> list[dict]:
        """One CSV row per layer: index, layer, density, mean IoU and each pair's IoU."""
        rows = []
        for index, layer in enumerate(self.layers):
            row = {"index": index, "layer": layer, "density": self.density[layer],
                   "mean_iou": self.mean_iou(layer), "watershed": layer == self.watershed}
            row.update({f"iou/{a}-{b}": self.iou.get(layer, {}).get((a, b), math.nan) for a, b in self.pairs})
            rows.append(row)
        return rows


def analyze_masks(masks: MaskSet) -> MaskAnalysis:
    """IoU per task pair and layer, density per layer and the watershed of ``masks``.

    Works on element and block masks alike (block masks are stored expanded to elements, so
    an IoU counts weights, and whole blocks weigh by their size).

    Raises:
        ValueError: if the set has no per-task masks (baselines and masks written by code
            older than the analysis keep none), or fewer than two tasks.
    """
    if not masks.task_masks:
        raise ValueError("these masks hold no per-task masks (a baseline's single joint ranking, or a dense run); "
                         "analyze masks of a DiSparse run (static: its mask file; dynamic: its checkpoints)")
    if len(masks.task_masks) < 2:
        raise ValueError(f"mask analysis compares tasks, but these masks have one task: {list(masks.task_masks)}")
    criterion = masks.meta.get("criterion")
    if criterion in CRITERIA and not needs_data(criterion):
        raise ValueError(f"these masks were scored by {criterion!r}, which gives every task the same score: their "
                         "per-task masks differ only by which weights each task uses, so their IoU says nothing "
                         "about how related the tasks are; analyse masks scored from data (snip, grad_w2)")
    density = {fqn: _density(mask) for fqn, mask in masks.masks.items()}
    dense = set(masks.meta.get("dense_layers") or ())
    iou = {fqn: pairs for fqn, pairs in masks.task_mask_iou().items() if fqn not in dense}
    analysis = MaskAnalysis(list(masks.task_masks), list(masks.masks), density, iou,
                            meta={k: masks.meta.get(k) for k in ("method", "criterion", "sparsity_achieved",
                                                                 "granularity", "block")})
    analysis.watershed, analysis.watershed_drop = find_watershed(analysis)
    return analysis


def find_watershed(analysis: MaskAnalysis) -> tuple[str | None, float | None]:
    """The least-squares change point of the shared layers' mean IoU (see the module docstring)."""
    shared = analysis.shared_layers
    values = [analysis.mean_iou(layer) for layer in shared]
    best, best_error, best_drop = None, math.inf, None
    for split in range(1, len(values)):
        before, after = values[:split], values[split:]
        mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
        error = sum((v - mean_before) ** 2 for v in before) + sum((v - mean_after) ** 2 for v in after)
        if mean_before > mean_after and error < best_error - 1e-12:
            best, best_error, best_drop = shared[split], error, mean_before - mean_after
    return best, best_drop


def _density(mask: torch.Tensor) -> float:
    return int(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 1.0
