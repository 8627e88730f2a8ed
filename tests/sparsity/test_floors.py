"""Layer floors in the exact-sparsity solve: no layer, so no task's own head, is pruned away;
the budget stays exact; a floor the budget cannot pay is refused with the reachable sparsity."""

import pytest
import torch

from dsparse.config import config_from_dict
from dsparse.models import build_model, prunable_parameters
from dsparse.sparsity.prune import prune
from dsparse.sparsity.vote import layer_floors, solve_vote
from dsparse.tasks import build_tasks

from .test_distributed_masks import TASKS, make_batches


def test_brute_force_floor_constrained_solve_on_one_ranking():
    """One pseudo-task: the vote's order is the score order (ties by position), so the solve
    is: each layer's ``floor`` best, then the rest of the budget by global score."""
    generator = torch.Generator().manual_seed(3)
    shapes = {"a": (4, 3), "b": (5,), "c": (2, 2, 2)}
    scores = {"joint": {n: torch.rand(s, generator=generator) for n, s in shapes.items()}}
    scores["joint"]["c"] *= 0.01  # c would be pruned away
    users = {n: frozenset({"joint"}) for n in shapes}
    floors = {"a": 2, "b": 1, "c": 3}
    names = list(shapes)
    flat = torch.cat([scores["joint"][n].flatten() for n in names]).tolist()
    owner = [n for n in names for _ in range(scores["joint"][n].numel())]
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    for keep in range(sum(floors.values()), len(flat) + 1):
        chosen = set()
        for name, count in floors.items():
            chosen |= set([i for i in order if owner[i] == name][:count])
        for i in order:
            if len(chosen) == keep:
                break
            chosen.add(i)
        result = solve_vote(scores, users, num_keep=keep, floors=floors)
        got = torch.cat([result.masks[n].flatten() for n in names]).tolist()
        assert got == [i in chosen for i in range(len(flat))], keep
        assert result.num_kept == keep


def test_floors_that_do_not_bind_give_the_plain_vote_and_the_invariants_hold():
    generator = torch.Generator().manual_seed(0)
    users = {"t.w": frozenset({"x", "y"}), "h.x": frozenset({"x"}), "h.y": frozenset({"y"})}
    scores = {task: {n: torch.rand(6, 4, generator=generator) for n, u in users.items() if task in u}
              for task in ("x", "y")}
    plain = solve_vote(scores, users, sparsity=0.5)
    floored = solve_vote(scores, users, sparsity=0.5, floors={n: 1 for n in users})
    assert all(torch.equal(plain.masks[n], floored.masks[n]) for n in users)
    scores["y"]["h.y"] *= 1e-3  # now y's head loses the ranking
    floored = solve_vote(scores, users, sparsity=0.8, floors={n: 2 for n in users})
    assert floored.num_kept == round(0.2 * 72) and all(int(m.sum()) >= 2 for m in floored.masks.values())
    for fqn, mask in floored.masks.items():  # a weight is kept iff one of its users keeps it
        either = torch.zeros_like(mask)
        for task in users[fqn]:
            either |= floored.task_masks[task][fqn]
        assert torch.equal(either, mask), fqn


def test_floors_the_budget_cannot_pay_are_refused_with_the_reachable_sparsity():
    scores = {"joint": {"a": torch.rand(100), "b": torch.rand(100)}}
    users = {"a": frozenset({"joint"}), "b": frozenset({"joint"})}
    with pytest.raises(ValueError, match=r"floors keep 40 weights .* budget keeps 20 of 200; the largest reachable "
                                         r"sparsity is 0.8000"):
        solve_vote(scores, users, sparsity=0.9, floors={"a": 20, "b": 20})


def small_model():
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=8, head_dilations=(1, 2))
    return model, tasks


@pytest.mark.parametrize("method", ["disparse", "snip", "random", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
def test_no_layer_is_emptied_with_the_default_floor_and_the_sparsity_stays_exact(method, sparsity):
    model, tasks = small_model()
    weights = prunable_parameters(model)
    total = sum(w.numel() for w in weights.values())
    floors = layer_floors({n: w.numel() for n, w in weights.items()}, 0.001)
    masks = prune(model, tasks, iter(make_batches(1, batch=2)), method=method, sparsity=sparsity, num_batches=1,
                  min_density=0.001)
    assert masks.num_kept == round((1 - sparsity) * total)
    assert all(int(masks.masks[n].sum()) >= floors[n] for n in weights)
    assert set(masks.meta["layers_at_floor"]) <= set(weights) and masks.meta["min_density"] == 0.001


def test_a_head_that_would_be_emptied_keeps_its_path():
    """Magnitude pruning of the tiny model empties its small-init heads (10 layers at 90%)."""
    model, tasks = small_model()
    batches = make_batches(1, batch=2)
    bare = prune(model, tasks, iter(batches), method="magnitude", sparsity=0.9, num_batches=1, min_density=0)
    emptied = [n for n, m in bare.masks.items() if not m.any()]
    assert any(n.startswith("heads.") for n in emptied)
    floored = prune(model, tasks, iter(batches), method="magnitude", sparsity=0.9, num_batches=1, min_density=0.001)
    assert all(floored.masks[n].any() for n in emptied) and floored.num_kept == bare.num_kept
    assert set(emptied) <= set(floored.meta["layers_at_floor"])


def test_min_density_settings():
    assert config_from_dict({"sparsity": {"method": "snip"}}).sparsity.floor_density(dynamic=False) == 0.001
    assert config_from_dict({"sparsity": {"method": "snip", "min_density": 0}}).sparsity.floor_density(False) == 0.0
    with pytest.raises(ValueError, match="min_density must be in"):
        config_from_dict({"sparsity": {"method": "snip", "min_density": 1.5}})
    with pytest.raises(ValueError, match="floors for block masks are not built yet"):
        config_from_dict({"sparsity": {"method": "snip", "granularity": "block", "min_density": 0.01}})
    with pytest.raises(ValueError, match="floors for rigl .dynamic. are not built yet"):
        config_from_dict({"sparsity": {"method": "rigl", "min_density": 0.01}})
