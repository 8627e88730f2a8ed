"""The unanimous vote on blocks, exact to the block (docs/design.md, "The unanimous vote" and
"Block granularity and kernels").

Each task's score of a block is the sum of its element scores (normalised per task
before pooling, so pooling keeps every task's scores summing to 1). The vote then runs
on blocks exactly as on weights. Sparsity still counts *elements*: blocks of a weight
whose dimensions are not multiples of ``B`` hold fewer elements, so the number of kept
blocks is searched for. The vote's kept sets are nested in the number kept, so the
element count grows with it; the search (bisection over the block count, one vote on
blocks per step) keeps the block count whose element count is closest to
``round((1 - sparsity) * num_elements)``, the smaller one on a tie. The achieved
sparsity is therefore exact to one block.

Floors. Every block row of a voted layer keeps at least ``row_floors`` blocks (by default
one): its best by the vote restricted to the row (``pick_floors``), so every output
channel of every layer, and hence every task's own head, keeps a connection. The floors
are picked once and held by every vote of the search, whose kept sets stay nested.
"""

from __future__ import annotations

import math

import torch

from dsparse.sparsity.block.geometry import BlockUnits
from dsparse.sparsity.vote import VoteResult, _check_sparsity, layer_floors, pick_floors, solve_vote

__all__ = ["BlockVote", "row_floors", "solve_block_vote"]


def row_floors(units: BlockUnits, min_density: float, dense=()) -> dict[str, int]:
    """FQN -> the fewest blocks each block row keeps: ``ceil(min_density * blocks per row)``,
    at least one (none when ``min_density`` is 0; dense layers keep all anyway)."""
    return layer_floors({fqn: grid.grid[1] for fqn, grid in units.grids.items()}, min_density, dense)


class BlockVote:
    """A block vote's outcome in elements: masks and task masks of the weights' shapes."""

    def __init__(self, result: VoteResult, units: BlockUnits):
        self.result = result
        self.masks = {fqn: units.expand(fqn, mask) for fqn, mask in result.masks.items()}
        self.task_masks = {task: {fqn: units.expand(fqn, mask) for fqn, mask in per.items()}
                           for task, per in result.task_masks.items()}
        self.num_kept = sum(int(mask.sum()) for mask in self.masks.values())
        self.num_total = sum(mask.numel() for mask in self.masks.values())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.num_kept / self.num_total


def solve_block_vote(scores: dict[str, dict[str, torch.Tensor]], users: dict[str, frozenset[str]],
                     units: BlockUnits, *, sparsity: float, scope: str = "global", dense=(),
                     floors: dict[str, int] | None = None) -> BlockVote:
    """Vote on blocks and keep the block count whose elements best match ``sparsity``.

    Args:
        scores: task -> FQN -> element scores (normalised per task), as for ``solve_vote``.
        users: FQN -> tasks using the weight.
        units: the block tiling of every weight in ``users``.
        sparsity: fraction of all prunable *elements* to prune, in (0, 1).
        scope, dense: as for ``solve_vote``.
        floors: FQN -> the fewest blocks each of its block rows keeps (``row_floors``).

    Raises:
        ValueError: as ``solve_vote``; dense layers (and floors) larger than the element
            budget, with the largest reachable sparsity.
    """
    _check_sparsity(sparsity)
    block_scores = {task: {fqn: units.pool(fqn, score.double()).float() for fqn, score in per.items()}
                    for task, per in scores.items()}
    sizes = {fqn: units.sizes(fqn) for fqn in users}
    num_elements = sum(int(size.sum()) for size in sizes.values())
    target = round((1.0 - float(sparsity)) * num_elements)
    dense = list(dense)
    num_dense_blocks = sum(sizes[fqn].numel() for fqn in dense)
    num_blocks = sum(size.numel() for size in sizes.values())

    held = pick_floors(block_scores, users, {f: c for f, c in (floors or {}).items() if f not in dense},
                       per_row=True) if floors else None

    def vote(num_keep: int) -> tuple[int, VoteResult]:
        result = solve_vote(block_scores, users, num_keep=num_keep, scope=scope, dense=dense, floors=held)
        return sum(int(sizes[fqn][mask].sum()) for fqn, mask in result.masks.items()), result

    low, high = num_dense_blocks + (held.num_kept if held else 0), num_blocks  # vote(low) keeps the least
    kept_low, result_low = vote(low)
    if kept_low > target:
        reachable = math.floor((1.0 - kept_low / num_elements) * 1e4) / 1e4
        parts = ([f"dense layers {sorted(dense)}"] if dense else []) + (["the block floors"] if held else [])
        what = " and ".join(parts) or "the vote"
        raise ValueError(f"{what} alone keep {kept_low:,} weights, more than the {target:,} of {num_elements:,} the "
                         f"sparsity {sparsity} keeps; the largest reachable sparsity is {reachable:.4f} (lower the "
                         "sparsity" + (", or sparsity.min_density" if held else "") +
                         (", or keep fewer layers dense" if dense else "") + ")")
    while high - low > 1:  # invariant: kept(low) <= target < kept(high) (or high = all blocks)
        middle = (low + high) // 2
        kept, result = vote(middle)
        if kept <= target:
            low, kept_low, result_low = middle, kept, result
        else:
            high = middle
    kept_high, result_high = vote(high)
    best = result_high if kept_high - target < target - kept_low else result_low
    return BlockVote(best, units)
