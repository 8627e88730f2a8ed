"""Tests for dsparse.sparsity.vote: the unanimous vote, solved for an exact sparsity.

Three kinds of evidence: hand-built cases whose outcome can be read off the scores; a
brute-force reference (Python sorting, exact ``Fraction`` levels) that ``solve_vote``
must match mask for mask, including the tie-break; and the real tiny models at several
sparsities, scopes and tie-heavy scores, where the kept count must be exact.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from dsparse.models import build_branched_model, build_model, parameter_users, prunable_parameters
from dsparse.sparsity.vote import solve_vote

SPARSITIES = (0.1, 0.5, 0.9, 0.99)
REGIMES = ("random", "equal", "zero", "duplicated")



def vote_users(model) -> dict[str, frozenset[str]]:
    users = parameter_users(model)
    return {fqn: users[fqn] for fqn in prunable_parameters(model)}


def make_scores(users, shapes, regime: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Scores of every task for the weights it uses; ``regime`` controls the ties."""
    generator = torch.Generator().manual_seed(seed)
    tasks = sorted(set().union(*users.values()))
    scores = {t: {} for t in tasks}
    for fqn, shape in shapes.items():
        for task in sorted(users[fqn]):
            if regime == "random":
                score = torch.rand(shape, generator=generator)
            elif regime == "equal":
                score = torch.full(shape, 0.25)
            elif regime == "zero":
                score = torch.zeros(shape)
            else:  # a handful of distinct values, heavily duplicated
                score = torch.randint(0, 4, shape, generator=generator).float() / 4
            scores[task][fqn] = score
    return scores


def union_of_task_masks(result, users) -> dict[str, torch.Tensor]:
    union = {}
    for fqn, tasks in users.items():
        union[fqn] = torch.zeros_like(result.masks[fqn])
        for task in tasks:
            union[fqn] |= result.task_masks[task][fqn]
    return union


def reference_vote(scores, users, sparsity, scope="global", dense=()):
    """Brute force: exact entry levels from Python sorts, then the documented tie-break."""
    voted = [fqn for fqn in users if fqn not in dense]
    positions = [(fqn, i) for fqn in voted for i in range(scores[next(iter(users[fqn]))][fqn].numel())]
    index = {p: n for n, p in enumerate(positions)}  # flat position in users order
    levels: dict[tuple, dict[str, Fraction]] = {p: {} for p in positions}
    for task in scores:
        fqns = [fqn for fqn in voted if task in users[fqn]]
        groups = [fqns] if scope == "global" else [[fqn] for fqn in fqns]
        for group in groups:
            members = [(fqn, i) for fqn in group for i in range(scores[task][fqn].numel())]
            value = {p: float(scores[task][p[0]].reshape(-1)[p[1]]) for p in members}
            ranked = sorted(members, key=lambda p: (-value[p], members.index(p)))
            for rank, p in enumerate(ranked):
                levels[p][task] = Fraction(rank + 1, len(members))
    total = sum(scores[next(iter(users[f]))][f].numel() for f in users)
    num_keep = round((1 - sparsity) * total) - (total - len(positions))

    def key(p):
        entry = min(levels[p].values())
        voters = [t for t, level in levels[p].items() if level == entry]
        best = max(float(scores[t][p[0]].reshape(-1)[p[1]]) for t in voters)
        return entry, -len(voters), -best, index[p]

    order = sorted(positions, key=key)
    kept = set(order[:num_keep])
    level = min(levels[order[num_keep - 1]].values()) if num_keep else Fraction(0)
    task_kept = {t: {p for p in positions if t in levels[p] and (levels[p][t] < level or
                                                                  (levels[p][t] == level and p in kept))}
                 for t in scores}
    return kept, task_kept, level


def as_positions(masks: dict[str, torch.Tensor], fqns) -> set:
    return {(fqn, int(i)) for fqn in fqns for i in torch.nonzero(masks[fqn].reshape(-1)).flatten()}


# --- hand-built semantics -------------------------------------------------------------


def test_shared_weight_survives_if_any_user_keeps_it():
    users = {"shared": frozenset("ab"), "head_a": frozenset("a"), "head_b": frozenset("b")}
    scores = {
        "a": {"shared": torch.tensor([0.9, 0.0, 0.0, 0.0]), "head_a": torch.tensor([0.8, 0.7, 0.1, 0.0])},
        "b": {"shared": torch.tensor([0.0, 0.0, 0.0, 0.9]), "head_b": torch.tensor([0.8, 0.7, 0.1, 0.0])},
    }
    result = solve_vote(scores, users, sparsity=0.5)
    # Entry levels: shared[0] and shared[3] 1/8 (kept by one task each), heads' best two
    # 2/8 and 3/8; shared[1] and shared[2] are pruned by both tasks.
    assert result.masks["shared"].tolist() == [True, False, False, True]
    assert result.task_masks["a"]["shared"].tolist() == [True, False, False, False]
    assert result.task_masks["b"]["shared"].tolist() == [False, False, False, True]
    assert result.masks["head_a"].tolist() == result.task_masks["a"]["head_a"].tolist() == [True, True, False, False]
    assert result.masks["head_b"].tolist() == [True, True, False, False]
    assert result.keep_ratio == pytest.approx(3 / 8)
    assert (result.num_kept, result.num_total, result.sparsity) == (6, 12, 0.5)


def test_boundary_tie_break_prefers_votes_then_score_then_position():
    users = {"shared": frozenset("ab"), "head_a": frozenset("a"), "head_b": frozenset("b")}
    # Both tasks rank shared[0] first and head[0] second: shared[0] has two votes at 1/2.
    scores = {
        "a": {"shared": torch.tensor([0.5]), "head_a": torch.tensor([0.4])},
        "b": {"shared": torch.tensor([0.3]), "head_b": torch.tensor([0.6])},
    }
    result = solve_vote(scores, users, sparsity=2 / 3)  # keeps 1 of 3
    # Levels: head_b 1/2 (b ranks it first), shared 1/2 (a ranks it first), head_a 1.
    # Both at 1/2 with one vote; shared's best score 0.5 < head_b's 0.6.
    assert [result.masks[f].item() for f in users] == [False, False, True]
    scores["b"]["head_b"] = torch.tensor([0.5])  # equal scores: the lower flat position wins
    result = solve_vote(scores, users, sparsity=2 / 3)
    assert [result.masks[f].item() for f in users] == [True, False, False]
    for fqn, union in union_of_task_masks(result, users).items():
        assert torch.equal(union, result.masks[fqn])


@pytest.fixture(scope="module")
def branched():
    torch.manual_seed(0)
    model = build_branched_model("resnet18", {"a": 1, "b": 1, "c": 1}, branches=[{"a", "b"}, {"c"}],
                                 base_width=4, head_dilations=(1,))
    users = vote_users(model)
    shapes = {fqn: w.shape for fqn, w in prunable_parameters(model).items()}
    return users, shapes


def test_weight_shared_by_two_of_three_tasks_is_decided_by_those_two(branched):
    users, shapes = branched
    fqn = next(f for f, u in users.items() if u == frozenset("ab"))
    scores = make_scores(users, shapes, "random", seed=1)
    for task in "ab":
        scores[task][fqn].reshape(-1)[0] = 0.0  # both users rank it last
    result = solve_vote(scores, users, sparsity=0.5)
    assert "c" not in {t for t, masks in result.task_masks.items() if fqn in masks}
    assert not result.masks[fqn].reshape(-1)[0]
    scores["b"][fqn].reshape(-1)[0] = 1.0  # one of the two users keeps it: it survives
    result = solve_vote(scores, users, sparsity=0.5)
    assert result.masks[fqn].reshape(-1)[0] and result.task_masks["b"][fqn].reshape(-1)[0]
    assert not result.task_masks["a"][fqn].reshape(-1)[0]
    for name, union in union_of_task_masks(result, users).items():
        assert torch.equal(union, result.masks[name]), name


def test_single_pseudo_task_is_global_top_k_with_stable_ties():
    generator = torch.Generator().manual_seed(0)
    shapes = {"l1": (6, 5), "l2": (40,)}
    scores = {"joint": {f: torch.randint(0, 5, s, generator=generator).float() for f, s in shapes.items()}}
    result = solve_vote(scores, {f: frozenset({"joint"}) for f in shapes}, sparsity=0.6)
    flat = torch.cat([scores["joint"][f].reshape(-1) for f in shapes])
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[torch.argsort(flat, descending=True, stable=True)[:28]] = True
    assert torch.equal(torch.cat([result.masks[f].reshape(-1) for f in shapes]), expected)


# --- the brute-force reference --------------------------------------------------------

SMALL_USERS = {
    "trunk.0": frozenset("abc"),
    "trunk.1": frozenset("abc"),
    "branch": frozenset("ab"),
    "head_a": frozenset("a"),
    "head_b": frozenset("b"),
    "head_c": frozenset("c"),
}
SMALL_SHAPES = {"trunk.0": (3, 4), "trunk.1": (5, 2, 2), "branch": (7,), "head_a": (2, 3), "head_b": (5,),
                "head_c": (4, 2)}


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("regime", REGIMES)
def test_matches_brute_force_reference(scope, regime):
    for seed, sparsity in itertools.product(range(3), (0.05, 0.3, 0.5, 0.77, 0.9, 0.97)):
        dense = ("trunk.0",) if seed == 2 and sparsity < 0.7 else ()
        scores = make_scores(SMALL_USERS, SMALL_SHAPES, regime, seed)
        result = solve_vote(scores, SMALL_USERS, sparsity=sparsity, scope=scope, dense=dense)
        kept, task_kept, level = reference_vote(scores, SMALL_USERS, sparsity, scope, dense)
        voted = [f for f in SMALL_USERS if f not in dense]
        assert as_positions(result.masks, voted) == kept, (seed, sparsity)
        for task, positions in task_kept.items():
            fqns = [f for f in voted if task in SMALL_USERS[f]]
            assert as_positions(result.task_masks[task], fqns) == positions, (seed, sparsity, task)
        assert result.keep_ratio == float(level)


# --- exact sparsity on the real models ------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("resnet18", {"seg": 10, "depth": 1, "normal": 3}, base_width=8, head_dilations=(1, 2))
    users = vote_users(model)
    shapes = {fqn: w.shape for fqn, w in prunable_parameters(model).items()}
    return users, shapes


@pytest.mark.parametrize("model", ["tiny", "branched"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("regime", REGIMES)
def test_exact_sparsity_on_models(model, scope, regime, request):
    users, shapes = request.getfixturevalue(model)
    scores = make_scores(users, shapes, regime)
    first = next(iter(users))
    ratios = []
    for sparsity in SPARSITIES:
        dense = [first] if sparsity <= 0.9 else []
        result = solve_vote(scores, users, sparsity=sparsity, scope=scope, dense=dense)
        total = sum(s.numel() for s in shapes.values())
        assert result.num_total == total
        assert result.num_kept == round((1 - sparsity) * total) == sum(int(m.sum()) for m in result.masks.values())
        assert list(result.masks) == list(users)
        if dense:
            assert result.masks[first].all()
        for fqn, union in union_of_task_masks(result, users).items():
            assert torch.equal(union, result.masks[fqn]), fqn
        ratios.append(result.keep_ratio)
    assert ratios == sorted(ratios, reverse=True), "higher sparsity must not raise the keep ratio"


def test_deterministic(tiny):
    users, shapes = tiny
    scores = make_scores(users, shapes, "duplicated", seed=3)
    first, second = (solve_vote(scores, users, sparsity=0.8, scope="global") for _ in range(2))
    assert all(torch.equal(first.masks[f], second.masks[f]) for f in users)
    assert first.keep_ratio == second.keep_ratio


def test_task_masks_are_prefixes_of_the_task_ranking(tiny):
    """K_t keeps the top of the task's own ranking: no pruned weight outscores a kept one."""
    users, shapes = tiny
    scores = make_scores(users, shapes, "random", seed=4)
    result = solve_vote(scores, users, sparsity=0.9)
    for task, masks in result.task_masks.items():
        flat_scores = torch.cat([scores[task][f].reshape(-1) for f in masks])
        flat_masks = torch.cat([m.reshape(-1) for m in masks.values()])
        assert flat_scores[flat_masks].min() >= flat_scores[~flat_masks].max()
        assert abs(int(flat_masks.sum()) - result.keep_ratio * flat_masks.numel()) <= 1


def test_dense_layers_kept_and_counted(tiny):
    users, shapes = tiny
    first = next(iter(users))
    scores = make_scores(users, shapes, "zero")
    result = solve_vote(scores, users, sparsity=0.9, dense=[first])
    assert result.masks[first].all()
    assert all(result.task_masks[t][first].all() for t in users[first])
    assert result.num_total == sum(s.numel() for s in shapes.values())
    with pytest.raises(ValueError, match="dense layers .* hold 1176 weights, more than"):
        solve_vote(scores, users, sparsity=0.999, dense=[first])


def test_budget_of_zero_prunes_every_voted_weight():
    scores = {"a": {"w": torch.rand(10)}, "b": {"w": torch.rand(10)}}
    result = solve_vote(scores, {"w": frozenset("ab")}, sparsity=0.99)  # round(0.1) = 0 kept
    assert (result.num_kept, result.keep_ratio) == (0, 0.0)
    assert not result.masks["w"].any() and not any(m["w"].any() for m in result.task_masks.values())
    almost_dense = solve_vote(scores, {"w": frozenset("ab")}, sparsity=0.01)  # keeps all 10
    assert almost_dense.masks["w"].all() and almost_dense.keep_ratio <= 1.0


# --- input validation -----------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0, 1, 1.5, -0.1, float("nan"), "0.5", True])
def test_rejects_bad_sparsity(sparsity):
    scores = make_scores(SMALL_USERS, SMALL_SHAPES, "random")
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\).*0.9 prunes 90%"):
        solve_vote(scores, SMALL_USERS, sparsity=sparsity)


def test_rejects_bad_scope_and_dense():
    scores = make_scores(SMALL_USERS, SMALL_SHAPES, "random")
    with pytest.raises(ValueError, match=r"unknown scope 'local'.*\['global', 'layerwise'\]"):
        solve_vote(scores, SMALL_USERS, sparsity=0.5, scope="local")
    with pytest.raises(ValueError, match=r"dense layers \['stem'\] are not prunable"):
        solve_vote(scores, SMALL_USERS, sparsity=0.5, dense=["stem"])


def test_rejects_inconsistent_scores():
    def broken(edit):
        scores = make_scores(SMALL_USERS, SMALL_SHAPES, "random")
        edit(scores)
        return scores

    cases = [
        (lambda s: s["b"].pop("branch"), "task 'b' uses 'branch' but has no score"),
        (lambda s: s.pop("c"), "task 'c' uses 'trunk.0' but has no score"),
        (lambda s: s["c"].__setitem__("branch", torch.rand(7)), "task 'c' has a score for 'branch'"),
        (lambda s: s["a"].__setitem__("branch", torch.rand(8)), r"scores of 'branch' disagree on its shape"),
        (lambda s: s["a"]["head_a"].__setitem__((0, 0), -1.0), "'head_a' for task 'a' has negative or NaN"),
        (lambda s: s["a"]["head_a"].__setitem__((0, 0), float("nan")), "negative or NaN"),
        (lambda s: s["a"].__setitem__("head_a", torch.ones(2, 3, dtype=torch.int64)), "must be a float tensor"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            solve_vote(broken(edit), SMALL_USERS, sparsity=0.5)


# --- the fast paths agree with the plain ones ---------------------------------------


@pytest.mark.parametrize("pattern", ["random", "sample_misleads", "ties"])
def test_top_order_equals_stable_argsort_prefix(pattern):
    from dsparse.sparsity.vote import _top_order

    generator = torch.Generator().manual_seed(0)
    n = 1 << 20  # large enough for the sampled threshold
    if pattern == "random":
        keys = torch.randint(-(1 << 30), 0, (n,), generator=generator, dtype=torch.int32)
    elif pattern == "sample_misleads":  # every sampled position holds the best key
        keys = torch.zeros(n, dtype=torch.int32)
        keys[:: n // (1 << 18)] = -5
    else:
        keys = -torch.randint(0, 3, (n,), generator=generator, dtype=torch.int32)
    expected = torch.argsort(keys, stable=True)
    for count in (1, 1000, n // 10, n // 2, n):
        assert torch.equal(_top_order(keys, count).long(), expected[:count]), count


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("estimate", [None, 0.0, 1.0])
def test_chunked_sampled_and_doubling_paths_give_identical_masks(tiny, monkeypatch, estimate, scope):
    """Chunk size, sample size and the estimated level only change the work, not the masks:
    an estimate of 0 forces the bound to double (re-ranking), 1 ranks everything."""
    import dsparse.sparsity.vote as vote

    users, shapes = tiny
    scores = make_scores(users, shapes, "duplicated", seed=5)
    plain = solve_vote(scores, users, sparsity=0.7, scope=scope)
    monkeypatch.setattr(vote, "_CHUNK", 1000)
    monkeypatch.setattr(vote, "_SAMPLE_SIZE", 256)
    if estimate is not None:
        monkeypatch.setattr(vote, "_estimate_level", lambda *args: estimate)
    fast = solve_vote(scores, users, sparsity=0.7, scope=scope)
    assert all(torch.equal(plain.masks[f], fast.masks[f]) for f in users)
    assert all(torch.equal(plain.task_masks[t][f], fast.task_masks[t][f]) for t in plain.task_masks
               for f in plain.task_masks[t])
    assert plain.keep_ratio == fast.keep_ratio
