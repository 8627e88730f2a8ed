"""Tests for dsparse.sparsity.dynamic: the drop/grow schedule and the mask update.

Hand-built layers whose outcome can be read off the numbers (drop ties, union of
nominations, the trimming rank), then randomised repeated updates where every layer
must keep its active count exactly, grow only where it was inactive after the drop, and
give equal results for equal inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsparse.models import build_model, prunable_parameters
from dsparse.sparsity.dynamic import (
    DynamicSchedule,
    drop_weakest,
    grow_by_votes,
    update_layer_masks,
)
from dsparse.sparsity.criteria import CRITERIA
from dsparse.sparsity.appliers import ElementApplier
from dsparse.sparsity.erk import erk_counts, random_masks
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.saliency import (
    JOINT,
    compute_saliency,
    normalize_scores,
    task_weight_users,
)
from dsparse.tasks import build_tasks

# ---------------------------------------------------------------- schedule


def test_schedule_update_steps():
    schedule = DynamicSchedule(interval=10, end=0.5, total_steps=100)
    updates = [step for step in range(101) if schedule.is_update_step(step)]
    assert updates == [10, 20, 30, 40, 50]
    assert schedule.end_step == 50


def test_schedule_end_is_robust_to_float_products():
    assert DynamicSchedule(interval=1, end=0.29, total_steps=100).end_step == 29


def test_schedule_cosine_values():
    schedule = DynamicSchedule(interval=10, end=0.75, alpha0=0.5, total_steps=200)  # end at step 150
    assert schedule.drop_fraction(0) == pytest.approx(0.5)
    assert schedule.drop_fraction(75) == pytest.approx(0.25)
    assert schedule.drop_fraction(150) == pytest.approx(0.0, abs=1e-12)
    assert schedule.drop_fraction(30) == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 150)) / 2)
    assert schedule.drop_fraction(190) == 0.0  # frozen: no rise after the end


@pytest.mark.parametrize("kwargs, match", [
    ({"interval": 0}, "interval"), ({"interval": 2.5}, "interval"), ({"end": 0.0}, "end"),
    ({"end": 1.5}, "end"), ({"alpha0": 0.0}, "alpha0"), ({"alpha0": 1.0}, "alpha0"),
    ({"total_steps": 0}, "total_steps"),
])
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicSchedule(**kwargs)


# ---------------------------------------------------------------- drop


def test_drop_weakest_hand_example_with_ties():
    weight = torch.tensor([[0.5, -0.1, 0.0, 0.3], [-0.1, 2.0, 0.1, 0.01]])
    mask = torch.tensor([[True, True, False, True], [True, True, True, False]])
    # Active magnitudes: 0:.5 1:.1 3:.3 4:.1 5:2 6:.1 -> three ties at .1 (flat 1, 4, 6).
    assert drop_weakest(weight, mask, 2).reshape(-1).tolist() == [
        True, False, False, True, False, True, True, False]
    assert drop_weakest(weight, mask, 4).reshape(-1).tolist() == [
        True, False, False, False, False, True, False, False]
    assert torch.equal(drop_weakest(weight, mask, 0), mask)
    assert mask.sum() == 6  # input untouched
    with pytest.raises(ValueError, match="num_drop"):
        drop_weakest(weight, mask, 7)


@pytest.mark.parametrize("seed", range(5))
def test_drop_weakest_matches_a_stable_sort_on_heavy_ties(seed):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randint(-3, 4, (40, 25), generator=g) / 4).float()
    mask = torch.rand(40, 25, generator=g) < 0.6
    active = mask.reshape(-1).nonzero().squeeze(1).tolist()
    num_drop = len(active) // 3
    flat = weight.reshape(-1).abs().tolist()
    expected = sorted(active, key=lambda i: (flat[i], i))[:num_drop]  # magnitude, then index
    reference = mask.clone().reshape(-1)
    reference[expected] = False
    assert torch.equal(drop_weakest(weight, mask, num_drop).reshape(-1), reference)


def test_non_finite_inputs_are_rejected():
    mask = torch.tensor([True, True, False])
    with pytest.raises(ValueError, match="NaN"):
        drop_weakest(torch.tensor([1.0, float("nan"), 0.0]), mask, 1)
    with pytest.raises(ValueError, match="NaN"):
        grow_by_votes(~mask, {"a": torch.tensor([0.0, 0.0, float("inf")])}, 1)


# ---------------------------------------------------------------- grow


def test_grow_by_votes_union_and_trim():
    inactive = torch.tensor([True, True, True, True, True, False])
    scores = {
        "seg": torch.tensor([0.9, 0.8, 0.1, 0.0, 0.2, 5.0]),
        "depth": torch.tensor([0.0, 0.7, 0.1, 0.6, 0.05, 5.0]),
    }
    # num_grow 2: seg nominates {0, 1}, depth {1, 3}; position 1 has two votes, then the
    # single-vote ones rank by their score: 0 (0.9) before 3 (0.6). Position 5 is active.
    grown, per_task = grow_by_votes(inactive, scores, 2)
    assert grown.tolist() == [True, True, False, False, False, False]
    assert per_task == {"seg": 2, "depth": 1}
    # num_grow 3: seg {0, 1, 4}, depth {1, 3, 2}: 1, then 0 (.9), 3 (.6); 4 (.2) is trimmed.
    grown, per_task = grow_by_votes(inactive, scores, 3)
    assert grown.tolist() == [True, True, False, True, False, False]
    assert per_task == {"seg": 2, "depth": 2}
    # each task's own wish before the union, kept for mask analysis
    _, _, wishes = grow_by_votes(inactive, scores, 2, return_nominations=True)
    assert wishes["seg"].tolist() == [True, True, False, False, False, False]
    assert wishes["depth"].tolist() == [False, True, False, True, False, False]


def test_grow_by_votes_position_nominated_by_one_of_two_users_grows():
    inactive = torch.ones(4, dtype=torch.bool)
    scores = {"seg": torch.tensor([1.0, 0.0, 0.0, 0.0]), "depth": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    grown, per_task = grow_by_votes(inactive, scores, 1)
    # Both nominate one position with one vote each at score 1.0: the smaller index wins.
    assert grown.tolist() == [True, False, False, False] and per_task == {"seg": 1, "depth": 0}
    grown, per_task = grow_by_votes(inactive, scores, 2)
    # Each task's top 2 holds its favourite plus tied zeros (smallest index first):
    # seg {0, 1}, depth {3, 0} -> 0 has two votes, then 3 (score 1.0) beats 1 (0.0).
    assert grown.tolist() == [True, False, False, True] and per_task == {"seg": 1, "depth": 2}


def test_grow_by_votes_consensus_ranks_first():
    inactive = torch.ones(5, dtype=torch.bool)
    scores = {"a": torch.tensor([0.9, 0.1, 0.5, 0.0, 0.0]), "b": torch.tensor([0.0, 0.2, 0.5, 0.9, 0.0])}
    # top 2: a {0, 2}, b {3, 2}: position 2 (two votes, max score 0.5) comes first, then
    # 0 and 3 tie on one vote and 0.9, and the smaller index wins.
    grown, per_task = grow_by_votes(inactive, scores, 2)
    assert grown.tolist() == [True, False, True, False, False]
    assert per_task == {"a": 2, "b": 1}


def test_grow_by_votes_single_task_is_top_k_by_gradient():
    torch.manual_seed(0)
    score = torch.rand(6, 7)
    inactive = torch.rand(6, 7) > 0.3
    grown, per_task = grow_by_votes(inactive, {JOINT: score}, 5)
    expected = torch.where(inactive, score, torch.tensor(-1.0)).reshape(-1).topk(5).indices
    assert sorted(grown.reshape(-1).nonzero().squeeze(1).tolist()) == sorted(expected.tolist())
    assert per_task == {JOINT: 5}


@pytest.mark.parametrize("seed", range(5))
def test_grow_by_votes_matches_a_brute_force_reference(seed):
    g = torch.Generator().manual_seed(seed)
    inactive = torch.rand(60, generator=g) < 0.7
    scores = {t: torch.randint(0, 5, (60,), generator=g).float() / 5 for t in ("a", "b", "c")}
    num_grow = int(inactive.sum()) // 4
    eligible = inactive.nonzero().squeeze(1).tolist()
    nominated = {t: set(sorted(eligible, key=lambda i, s=s: (-float(s[i]), i))[:num_grow]) for t, s in scores.items()}
    union = set().union(*nominated.values())

    def rank(i):
        voters = [t for t in scores if i in nominated[t]]
        return (-len(voters), -max(float(scores[t][i]) for t in voters), i)

    expected = sorted(sorted(union, key=rank)[:num_grow])
    grown, per_task = grow_by_votes(inactive, scores, num_grow)
    assert grown.nonzero().squeeze(1).tolist() == expected
    assert per_task == {t: len(nominated[t] & set(expected)) for t in scores}


def test_grow_by_votes_errors():
    inactive = torch.tensor([True, False])
    with pytest.raises(ValueError, match="num_grow"):
        grow_by_votes(inactive, {"a": torch.ones(2)}, 2)
    with pytest.raises(ValueError, match="shape"):
        grow_by_votes(inactive, {"a": torch.ones(3)}, 1)
    with pytest.raises(ValueError, match="empty"):
        grow_by_votes(inactive, {}, 1)


# ---------------------------------------------------------------- update


SHAPES = {"trunk.a": (16, 8, 3, 3), "trunk.b": (32, 16), "head.seg": (8, 128), "head.depth": (1, 32), "dense": (4, 4)}
USERS = {"trunk.a": frozenset({"seg", "depth"}), "trunk.b": frozenset({"seg", "depth"}),
         "head.seg": frozenset({"seg"}), "head.depth": frozenset({"depth"}), "dense": frozenset({"seg", "depth"})}


def initial_masks():
    counts = erk_counts(SHAPES, 0.2, dense=["dense"])
    return random_masks(SHAPES, counts, seed=0)


def random_inputs(masks, generator):
    weights = {f: torch.randn(SHAPES[f], generator=generator) * m for f, m in masks.items()}
    scores = {t: {f: torch.rand(SHAPES[f], generator=generator) for f in SHAPES if t in USERS[f]}
              for t in ("seg", "depth")}
    scores[JOINT] = {f: torch.rand(SHAPES[f], generator=generator) for f in SHAPES}
    return weights, scores


@pytest.mark.parametrize("grow", ["votes", "gradient", "random"])
def test_update_keeps_every_layer_count_over_successive_updates(grow):
    masks = initial_masks()
    counts = {f: int(m.sum()) for f, m in masks.items()}
    generator = torch.Generator().manual_seed(1)
    schedule = DynamicSchedule(interval=1, end=1.0, alpha0=0.5, total_steps=6)
    for step in range(1, 6):
        weights, scores = random_inputs(masks, generator)
        fraction = schedule.drop_fraction(step)
        new, stats = update_layer_masks(weights, masks, scores, USERS, fraction, grow=grow, seed=5,
                                        update_index=step)
        assert list(new) == list(masks)
        for fqn, mask in new.items():
            assert int(mask.sum()) == counts[fqn], fqn
            grown = stats.grown_masks[fqn]
            after_drop = drop_weakest(weights[fqn], masks[fqn], stats.dropped[fqn])
            assert not bool((grown & after_drop).any()), "grew a position that was active after the drop"
            assert torch.equal(mask, after_drop | grown)
            assert stats.grown[fqn] == stats.dropped[fqn] == int(grown.sum())
            full = counts[fqn] == math.prod(SHAPES[fqn])  # dense or ERK-capped: left alone
            assert stats.dropped[fqn] == (0 if full else int(fraction * counts[fqn]))
            assert stats.regrown[fqn] == int((grown & masks[fqn]).sum())
        assert torch.equal(new["dense"], torch.ones(SHAPES["dense"], dtype=torch.bool))
        assert sum(stats.dropped.values()) > 0
        if grow == "votes":
            assert set(stats.grown_per_task["trunk.a"]) == {"seg", "depth"}
            assert set(stats.grown_per_task["head.seg"]) == {"seg"}
            assert stats.grown_per_task["head.seg"]["seg"] == stats.grown["head.seg"]
            union = stats.grown_per_task["trunk.a"]["seg"] + stats.grown_per_task["trunk.a"]["depth"]
            assert union >= stats.grown["trunk.a"]  # every grown position has a nominator
        masks = new


@pytest.mark.parametrize("grow", ["votes", "gradient", "random"])
def test_update_is_deterministic(grow):
    masks = initial_masks()
    weights, scores = random_inputs(masks, torch.Generator().manual_seed(2))
    first, stats_a = update_layer_masks(weights, masks, scores, USERS, 0.4, grow=grow, seed=3, update_index=7)
    second, stats_b = update_layer_masks(weights, masks, scores, USERS, 0.4, grow=grow, seed=3, update_index=7)
    assert all(torch.equal(first[f], second[f]) for f in first)
    assert stats_a.grown_per_task == stats_b.grown_per_task
    if grow == "random":
        third, _ = update_layer_masks(weights, masks, scores, USERS, 0.4, grow=grow, seed=3, update_index=8)
        assert not all(torch.equal(first[f], third[f]) for f in first)


def test_update_grows_by_gradient_where_it_is_largest():
    mask = torch.tensor([True, True, True, False, False, False])
    weight = torch.tensor([0.5, 0.01, 0.7, 0.0, 0.0, 0.0])
    joint = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.9, 0.3])
    new, stats = update_layer_masks({"w": weight}, {"w": mask}, {JOINT: {"w": joint}}, {}, 0.4, grow="gradient")
    # floor(0.4 * 3) = 1 drop: flat 1 (0.01); grow the best gradient, flat 4.
    assert new["w"].tolist() == [True, False, True, False, True, False]
    assert stats.grown_per_task == {"w": {JOINT: 1}} and stats.regrown == {"w": 0}


def test_just_dropped_weight_can_regrow():
    mask = torch.tensor([True, True, False])
    weight = torch.tensor([1.0, 0.1, 0.0])
    scores = {"seg": {"w": torch.tensor([0.0, 0.9, 0.1])}}
    new, stats = update_layer_masks({"w": weight}, {"w": mask}, scores, {"w": frozenset({"seg"})}, 0.5)
    assert new["w"].tolist() == [True, True, False]
    assert stats.regrown == {"w": 1} and stats.grown_masks["w"].tolist() == [False, True, False]


def test_update_errors():
    masks = {"w": torch.tensor([True, False, True, False])}
    weights = {"w": torch.ones(4)}
    with pytest.raises(ValueError, match="grow mode"):
        update_layer_masks(weights, masks, {}, {}, 0.5, grow="magic")
    with pytest.raises(ValueError, match="drop_fraction"):
        update_layer_masks(weights, masks, {}, {}, 1.0)
    with pytest.raises(ValueError, match="no entry in weights"):
        update_layer_masks({}, masks, {}, {}, 0.5)
    with pytest.raises(ValueError, match="no score"):
        update_layer_masks(weights, masks, {"seg": {}}, {"w": frozenset({"seg"})}, 0.5)
    with pytest.raises(ValueError, match="joint"):
        update_layer_masks(weights, masks, {"seg": {"w": torch.ones(4)}}, {}, 0.5, grow="gradient")


def test_grad_criterion_is_registered():
    assert "grad" in CRITERIA
    grad, weight = torch.tensor([-2.0, 3.0]), torch.tensor([5.0, 0.0])
    assert torch.equal(CRITERIA["grad"]().batch_term(grad, weight), torch.tensor([2.0, 3.0]))


def test_grad_scores_of_a_masked_model_drive_an_update():
    """The intended pipeline: ERK masks, dense per-task gradients, a votes update."""
    tasks = build_tasks(["seg", "depth"], num_classes=5)
    torch.manual_seed(0)
    model = build_model("resnet18", {t: task.num_channels for t, task in tasks.items()},
                        base_width=4, head_dilations=(1, 2))
    weights = prunable_parameters(model)
    shapes = {fqn: w.shape for fqn, w in weights.items()}
    stem = next(iter(shapes))
    masks = MaskSet(random_masks(shapes, erk_counts(shapes, 0.2, dense=[stem]), seed=0), meta={})
    enforcer = ElementApplier(model, masks)
    g = torch.Generator().manual_seed(1)
    batch = {"rgb": torch.randn(2, 3, 32, 32, generator=g), "seg": torch.randint(0, 5, (2, 32, 32), generator=g),
             "depth": torch.rand(2, 1, 32, 32, generator=g)}
    # The enforcer's hooks would zero the gradient of pruned weights, which growth needs.
    with enforcer.dense_gradients():
        scores = normalize_scores(compute_saliency(model, tasks, [batch], criterion="grad", num_batches=1))
    layer = "trunk.layer3.0.conv1.weight"
    assert float(scores["seg"][layer][~masks.masks[layer]].sum()) > 0
    new, stats = update_layer_masks(weights, masks.masks, scores, task_weight_users(model), 0.3)
    assert all(int(new[f].sum()) == int(masks.masks[f].sum()) for f in new)
    assert stats.num_grown > 0 and stats.dropped[stem] == 0
    assert set(stats.grown_per_task[layer]) == {"seg", "depth"}
