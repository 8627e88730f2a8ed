"""Channel granularity: groups from the model graph, the vote on groups, the shrunk model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dsparse.models import build_branched_model, build_model, parameter_users, prunable_parameters
from dsparse.sparsity.channel.groups import ChannelGroup, channel_groups
from dsparse.sparsity.channel.shrink import channel_element_masks, channel_meta, shrink_model, zero_pruned_channels
from dsparse.sparsity.channel.vote import ChannelCost, channel_scores, solve_channel_vote
from dsparse.sparsity.vote import solve_vote

TASKS = {"seg": 5, "depth": 1, "normal": 3}


def plain():
    return build_model("resnet18", TASKS, base_width=8, head_dilations=(1, 2))


def hidden():
    return build_model("resnet18", TASKS, base_width=8, head_dilations=(1, 2), head_hidden=4)


def branched():
    return build_branched_model("resnet18", TASKS, [{"seg", "depth"}, {"normal"}], branch_from="layer3",
                                base_width=8, head_dilations=(1, 2))


MODELS = {"plain": plain, "hidden": hidden, "branched": branched}
INPUT = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def by_name(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def test_a_resnet_stage_is_one_group_with_its_shortcut_and_every_reader():
    groups = by_name(channel_groups(plain(), INPUT[:1]))
    stage = groups["trunk.layer2.0.conv2"]
    assert stage.producers == ("trunk.layer2.0.conv2", "trunk.layer2.0.shortcut.0", "trunk.layer2.1.conv2")
    assert stage.consumers == ("trunk.layer2.1.conv1", "trunk.layer3.0.conv1", "trunk.layer3.0.shortcut.0")
    assert stage.norms == ("trunk.layer2.0.bn2", "trunk.layer2.0.shortcut.1", "trunk.layer2.1.bn2")
    assert stage.channels == 16 and not stage.fixed and stage.users == frozenset(TASKS)
    inner = groups["trunk.layer2.0.conv1"]  # a block's inner channels stand alone
    assert (inner.producers, inner.consumers, inner.norms) == (("trunk.layer2.0.conv1",), ("trunk.layer2.0.conv2",),
                                                               ("trunk.layer2.0.bn1",))
    last = groups["trunk.layer4.0.conv2"]  # the trunk's output feeds every head branch
    assert {f"heads.{t}.branches.{b}.0" for t in TASKS for b in (0, 1)} <= set(last.consumers)
    assert groups["trunk.stem.0"].fixed  # the stem, and layer1's stream tied to it, keep their size
    assert all(groups[f"heads.{t}.branches.0.0"].fixed for t in TASKS)  # the predictions


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_layer_produces_into_exactly_one_group_and_users_follow_the_declaration(kind):
    model = MODELS[kind]()
    groups = channel_groups(model, INPUT[:1])
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    produced = [layer for g in groups for layer in g.producers]
    assert sorted(produced) == sorted(layers)
    users = parameter_users(model)
    for group in groups:
        assert group.users == frozenset().union(*(users[f"{layer}.weight"]
                                                  for layer in group.producers + group.consumers))
    if kind == "hidden":
        assert by_name(groups)["heads.seg.branches.0.0"].users == {"seg"}
        assert not by_name(groups)["heads.seg.branches.0.0"].fixed  # a hidden layer of one task's head
    if kind == "branched":
        assert by_name(groups)["branches.1.layer3.0.conv1"].users == {"normal"}
        assert by_name(groups)["branches.0.layer4.0.conv2"].users == {"seg", "depth"}


def test_a_grouped_convolution_is_refused_by_name():
    model = plain()
    model.trunk.layer1[0].conv1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
    with pytest.raises(ValueError, match=r"trunk\.layer1\.0\.conv1.*groups=2"):
        channel_groups(model, INPUT[:1])


def random_kept(groups, seed=0):
    generator = torch.Generator().manual_seed(seed)
    kept = {}
    for group in groups:
        keep = torch.rand(group.channels, generator=generator) < 0.5
        keep[0] = True
        kept[group.name] = torch.ones(group.channels, dtype=torch.bool) if group.fixed else keep
    return kept


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_shrunk_model_computes_what_the_masked_dense_model_computes(kind):
    torch.manual_seed(1)
    model = MODELS[kind]()
    for module in model.modules():  # non-trivial norms, so a wrong slice shows
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    model.train()
    model(INPUT)  # running statistics away from their initial values
    groups = channel_groups(model, INPUT[:1])
    meta = channel_meta(groups, random_kept(groups))
    masked, shrunk = copy.deepcopy(model), copy.deepcopy(model)
    zero_pruned_channels(masked, meta)
    shrink_model(shrunk, meta)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    for training in (False, True):
        masked.train(training), shrunk.train(training)
        expected, got = masked(INPUT), shrunk(INPUT)
        for task in expected:
            torch.testing.assert_close(got[task], expected[task], atol=1e-5, rtol=0)
    masks = channel_element_masks(prunable_parameters(model), meta)
    for fqn, weight in prunable_parameters(shrunk).items():
        assert weight.numel() == int(masks[fqn].sum())  # the element masks count what the shrunk model holds
        torch.testing.assert_close(weight.detach().flatten(), prunable_parameters(masked)[fqn].detach()[masks[fqn]])


def normalised_random_scores(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights, users = prunable_parameters(model), parameter_users(model)
    tasks = sorted(set().union(*users.values()))
    scores = {t: {f: torch.rand(w.shape, generator=generator) for f, w in weights.items() if t in users[f]}
              for t in tasks}
    return {t: {f: s / sum(float(v.sum()) for v in per.values()) for f, s in per.items()} for t, per in scores.items()}


@pytest.mark.parametrize("budget", ["params", "flops"])
@pytest.mark.parametrize("kind", ["hidden", "branched"])
def test_a_channel_survives_iff_some_user_keeps_it_and_every_group_keeps_its_floor(kind, budget):
    model = MODELS[kind]()
    groups = channel_groups(model, INPUT[:1])
    vote = solve_channel_vote(normalised_random_scores(model), groups, ChannelCost.of(model, INPUT[:1], budget),
                              sparsity=0.6)
    for group in groups:
        if group.fixed:
            assert bool(vote.kept[group.name].all())
            continue
        assert int(vote.kept[group.name].sum()) >= math.ceil(0.1 * group.channels)
        either = torch.zeros(group.channels, dtype=torch.bool)
        for task in group.users:
            either |= vote.task_kept[task][group.name]
        assert torch.equal(vote.kept[group.name], either)  # pruned only when every user votes to prune
    assert abs(vote.sparsity - 0.6) < 0.05


def test_the_budget_is_exact_to_one_channel():
    """No other number of kept channels lands closer to the target (the vote's kept sets
    are nested in that number, so each count has one cost)."""
    model = hidden()
    groups = channel_groups(model, INPUT[:1])
    cost = ChannelCost.of(model, INPUT[:1], "params")
    scores = normalised_random_scores(model)
    vote = solve_channel_vote(scores, groups, cost, sparsity=0.3, min_fraction=0.0)
    target = round(0.7 * vote.cost_total)
    counted = {g.name: int(vote.kept[g.name].sum()) for g in groups if not g.fixed}
    assert cost.total(counted, groups) == vote.cost_kept
    pooled = channel_scores(scores, groups, cost)
    users = {g.name: g.users for g in groups if not g.fixed}
    for other in (sum(counted.values()) - 1, sum(counted.values()) + 1):
        result = solve_vote(pooled, users, num_keep=other)
        other_cost = cost.total({n: int(m.sum()) for n, m in result.masks.items()}, groups)
        assert abs(other_cost - target) >= abs(vote.cost_kept - target)


def test_the_chosen_count_is_the_best_of_every_count_brute_force():
    """Every number of kept channels, voted and costed: none lands closer to the target, and
    at the chosen count each task keeps exactly its own top channels by score."""
    model = hidden()
    groups = channel_groups(model, INPUT[:1])
    cost = ChannelCost.of(model, INPUT[:1], "params")
    scores = normalised_random_scores(model, seed=3)
    vote = solve_channel_vote(scores, groups, cost, sparsity=0.3, min_fraction=0.0)
    target = round(0.7 * vote.cost_total)
    pooled = channel_scores(scores, groups, cost)
    users = {g.name: g.users for g in groups if not g.fixed}
    total = sum(g.channels for g in groups if not g.fixed)
    best = min(abs(cost.total({n: int(m.sum()) for n, m in solve_vote(pooled, users, num_keep=k).masks.items()},
                              groups) - target) for k in range(1, total + 1))
    assert abs(vote.cost_kept - target) == best
    for task, per_group in vote.task_kept.items():  # each task's choice: its top fraction, by its own scores
        flat = torch.cat([pooled[task][name] for name in per_group])
        chosen = torch.cat([per_group[name] for name in per_group])
        assert float(flat[chosen].min()) >= float(flat[~chosen].max()) if bool((~chosen).any()) else True


@pytest.mark.parametrize("multiple", [4, 8])
def test_rounded_counts_are_multiples_that_keep_every_channel_a_user_kept(multiple):
    model = build_model("resnet18", TASKS, base_width=16, head_dilations=(1, 2), head_hidden=12)
    groups = channel_groups(model, INPUT[:1])
    cost = ChannelCost.of(model, INPUT[:1], "flops")
    vote = solve_channel_vote(normalised_random_scores(model), groups, cost, sparsity=0.5, multiple=multiple)
    odd = 0
    for group in groups:
        kept = vote.kept[group.name]
        if group.fixed:
            continue
        count = int(kept.sum())
        assert count % multiple == 0 or count == group.channels, group.name
        either = torch.zeros(group.channels, dtype=torch.bool)
        for task in group.users:
            either |= vote.task_kept[task][group.name]
        assert bool((kept | ~either).all())  # every channel a user keeps stays
        extra = kept & ~either
        odd += int(either.sum()) % multiple != 0
        if bool(extra.any()):  # the added ones are the best-scored of those the vote removed
            ranked = [c for c in vote.order[group.name] if not either[c]]
            assert set(torch.nonzero(extra).flatten().tolist()) == set(ranked[:int(extra.sum())])
    assert odd  # rounding had something to do
    largest = max(cost.per_channel(g) for g in groups if not g.fixed)
    assert abs(vote.cost_kept - round(0.5 * vote.cost_total)) <= multiple * largest


def test_a_channel_multiple_below_one_is_refused():
    model = hidden()
    groups = channel_groups(model, INPUT[:1])
    with pytest.raises(ValueError, match="channel_multiple must be at least 1"):
        solve_channel_vote(normalised_random_scores(model), groups, ChannelCost.of(model, INPUT[:1], "params"),
                           sparsity=0.5, multiple=0)


def test_without_floors_a_budget_that_empties_a_group_is_refused_with_the_largest_sparsity_that_does_not():
    model = hidden()
    groups = channel_groups(model, INPUT[:1])
    cost = ChannelCost.of(model, INPUT[:1], "flops")
    with pytest.raises(ValueError, match=r"leaves channel group \S+ with no channel.*largest sparsity keeping a "
                                         r"channel in every group is 0\.\d+"):
        solve_channel_vote(normalised_random_scores(model), groups, cost, sparsity=0.3, min_fraction=0.0)


def test_a_budget_below_the_floors_is_refused_with_the_largest_reachable_sparsity():
    model = hidden()
    groups = channel_groups(model, INPUT[:1])
    with pytest.raises(ValueError, match=r"every group's floor\) alone cost [\d,]+: the largest reachable sparsity "
                                         r"is 0\.\d+; lower the sparsity or the floor"):
        solve_channel_vote(normalised_random_scores(model), groups, ChannelCost.of(model, INPUT[:1], "params"),
                           sparsity=0.99)


def test_flops_count_each_layer_at_its_output_resolution():
    model = plain()
    cost = ChannelCost.of(model, INPUT[:1], "flops")
    stem = model.trunk.stem[0]
    assert cost.unit["trunk.stem.0"] == 2 * 7 * 7 * 16 * 16  # a 32x32 input, stride 2
    assert cost.total({}, []) == sum(cost.unit[n] * cost.out_channels[n] * cost.in_channels[n] for n in cost.unit)
    assert cost.out_channels["trunk.stem.0"] == stem.out_channels
