"""``prune``: masks for a model at an exact sparsity, by any static method (the library
core of ``dsparse prune``; ``dsparse.train.sparsify.prune_run`` runs it on a run config).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.methods import require_static
from dsparse.tasks import Task

__all__ = ["prune"]


def prune(model: torch.nn.Module, tasks: dict[str, Task], batches: Iterable[dict] | None, *, method: str,
          sparsity: float, criterion: str | None = None, num_batches: int = 50, scope: str = "global",
          keep_first_dense: bool = False, task_weights: dict[str, float] | None = None, seed: int = 0,
          pretrained: bool = False, granularity: str = "element", block: int = 32,
          min_density: float | None = None) -> MaskSet:
    """Masks for ``model`` at exactly ``sparsity``, identical on every rank.

    Args:
        model: the multitask model (plain or wrapped), with the weights to score.
        tasks: the run's tasks, in the run's order.
        batches: this rank's training batches (ignored by data-free criteria).
        method: a static method of ``METHODS``.
        sparsity: fraction of prunable weights to prune, in (0, 1).
        criterion: DiSparse's per-task saliency; baselines fix their own.
        num_batches: batches to accumulate saliency over, per rank.
        scope: ``global`` or ``layerwise`` ranking.
        keep_first_dense: keep the stem convolution dense.
        task_weights: loss weights for the joint loss of the SNIP baseline.
        seed: seed of the random criterion.
        pretrained: the weights are trained (picks ``grad_w2`` as DiSparse's default).
        granularity: ``element`` or ``block`` (score, vote and prune ``block x block``
            tiles of each weight's GEMM view; sparsity exact to the block).
        block: the block side for ``granularity="block"``: 16, 32 or 64.
        min_density: the floors: every layer (element masks) or block row (block masks)
            keeps at least this fraction of its weights or blocks, at least one; 0 = no
            floors; None = ``MIN_DENSITY`` of the granularity.

    Raises:
        ValueError: unknown method/criterion, criterion given to a baseline, a dynamic
            method, bad sparsity, too few batches.
    """
    return require_static(method).masks(model, tasks, batches, sparsity=sparsity, criterion=criterion, num_batches=num_batches,
                      scope=scope, keep_first_dense=keep_first_dense, task_weights=task_weights, seed=seed,
                      pretrained=pretrained, granularity=granularity, block=block, min_density=min_density)
