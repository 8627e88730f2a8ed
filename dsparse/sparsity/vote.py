"""The unanimous vote (docs/design.md, "The unanimous vote"), solved for an exact sparsity.

Each task ``t`` ranks the ``N_t`` weights it uses by its normalised score and keeps the
top ``rho * N_t`` (its mask ``K_t``); a weight survives if **any** of its users keeps it.
The OR makes the final density larger than ``rho``, so ``rho`` is solved for, not given.

Formulation. Rank every task's weights by descending score, ties broken by flat position
(a stable sort), and give each weight the *entry level* ``e_t(w) = (rank_t(w) + 1) / N_t``:
``t`` keeps ``w`` at ratio ``rho`` exactly when ``e_t(w) <= rho``. Hence ``w`` survives
the vote iff ``e(w) = min over users of e_t(w) <= rho``, and the number kept is monotone
in ``rho``. Bisection on ``rho`` would end at ``L``, the K-th smallest entry level, where
``K = round((1 - sparsity) * num_total) - num_dense``. Levels are ``(r + 1) / N``, so within
one ranking no two weights share a level: at most one weight per ranking sits exactly at
``L``. Among these *boundary* weights the vote keeps as many as the exact count needs,
preferring (1) more user votes at level ``L``, (2) the larger normalised score, (3) the
smaller flat position (position in the concatenation of the non-dense FQNs in ``users``
order). ``keep_ratio`` is ``L``. ``K`` uses Python's ``round`` (half to even).

Task masks. ``task_masks[t]`` is ``K_t`` at ``rho = L`` minus the boundary weights the
tie-break dropped, so it is still a prefix of ``t``'s ranking (of length
``floor(L * N_t)`` or one less), and ``masks[w] == OR over users of task_masks[t][w]``
holds for every weight. Dense layers are outside the vote: all-True in both.

Speed. Only ranks up to ``floor(B * N_t)`` matter, with ``B >= L``: a vote rehearsed on a
sample of the weights estimates ``L`` and a check on the full vote confirms the bound
(``_entry_levels``). Each ranking picks its top candidates by a threshold and
stable-sorts only those, on int32 keys (the bits of non-negative float32 scores order
like the scores; scores are ranked in float32). Entry levels are float64 (exact for
rankings up to ``2**26`` weights, which is checked) and are only materialised up to
``L`` (``_entry_levels``). Peak memory is about 8 bytes per voted weight for the levels
plus 4 per weight of the ranking being built, plus the ranked prefixes (4 bytes each).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import torch

__all__ = ["MIN_DENSITY", "SCOPES", "Floors", "VoteResult", "layer_floors", "pick_floors", "solve_vote"]

SCOPES = ("global", "layerwise")
MIN_DENSITY = {"element": 0.001, "block": 0.001, "channel": 0.1}
"""The floors unless ``sparsity.min_density`` says otherwise, per granularity, always at least
one unit: 0.1% of every layer's weights (element masks), of every block row's blocks (block
masks: one block per row up to 1,000 blocks), 10% of every channel group's channels (a FLOPs
budget empties the high-resolution groups first, their channels costing the most FLOPs: on
the tiny model 30% of the FLOPs already emptied one)."""
_CHUNK = 1 << 22  # ranked weights scattered per step; bounds the int64/float64 temporaries
_SAMPLE_SIZE = 1 << 18  # weights sampled to estimate the solved level and candidate thresholds
_MAX_RANKING = 1 << 26  # float64 levels (r + 1) / N stay distinct and ordered up to here


@dataclass
class VoteResult:
    """Outcome of ``solve_vote``; every mask is a CPU bool tensor, True = kept."""

    masks: dict[str, torch.Tensor]
    """Final keep mask of every FQN in ``users`` (dense layers all True)."""
    task_masks: dict[str, dict[str, torch.Tensor]]
    """task -> FQN -> ``K_t`` at the solved ratio, before the vote (see the module docstring
    for the boundary rule); covers every weight the task uses."""
    keep_ratio: float
    """The solved per-task keep ratio ``rho`` (the entry level of the last kept weight)."""
    num_kept: int
    num_total: int
    held_by_floor: list[str] = field(default_factory=list)
    """The layers whose floor kept weights the vote alone would have pruned."""

    @property
    def sparsity(self) -> float:
        return 1.0 - self.num_kept / self.num_total


@dataclass
class Floors:
    """Weights the solve keeps whatever the budget (``pick_floors``), with the tasks that
    nominated each, so the task masks still OR to the final masks."""

    masks: dict[str, torch.Tensor]
    """FQN -> bool mask of the floor weights (the score tensor's shape)."""
    nominated: dict[str, dict[str, torch.Tensor]]
    """task -> FQN -> the floor weights this task ranks best among the layer's users."""

    @property
    def num_kept(self) -> int:
        return sum(int(mask.sum()) for mask in self.masks.values())


@dataclass
class _Ranking:
    """One ranking: a task's weights (scope global) or a task's weights in one layer."""

    task: str
    fqns: list[str]
    size: int
    order: torch.Tensor | None = None
    """Positions (in the concatenation of ``fqns``) of the best weights, best first (int32)."""


def solve_vote(
    scores: dict[str, dict[str, torch.Tensor]],
    users: dict[str, frozenset[str]],
    *,
    sparsity: float | None = None,
    scope: str = "global",
    dense: Iterable[str] = (),
    num_keep: int | None = None,
    floors: Floors | dict[str, int] | None = None,
) -> VoteResult:
    """Vote per DiSparse and keep exactly ``round((1 - sparsity) * num_total)`` weights.

    Args:
        scores: task -> FQN -> score tensor (>= 0, normalised per task, the weight's
            shape) for every weight the task uses.
        users: FQN -> tasks using the weight. Entangled baselines pass one pseudo-task
            for every weight.
        sparsity: fraction of all prunable weights (dense layers included) to prune.
        scope: ``"global"`` ranks each task across all its layers, ``"layerwise"`` ranks
            each (task, layer) separately with the same ratio.
        dense: FQNs kept whole and outside the vote, counted in the denominator.
        num_keep: keep exactly this many weights (dense layers included) instead of
            deriving the count from ``sparsity``; give one of the two. Kept sets are
            nested in ``num_keep`` (the vote's order is a fixed total order), which the
            block vote's search relies on.
        floors: weights kept whatever the budget (``pick_floors``), or FQN -> the fewest
            weights the layer keeps (picked by ``pick_floors``); layers not listed, and
            dense ones, have none. The budget stays exact (``_solve_with_floors``).

    Returns:
        A ``VoteResult`` whose ``num_kept`` is exactly the budget, deterministic for a
        given input.

    Raises:
        ValueError: bad sparsity or scope, an unknown dense FQN, missing/extra/mis-shaped
            or negative/NaN scores, or dense layers (and floors) larger than the keep budget.
    """
    if (sparsity is None) == (num_keep is None):
        raise ValueError("give exactly one of sparsity and num_keep")
    if floors:
        return _solve_with_floors(scores, users, sparsity=sparsity, scope=scope, dense=dense, num_keep=num_keep,
                                  floors=floors)
    if sparsity is not None:
        _check_sparsity(sparsity)
    layout = _layout(scores, users, scope, dense)
    if num_keep is None:
        budget = round((1.0 - float(sparsity)) * layout.num_total)
    elif isinstance(num_keep, bool) or not isinstance(num_keep, int) or not 0 <= num_keep <= layout.num_total:
        raise ValueError(f"num_keep must be an integer in [0, {layout.num_total}], got {num_keep!r}")
    else:
        budget, sparsity = num_keep, 1.0 - num_keep / layout.num_total
    num_dense = layout.num_total - layout.num_voted
    if num_dense > budget:
        raise ValueError(
            f"dense layers {sorted(layout.dense)} hold {num_dense} weights, more than the "
            f"{budget} the sparsity {sparsity} keeps out of {layout.num_total}; lower the "
            "sparsity or keep fewer layers dense"
        )
    num_keep = budget - num_dense
    rankings = _rankings(layout, scope)
    levels = _entry_levels(scores, layout, rankings, num_keep)
    keep, level, dropped = _select(levels, num_keep, scores, layout, rankings)
    task_masks = _task_masks(layout, rankings, level, dropped)
    return VoteResult(_final_masks(layout, keep), task_masks, level, budget, layout.num_total)


def layer_floors(sizes: dict[str, int], min_density: float, dense=()) -> dict[str, int]:
    """FQN -> the fewest weights the layer keeps: ``ceil(min_density * size)``, at least one
    (none when ``min_density`` is 0; dense layers keep all anyway)."""
    if min_density <= 0:
        return {}
    return {fqn: max(1, math.ceil(min_density * size)) for fqn, size in sizes.items() if fqn not in dense}


def pick_floors(scores: dict[str, dict[str, torch.Tensor]], users: dict[str, frozenset[str]],
                counts: dict[str, int], *, per_row: bool = False) -> Floors:
    """The floor weights: each layer's best ``counts[fqn]`` by the vote restricted to the layer
    (or, with ``per_row``, to each row of its score tensor: a block row of block scores).

    The restricted vote is the vote's own rule on one piece whose rankings all have the same
    length: a weight's entry level is its best rank among its users, and the ``count`` lowest
    are kept, ties by more users at that rank, then the larger score, then position. Each
    floor weight counts as nominated by the users that rank it best. Only each task's top
    ``count`` matter, so large layers rank only candidates.
    """
    masks, nominated = {}, {}
    for fqn, count in counts.items():
        if count <= 0:
            continue
        tasks = [task for task in scores if fqn in scores[task]]
        if fqn not in users or not tasks:
            raise ValueError(f"a floor names {fqn!r}, which has no scores or users; floors name prunable weights")
        shape = scores[tasks[0]][fqn].shape
        pieces = [scores[task][fqn].detach().reshape(shape[0] if per_row else 1, -1) for task in tasks]
        kept, by_task = _best_of_each_row(pieces, count)
        masks[fqn] = kept.view(shape)
        for task, mask in zip(tasks, by_task):
            nominated.setdefault(task, {})[fqn] = mask.view(shape)
    return Floors(masks, nominated)


def _best_of_each_row(pieces: list[torch.Tensor], count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The restricted vote of ``pick_floors`` on ``[rows, n]`` score tensors, one per user."""
    num_rows, n = pieces[0].shape
    count = min(count, n)
    ranks, best_rank = [], torch.full((num_rows, n), count, dtype=torch.int32)
    for piece in pieces:  # rank of each of the task's top `count` per row; `count` = not among them
        keys = piece.float().abs().contiguous().view(torch.int32).neg()  # ascending = best first (see _keys)
        if num_rows == 1:
            order = _top_order(keys[0], count).long().unsqueeze(0)
        else:
            order = torch.argsort(keys, dim=1, stable=True)[:, :count]
        rank = torch.full((num_rows, n), count, dtype=torch.int32)
        rank.scatter_(1, order, torch.arange(count, dtype=torch.int32).expand(num_rows, count).contiguous())
        ranks.append(rank)
        best_rank = torch.minimum(best_rank, rank)
    at_best = [rank == best_rank for rank in ranks]
    votes = torch.stack(at_best).sum(0)
    best_score = torch.stack([torch.where(a, p.float().abs(), -math.inf) for a, p in zip(at_best, pieces)]).amax(0)
    if num_rows == 1:  # only candidates (some task's top `count`) can be kept
        columns = torch.nonzero(best_rank[0] < count).squeeze(1).unsqueeze(0)
    else:
        columns = torch.arange(n).expand(num_rows, n)
    for key in (-best_score, -votes, best_rank):  # lexicographic by stable sorts, least significant first
        columns = columns.gather(1, torch.argsort(key.gather(1, columns), dim=1, stable=True))
    kept = torch.zeros(num_rows, n, dtype=torch.bool)
    kept.scatter_(1, columns[:, :count], True)
    return kept, [kept & a for a in at_best]


def _solve_with_floors(scores, users, *, sparsity, scope, dense, num_keep, floors: Floors | dict) -> VoteResult:
    """The vote with floors, still exactly at the budget.

    The floor weights ``F`` are kept first. The rest of the budget goes to the
    unrestricted vote's order: with ``V(k)`` the vote's first ``k``, the kept set is
    ``F ∪ V(k)`` for the least ``k`` with ``|F ∪ V(k)|`` equal to the budget, found by
    iterating ``k = budget - |F| + |V(k) ∩ F|`` from below (``V`` is nested in ``k``, so the
    iteration only rises and stops there). Without a binding floor this is the plain vote.
    The kept sets stay nested in the budget.
    """
    layout = _layout(scores, users, scope, dense)
    if num_keep is None:
        _check_sparsity(sparsity)
        num_keep = round((1.0 - float(sparsity)) * layout.num_total)
    unknown = sorted(set(floors.masks if isinstance(floors, Floors) else floors).difference(users))
    if unknown:
        raise ValueError(f"floors name {unknown}, which are not prunable weights in users")
    if not isinstance(floors, Floors):
        floors = pick_floors(scores, users, {f: c for f, c in floors.items() if f not in layout.dense})
    floor_masks = {fqn: mask for fqn, mask in floors.masks.items() if fqn not in layout.dense}
    num_floor = sum(int(m.sum()) for m in floor_masks.values())
    num_dense = layout.num_total - layout.num_voted
    if num_dense + num_floor > num_keep:
        reachable = 1.0 - (num_dense + num_floor) / layout.num_total
        raise ValueError(f"the layer floors keep {num_floor:,} weights (plus {num_dense:,} in dense layers) but the "
                         f"budget keeps {num_keep:,} of {layout.num_total:,}; the largest reachable sparsity is "
                         f"{math.floor(reachable * 1e4) / 1e4:.4f} (lower the sparsity or sparsity.min_density)")

    def union(k: int) -> tuple[VoteResult, int]:
        result = solve_vote(scores, users, scope=scope, dense=dense, num_keep=k)
        overlap = sum(int((result.masks[fqn] & mask).sum()) for fqn, mask in floor_masks.items())
        return result, overlap

    k = num_keep - num_floor
    result, overlap = union(k)
    while num_keep - num_floor + overlap != k:
        k = num_keep - num_floor + overlap
        result, overlap = union(k)
    masks = {fqn: mask | floor_masks[fqn] if fqn in floor_masks else mask for fqn, mask in result.masks.items()}
    task_masks = {task: {fqn: mask | floors.nominated.get(task, {}).get(fqn, torch.zeros_like(mask))
                         for fqn, mask in per.items()} for task, per in result.task_masks.items()}
    held = [fqn for fqn, mask in floor_masks.items() if bool((mask & ~result.masks[fqn]).any())]
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == num_keep, (kept, num_keep)
    return VoteResult(masks, task_masks, result.keep_ratio, kept, layout.num_total, held)


def _rankings(layout: _Layout, scope: str) -> list[_Ranking]:
    """The rankings to run, each over FQNs in ``users`` order."""
    rankings = []
    for task in layout.tasks:
        fqns = [fqn for fqn in layout.spans if task in layout.users[fqn]]
        groups = [fqns] if scope == "global" else [[fqn] for fqn in fqns]
        for group in groups:
            size = sum(layout.spans[fqn][1] for fqn in group)
            if size:
                rankings.append(_Ranking(task, group, size))
    too_big = [r for r in rankings if r.size > _MAX_RANKING]
    if too_big:
        raise ValueError(
            f"task {too_big[0].task!r} ranks {too_big[0].size} weights at once; the vote supports up "
            f"to {_MAX_RANKING} per ranking (exact float64 levels); use scope='layerwise'"
        )
    return rankings


def _level_bounds(layout: _Layout, rankings: list[_Ranking], num_keep: int) -> tuple[Fraction, Fraction]:
    """Bounds ``lower <= L <= upper`` of the solved level.

    At ratio ``rho`` every kept weight is kept by some ranking, so at most
    ``sum floor(rho * N_u)`` survive: ``L >= num_keep / sum N_u``. Rankings over disjoint
    weights keep at least ``sum floor(rho * N_u) > rho * sum N_u - count`` between them,
    which reaches ``num_keep`` by ``(num_keep + count) / sum N_u``: global scope uses the
    largest ranking alone, layerwise one ranking per layer.
    """
    lower = Fraction(num_keep, sum(r.size for r in rankings))
    if not layout.layerwise:
        return lower, min(Fraction(1), Fraction(num_keep + 1, max(r.size for r in rankings)))
    per_layer = {r.fqns[0]: r.size for r in rankings}
    return lower, min(Fraction(1), Fraction(num_keep + len(per_layer), sum(per_layer.values())))


def _keys(scores: dict[str, torch.Tensor], ranking: _Ranking) -> torch.Tensor:
    """int32 sort keys of the ranking's scores, ascending = best first.

    Non-negative float32 bit patterns order like the values; ``abs_`` maps -0.0 to +0.0.
    """
    keys = torch.empty(ranking.size, dtype=torch.int32)
    as_float = keys.view(torch.float32)
    start = 0
    for fqn in ranking.fqns:
        flat = scores[fqn].detach().reshape(-1)
        as_float[start : start + flat.numel()].copy_(flat)
        start += flat.numel()
    as_float.abs_()
    return keys.neg_()


def _candidates(keys: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending positions of a superset of the ``count`` best keys, not much larger.

    The threshold comes from a fixed strided sample (cheap and deterministic); if the
    sample misleads, the exact ``kthvalue`` decides. Either way the best ``count`` are
    inside, so the result of ``_top_order`` does not depend on the path taken.
    """
    step = keys.numel() // _SAMPLE_SIZE
    if step >= 4:
        sample = keys[::step]
        rank = min(sample.numel(), int(count / step * 1.02) + 64)
        within = keys <= torch.kthvalue(sample, rank).values
        if int(torch.count_nonzero(within)) >= count:
            return torch.nonzero(within).squeeze(1)
    return torch.nonzero(keys <= torch.kthvalue(keys, count).values).squeeze(1)


def _top_order(keys: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` best keys in stable rank order (ties: lower position first)."""
    if count == 0:
        return torch.empty(0, dtype=torch.int32)
    if 4 * count >= 3 * keys.numel():
        return torch.argsort(keys, stable=True)[:count].to(torch.int32)
    candidates = _candidates(keys, count)
    best = torch.argsort(keys[candidates], stable=True)[:count]
    return candidates[best].to(torch.int32)


def _entry_levels(scores, layout: _Layout, rankings: list[_Ranking], num_keep: int) -> torch.Tensor:
    """``e(w)`` over the voted weights, exact wherever ``e(w) <= L`` (inf elsewhere).

    Every ranking is ranked, and its levels scattered, up to a bound: first a sampled
    estimate of ``L`` plus a margin, then doubling until ``num_keep`` weights have a
    level, so ``L`` lies below the bound. A longer ranking extends a shorter one (ties are
    broken by position), so doubling only scatters the new ranks.
    """
    levels = torch.full((layout.num_voted,), math.inf, dtype=torch.float64)
    if num_keep == 0:
        return levels
    lower, upper = _level_bounds(layout, rankings, num_keep)
    guess = Fraction(_estimate_level(scores, layout, rankings, num_keep)) * Fraction(23, 20)
    bound, ranked, done = min(upper, max(lower, guess)), Fraction(0), [0] * len(rankings)
    while True:
        if bound > ranked:
            ranked = bound
            for ranking in rankings:
                ranking.order = _top_order(_keys(scores[ranking.task], ranking), math.floor(ranked * ranking.size))
        for i, ranking in enumerate(rankings):
            upto = math.floor(bound * ranking.size)
            _scatter_levels(levels, layout, ranking, done[i], upto)
            done[i] = upto
        if int(torch.count_nonzero(levels < math.inf)) >= num_keep:
            return levels
        assert bound < upper, "the upper bound must reach num_keep"
        bound = min(2 * bound, upper)


def _estimate_level(scores, layout: _Layout, rankings: list[_Ranking], num_keep: int) -> float:
    """A rehearsal of the vote on every ``stride``-th voted weight: how far the rankings
    must go. It only sizes the work; ``_entry_levels`` checks the bound it suggests."""
    stride = max(1, layout.num_voted // _SAMPLE_SIZE)
    levels = torch.full((-(-layout.num_voted // stride),), math.inf, dtype=torch.float64)
    for ranking in rankings:
        values, slots = [], []
        for fqn in ranking.fqns:
            start, numel = layout.spans[fqn]
            first = -start % stride
            if first >= numel:
                continue
            values.append(scores[ranking.task][fqn].detach().reshape(-1)[first::stride].float().cpu())
            slots.append(torch.arange(start + first, start + numel, stride) // stride)
        if values:  # a layer smaller than the stride may have no sampled weight
            values, slots = torch.cat(values), torch.cat(slots)
            rank_level = torch.arange(1, values.numel() + 1, dtype=torch.float64) / values.numel()
            levels.scatter_reduce_(0, slots[torch.argsort(values, descending=True)], rank_level, reduce="amin")
    finite = levels[levels < math.inf]
    return torch.kthvalue(finite, min(finite.numel(), max(1, round(num_keep / stride)))).values.item()


def _scatter_levels(levels, layout: _Layout, ranking: _Ranking, begin: int, end: int) -> None:
    """Lower ``levels`` to ``(rank + 1) / N`` for the ranking's ranks ``begin..end - 1``."""
    run_starts, shifts = _shift_runs(layout, ranking)
    for first in range(begin, end, _CHUNK):
        local = ranking.order[first : min(first + _CHUNK, end)].long()
        if shifts.numel() == 1:
            positions = local.add_(shifts[0])
        else:
            positions = local + shifts[torch.searchsorted(run_starts, local, right=True) - 1]
        rank_level = torch.arange(first + 1, first + local.numel() + 1, dtype=torch.float64) / ranking.size
        levels.scatter_reduce_(0, positions, rank_level, reduce="amin")


def _shift_runs(layout: _Layout, ranking: _Ranking) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the ranking's flat buffer maps into the voted buffer: the start of each run of
    layers that are contiguous in both, and the shift to add to positions in that run."""
    run_starts, shifts, start = [], [], 0
    for fqn in ranking.fqns:
        shift = layout.spans[fqn][0] - start
        if not shifts or shift != shifts[-1]:
            run_starts.append(start)
            shifts.append(shift)
        start += layout.spans[fqn][1]
    return torch.tensor(run_starts, dtype=torch.int64), torch.tensor(shifts, dtype=torch.int64)


def _count_within(level: float, ranking: _Ranking) -> int:
    """How many of the ranking's weights have an entry level <= ``level``."""
    size, limit = ranking.size, 0 if ranking.order is None else ranking.order.numel()
    count = min(limit, math.floor(level * size))
    while count < limit and (count + 1) / size <= level:
        count += 1
    while count > 0 and count / size > level:
        count -= 1
    return count


def _global_position(layout: _Layout, ranking: _Ranking, local: int) -> tuple[int, str, int]:
    """Voted-buffer position, FQN and element index of a ranking-flat position."""
    for fqn in ranking.fqns:
        start, numel = layout.spans[fqn]
        if local < numel:
            return start + local, fqn, local
        local -= numel
    raise AssertionError("position outside the ranking")


def _select(levels, num_keep, scores, layout, rankings) -> tuple[torch.Tensor, float, set[int]]:
    """Keep the ``num_keep`` smallest levels with the documented tie-break.

    Returns:
        (keep mask over the voted buffer, solved level, positions of dropped boundary weights).
    """
    if num_keep == 0:
        return torch.zeros(layout.num_voted, dtype=torch.bool), 0.0, set()
    finite = levels[levels < math.inf]
    level = torch.kthvalue(finite, num_keep).values.item()
    keep = levels < level
    votes: dict[int, list] = {}  # position -> [votes at the level, best score]
    for ranking in rankings:
        count = _count_within(level, ranking)
        if count and count / ranking.size == level:
            position, fqn, index = _global_position(layout, ranking, int(ranking.order[count - 1]))
            if levels[position].item() == level:  # else another user keeps it below the level
                score = float(scores[ranking.task][fqn].reshape(-1)[index])
                entry = votes.setdefault(position, [0, -math.inf])
                entry[0], entry[1] = entry[0] + 1, max(entry[1], score)
    assert len(votes) == int(torch.count_nonzero(finite == level)), "boundary weights must come one per ranking"
    boundary = sorted(votes, key=lambda p: (-votes[p][0], -votes[p][1], p))
    needed = num_keep - int(torch.count_nonzero(keep))
    keep[torch.tensor(boundary[:needed], dtype=torch.int64)] = True
    return keep, level, set(boundary[needed:])


def _task_masks(layout: _Layout, rankings: list[_Ranking], level: float, dropped: set[int]):
    """``K_t`` per task and FQN: each ranking's prefix up to ``level``, less dropped weights;
    dense layers all True."""
    ranked = {}
    for ranking in rankings:
        count = _count_within(level, ranking)
        if count and _global_position(layout, ranking, int(ranking.order[count - 1]))[0] in dropped:
            count -= 1
        flat = torch.zeros(ranking.size, dtype=torch.bool)
        if count:
            flat[ranking.order[:count].long()] = True
        start = 0
        for fqn in ranking.fqns:
            numel = layout.spans[fqn][1]
            ranked[ranking.task, fqn] = flat[start : start + numel].view(layout.shapes[fqn]).clone()
            start += numel
    return {
        task: {
            fqn: ranked.get((task, fqn)) if fqn in layout.spans else torch.ones(layout.shapes[fqn], dtype=torch.bool)
            for fqn, tasks in layout.users.items()
            if task in tasks
        }
        for task in layout.tasks
    }


def _final_masks(layout: _Layout, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    masks = {}
    for fqn, shape in layout.shapes.items():
        if fqn in layout.spans:
            start, numel = layout.spans[fqn]
            masks[fqn] = keep[start : start + numel].view(shape).clone()
        else:
            masks[fqn] = torch.ones(shape, dtype=torch.bool)
    return masks


# --- inputs -------------------------------------------------------------------------


@dataclass
class _Layout:
    """Validated inputs: the voted (non-dense) weights live in one flat buffer, in
    ``users`` order; ``spans[fqn] = (start, numel)`` locates each of them."""

    tasks: list[str]
    users: dict[str, frozenset[str]]
    shapes: dict[str, torch.Size]
    dense: frozenset[str]
    spans: dict[str, tuple[int, int]]
    layerwise: bool

    @property
    def num_total(self) -> int:
        return sum(shape.numel() for shape in self.shapes.values())

    @property
    def num_voted(self) -> int:
        return sum(numel for _, numel in self.spans.values())


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}; e.g. 0.9 prunes 90% of prunable weights")


def _check_users(users) -> dict[str, frozenset[str]]:
    if not users:
        raise ValueError("users is empty; pass {fqn: tasks} for every prunable weight")
    checked = {}
    for fqn, tasks in users.items():
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"users[{fqn!r}] must be a non-empty set of task names, got {tasks!r}")
        checked[fqn] = frozenset(tasks)
    return checked


def _shape(scores, fqn: str, tasks: frozenset[str]) -> torch.Size:
    """The weight's shape, agreed by every user's score tensor."""
    shape = None
    for task in sorted(tasks):
        if task not in scores or fqn not in scores[task]:
            raise ValueError(f"task {task!r} uses {fqn!r} but has no score for it; score every weight a task uses")
        score = scores[task][fqn]
        if not isinstance(score, torch.Tensor) or not score.is_floating_point():
            kind = score.dtype if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"score of {fqn!r} for task {task!r} must be a float tensor, got {kind}")
        if shape is not None and score.shape != shape:
            raise ValueError(f"scores of {fqn!r} disagree on its shape: {tuple(shape)} vs {tuple(score.shape)} "
                             f"(task {task!r})")
        if score.numel() and not bool(score.min() >= 0):  # also catches NaN
            raise ValueError(f"score of {fqn!r} for task {task!r} has negative or NaN entries; scores must be >= 0")
        shape = score.shape
    return shape


def _layout(scores, users, scope: str, dense: Iterable[str]) -> _Layout:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {list(SCOPES)}")
    if isinstance(dense, str):
        raise TypeError(f"dense must be a collection of FQNs, e.g. [{dense!r}], not a string")
    users = _check_users(users)
    dense = frozenset(dense)
    unknown = sorted(dense.difference(users))
    if unknown:
        raise ValueError(f"dense layers {unknown} are not prunable weights in users; known e.g. {list(users)[:3]}")
    for task, per_fqn in scores.items():
        for fqn in per_fqn:
            if task not in users.get(fqn, ()):
                raise ValueError(f"task {task!r} has a score for {fqn!r}, but users does not list {task!r} as "
                                 "using it; scores and users must come from the same model")
    shapes = {fqn: _shape(scores, fqn, tasks) for fqn, tasks in users.items()}
    spans, start = {}, 0
    for fqn, shape in shapes.items():
        if fqn not in dense:
            spans[fqn] = (start, shape.numel())
            start += shape.numel()
    used = set().union(*users.values())
    tasks = [t for t in scores if t in used]
    return _Layout(tasks, users, shapes, dense, spans, scope == "layerwise")
