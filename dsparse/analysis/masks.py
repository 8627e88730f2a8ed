"""What the per-task masks say about a multitask network (DESIGN.md section 7).

Before the vote each task keeps its own mask ``K_t``. Where two tasks keep largely the same
weights of a layer they want the same features from it; where that overlap falls away the
tasks diverge. DiSparse's paper reads this as the *watershed*: the layer along the trunk
where task relatedness drops most sharply, a natural point to stop sharing.

``analyze_masks`` turns one ``MaskSet`` into that picture: per layer (forward order) the IoU
of every task pair's keep masks, the final mask's density, and the watershed.

The watershed rule: over the layers that at least two tasks use, in forward order, take the
mean IoU over the task pairs that use each layer; the watershed is the layer whose mean IoU
is lowest *relative to the layer before it* (the largest drop ``iou[l-1] - iou[l]``). Ties go
to the earlier layer; with fewer than two such layers there is none.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

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
        watershed: the layer with the sharpest drop of mean IoU, or None.
        watershed_drop: that drop (mean IoU of the layer before minus the watershed's).
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
    density = {fqn: _density(mask) for fqn, mask in masks.masks.items()}
    iou = masks.task_mask_iou()
    analysis = MaskAnalysis(list(masks.task_masks), list(masks.masks), density, iou,
                            meta={k: masks.meta.get(k) for k in ("method", "criterion", "sparsity_achieved",
                                                                 "granularity", "block")})
    analysis.watershed, analysis.watershed_drop = find_watershed(analysis)
    return analysis


def find_watershed(analysis: MaskAnalysis) -> tuple[str | None, float | None]:
    """The shared layer with the largest drop of mean IoU from the shared layer before it."""
    shared = analysis.shared_layers
    best, best_drop = None, None
    for before, layer in zip(shared, shared[1:]):
        drop = analysis.mean_iou(before) - analysis.mean_iou(layer)
        if best_drop is None or drop > best_drop:
            best, best_drop = layer, drop
    return best, best_drop


def _density(mask: torch.Tensor) -> float:
    return int(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 1.0
