"""Erdos-Renyi-Kernel layer densities and random initial masks (docs/design.md, "Dynamic sparse training").

Dynamic sparse training starts from random masks whose per-layer densities follow ERK:
a layer's keep probability is proportional to ``(sum of its dims / numel) ** power``
(``(out + in + kh + kw) / (out * in * kh * kw)`` for a convolution), so small layers,
where every weight carries more of the signal, stay denser than large ones. ``power=0``
gives a uniform density, ``power=1`` the ERK of RigL.

Exactness. Users of sparsity libraries rightly complain that ERK "misses the target".
Two things cause it, and both are handled here:

1. *Capping.* A proportional factor large enough to meet the budget can push a small
   layer's probability above 1. Such layers are made dense and the factor is re-solved
   for the others until no layer exceeds 1. Capping only raises the factor of the rest
   (a capped layer takes fewer weights than its uncapped share), so every layer over 1
   can be capped in the same round and the loop ends after at most one round per layer.
2. *Rounding.* Per-layer counts are integers. ``erk_counts`` floors the real-valued
   counts and hands the remainder out by largest fractional part (ties: the earlier
   layer), so the counts sum to exactly ``round(density * N)``. Densities are derived
   from these counts, never the other way round.

``N`` counts every layer, the forced-dense ones included, so "density 0.1" means 10% of
all prunable weights whatever the dense option.

Floors. ``floors`` gives layers a least count: a layer whose ERK count falls below its floor
keeps the floor instead, and the others share what is left by the same rule (fixing a layer
at its floor only lowers the others' factor, so each round fixes the layers below their
floors and the loop ends after at most one round per layer). A floor that binds nowhere
changes nothing. ``random_masks`` can also hold a floor per row (a block row of block masks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = ["erk_counts", "erk_densities", "random_masks"]


def erk_counts(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    *,
    power: float = 1.0,
    dense: Iterable[str] = (),
    floors: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Number of kept weights per layer under ERK, summing exactly to ``round(density * N)``.

    Args:
        shapes: FQN -> weight shape, in layer order (the order breaks rounding ties).
        density: global kept fraction of all the weights in ``shapes``, in (0, 1).
        power: exponent of the ERK ratio; 0 = uniform, 1 = ERK.
        dense: FQNs kept fully dense; they count towards the budget.
        floors: FQN -> the fewest weights the layer keeps (see the module docstring).

    Returns:
        FQN -> kept count, in the order of ``shapes``. Layers in ``dense`` and capped layers
        keep all their weights.

    Raises:
        ValueError: empty ``shapes``, a shape with no weights, ``density`` outside (0, 1),
            a negative or non-finite ``power``, ``dense`` or ``floors`` naming unknown layers,
            or dense layers and floors that alone hold more weights than the budget.
    """
    sizes = _sizes(shapes)
    _check_density_and_power(density, power)
    dense = set(dense)
    unknown = sorted(dense - set(sizes))
    if unknown:
        raise ValueError(f"dense names layers {unknown} that are not in shapes; known layers: {list(sizes)}")
    budget = round(density * sum(sizes.values()))
    num_dense = sum(sizes[fqn] for fqn in dense)
    if num_dense > budget:
        raise ValueError(
            f"the dense layers {sorted(dense)} hold {num_dense} weights, more than the {budget} that density "
            f"{density} allows; raise the density or keep fewer layers dense"
        )
    floors = {fqn: min(int(count), sizes[fqn]) for fqn, count in (floors or {}).items() if fqn not in dense}
    unknown = sorted(set(floors) - set(sizes))
    if unknown:
        raise ValueError(f"floors name layers {unknown} that are not in shapes; known layers: {list(sizes)}")
    if num_dense + sum(floors.values()) > budget:
        reachable = 1.0 - (num_dense + sum(floors.values())) / sum(sizes.values())
        raise ValueError(f"the layer floors keep {sum(floors.values()):,} weights (plus {num_dense:,} in dense layers), "
                         f"more than the {budget:,} that density {density} allows; the largest reachable sparsity is "
                         f"{math.floor(reachable * 1e4) / 1e4:.4f} (lower the sparsity or sparsity.min_density)")
    ratios = {fqn: (sum(shapes[fqn]) / sizes[fqn]) ** power for fqn in sizes if fqn not in dense}
    at_floor: dict[str, int] = {}
    while True:
        free_ratios = {fqn: r for fqn, r in ratios.items() if fqn not in at_floor}
        shared = budget - num_dense - sum(at_floor.values())
        capped = _cap_dense(free_ratios, sizes, shared)
        counts = {fqn: sizes[fqn] for fqn in sizes if fqn in dense or fqn in capped}
        free = {fqn: r for fqn, r in free_ratios.items() if fqn not in capped}
        counts.update(_apportion(free, sizes, shared - sum(sizes[fqn] for fqn in capped)))
        below = {fqn: floors[fqn] for fqn in free if counts[fqn] < floors.get(fqn, 0)}
        if not below:
            counts.update(at_floor)
            return {fqn: counts[fqn] for fqn in sizes}
        at_floor.update(below)


def erk_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    *,
    power: float = 1.0,
    dense: Iterable[str] = (),
) -> dict[str, float]:
    """Per-layer densities ``erk_counts(...)[l] / numel_l``; see ``erk_counts`` for arguments.

    ``round(d_l * numel_l)`` gives back the exact counts, so the densities hit the global
    target exactly once turned into masks.
    """
    counts = erk_counts(shapes, density, power=power, dense=dense)
    return {fqn: counts[fqn] / math.prod(shapes[fqn]) for fqn in counts}


def random_masks(shapes: Mapping[str, Sequence[int]], counts: Mapping[str, int], *, seed: int,
                 row_floors: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Uniformly random keep masks with exactly ``counts[l]`` True per layer.

    One CPU ``torch.Generator`` seeded with ``seed`` draws a permutation per layer in the
    order of ``shapes``: the masks depend only on the seed, shapes and counts, not on the
    global RNG or the device, so every rank derives the same ones. A layer keeps the first
    ``counts[l]`` positions of its permutation; with ``row_floors[l] = c``, every row (first
    dimension) first keeps its first ``c`` positions of the permutation, and the rest of the
    count follows the permutation.

    Returns:
        FQN -> CPU bool tensor of the layer's shape.

    Raises:
        ValueError: if ``counts`` does not have exactly the layers of ``shapes``, a count
            is outside [0, numel], or below what its row floors keep.
    """
    sizes = _sizes(shapes)
    if set(counts) != set(sizes):
        missing, extra = sorted(set(sizes) - set(counts)), sorted(set(counts) - set(sizes))
        raise ValueError(f"counts must cover exactly the layers of shapes; missing {missing}, unexpected {extra}")
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for fqn, size in sizes.items():
        count = counts[fqn]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= size:
            raise ValueError(f"counts[{fqn!r}] = {count!r} must be an integer in [0, {size}] (the layer's numel)")
        order = torch.randperm(size, generator=generator)
        flat = torch.zeros(size, dtype=torch.bool)
        per_row = (row_floors or {}).get(fqn, 0)
        if per_row:
            rows, width = shapes[fqn][0], size // shapes[fqn][0]
            per_row = min(per_row, width)
            if count < rows * per_row:
                raise ValueError(f"counts[{fqn!r}] = {count} is below its row floors ({rows} rows x {per_row})")
            rank = torch.empty(size, dtype=torch.int64)
            rank[order] = torch.arange(size)
            first = torch.argsort(rank.view(rows, width), dim=1)[:, :per_row]  # each row's first in the draw
            flat.view(rows, width).scatter_(1, first, True)
            order = order[~flat[order]][: count - rows * per_row]
            flat[order] = True
        else:
            flat[order[:count]] = True
        masks[fqn] = flat.reshape(tuple(shapes[fqn]))
    return masks


# ---------------------------------------------------------------- internals


def _sizes(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    if not shapes:
        raise ValueError("shapes is empty; give the shape of every prunable weight (see prunable_parameters)")
    sizes = {fqn: math.prod(int(d) for d in shape) for fqn, shape in shapes.items()}
    empty = [fqn for fqn, size in sizes.items() if size < 1]
    if empty:
        raise ValueError(f"layers {empty} have no weights (a zero dimension); leave them out of shapes")
    return sizes


def _check_density_and_power(density: float, power: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density < 1.0:
        raise ValueError(f"density must be a number in (0, 1) (the kept fraction), got {density!r}; "
                         "for a dense model do not use ERK")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0 (0 = uniform, 1 = ERK), got {power!r}")


def _cap_dense(ratios: dict[str, float], sizes: dict[str, int], budget: int) -> set[str]:
    """Layers whose ERK probability would exceed 1 for ``budget`` kept weights among ``ratios``."""
    capped: set[str] = set()
    while True:
        free = [fqn for fqn in ratios if fqn not in capped]
        remaining = budget - sum(sizes[fqn] for fqn in capped)
        weight = sum(ratios[fqn] * sizes[fqn] for fqn in free)
        if not free or weight <= 0:
            return capped
        factor = remaining / weight
        over = {fqn for fqn in free if ratios[fqn] * factor > 1.0}
        if not over:
            return capped
        capped |= over


def _apportion(ratios: dict[str, float], sizes: dict[str, int], budget: int) -> dict[str, int]:
    """Integer counts proportional to ``ratio * size`` summing to ``budget`` (largest remainder)."""
    weight = sum(ratios[fqn] * sizes[fqn] for fqn in ratios)
    if not ratios or budget == 0 or weight <= 0:
        # Nothing to share out, or no layer left to take the budget (all capped): the
        # capped counts already add up to it.
        return {fqn: 0 for fqn in ratios}
    factor = budget / weight
    real = {fqn: min(ratios[fqn] * factor, 1.0) * sizes[fqn] for fqn in ratios}
    counts = {fqn: min(math.floor(value), sizes[fqn]) for fqn, value in real.items()}
    order = list(ratios)
    shortfall = budget - sum(counts.values())
    # Floats can land a hair on the wrong side of an integer, so correct in both directions.
    if shortfall > 0:
        room = [fqn for fqn in order if counts[fqn] < sizes[fqn]]
        room.sort(key=lambda fqn: -(real[fqn] - counts[fqn]))  # stable: ties keep layer order
        for fqn in room[:shortfall]:
            counts[fqn] += 1
    elif shortfall < 0:
        room = [fqn for fqn in order if counts[fqn] > 0]
        room.sort(key=lambda fqn: real[fqn] - counts[fqn])
        for fqn in room[:-shortfall]:
            counts[fqn] -= 1
    assert sum(counts.values()) == budget, "largest-remainder apportionment must meet the budget"
    return counts
