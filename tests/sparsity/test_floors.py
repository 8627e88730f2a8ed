"""Layer floors in the exact-sparsity solve: no layer, so no task's own head, is pruned away;
the budget stays exact; a floor the budget cannot pay is refused with the reachable sparsity."""

import copy
import math

import pytest
import torch

from dsparse.config import SparsityConfig, config_from_dict
from dsparse.models import build_model, prunable_parameters
from dsparse.sparsity import MaskInputs, MaskSet, build_sparsifier
from dsparse.sparsity.dynamic import update_layer_masks
from dsparse.sparsity.erk import erk_counts, random_masks
from dsparse.sparsity.methods import get_method, require_static
from dsparse.sparsity.prune import prune
from dsparse.sparsity.block.geometry import BlockUnits
from dsparse.sparsity.block.vote import row_floors, solve_block_vote
from dsparse.sparsity.vote import layer_floors, pick_floors, solve_vote
from dsparse.tasks import build_tasks

from .test_distributed_masks import TASKS, make_batches


def floors_then_order(order: list[int], group: list, counts: dict, keep: int) -> set[int]:
    """The brute-force solve: each group's first ``counts[g]`` positions of ``order``, then
    the rest of ``keep`` in ``order``."""
    chosen = set()
    for name, count in counts.items():
        chosen |= set([i for i in order if group[i] == name][:count])
    for i in order:
        if len(chosen) == keep:
            break
        chosen.add(i)
    return chosen


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
        chosen = floors_then_order(order, owner, floors, keep)
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


def small_model(width=8):
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=width,
                        head_dilations=(1, 2))
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


@pytest.mark.parametrize("per_row", [False, True])
def test_pick_floors_is_the_vote_restricted_to_each_layer_or_row(per_row):
    """Three tasks share a layer, one owns another; coarse scores make ties at every rank."""
    generator = torch.Generator().manual_seed(5)
    users = {"t": frozenset({"x", "y", "z"}), "h": frozenset({"z"})}
    scores = {task: {n: torch.randint(0, 4, (6, 9), generator=generator).float() / 4 for n, u in users.items()
                     if task in u} for task in ("x", "y", "z")}
    for count in (1, 2, 5, 9):
        floors = pick_floors(scores, users, {"t": count, "h": count}, per_row=per_row)
        for fqn in users:
            rows = range(6) if per_row else [None]
            for row in rows:
                piece = {t: {fqn: s[fqn][row] if per_row else s[fqn]} for t, s in scores.items() if fqn in s}
                alone = solve_vote(piece, {fqn: users[fqn]}, num_keep=count if per_row else count)
                got = floors.masks[fqn][row] if per_row else floors.masks[fqn]
                assert torch.equal(got, alone.masks[fqn]), (fqn, row, count)
            either = torch.zeros_like(floors.masks[fqn])
            for task in users[fqn]:  # the nominations OR to the floor
                either |= floors.nominated[task][fqn]
            assert torch.equal(either, floors.masks[fqn])


def test_brute_force_block_row_floors_on_one_ranking():
    """Each block row's best block first, then the rest of the budget by global score."""
    generator = torch.Generator().manual_seed(2)
    grids = {"a": (3, 4), "b": (2, 5)}
    scores = {"joint": {n: torch.rand(g, generator=generator) for n, g in grids.items()}}
    scores["joint"]["b"][1] *= 1e-3  # b's second row would lose every block
    users = {n: frozenset({"joint"}) for n in grids}
    names = list(grids)
    flat = torch.cat([scores["joint"][n].flatten() for n in names]).tolist()
    row_of = [(n, r) for n in names for r in range(grids[n][0]) for _ in range(grids[n][1])]
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    floors = pick_floors(scores, users, {"a": 1, "b": 1}, per_row=True)
    for keep in range(5, len(flat) + 1):
        chosen = floors_then_order(order, row_of, dict.fromkeys(row_of, 1), keep)
        result = solve_vote(scores, users, num_keep=keep, floors=floors)
        got = torch.cat([result.masks[n].flatten() for n in names]).tolist()
        assert got == [i in chosen for i in range(len(flat))], keep


def test_block_floors_keep_every_block_row_and_the_sparsity_exact_to_a_block():
    generator = torch.Generator().manual_seed(4)
    shapes = {"trunk": (128, 64, 3, 3), "head.x": (48, 128), "head.y": (40, 128)}
    users = {"trunk": frozenset({"x", "y"}), "head.x": frozenset({"x"}), "head.y": frozenset({"y"})}
    scores = {t: {n: torch.rand(shapes[n], generator=generator) for n in shapes if t in users[n]} for t in "xy"}
    scores["y"]["head.y"] *= 1e-4  # y's head loses the global ranking
    units = BlockUnits(shapes, 16)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    plain = solve_block_vote(scores, users, units, sparsity=0.9)
    assert not plain.masks["head.y"].any()
    floored = solve_block_vote(scores, users, units, sparsity=0.9, floors=row_floors(units, 0.001))
    for fqn in shapes:
        assert bool(units.unit_mask(fqn, floored.masks[fqn]).any(dim=1).all()), fqn  # a block in every row
    assert abs(floored.num_kept - round(0.1 * total)) <= 16 * 16 // 2
    assert "head.y" in floored.result.held_by_floor
    with pytest.raises(ValueError, match=r"block floors alone keep 3,456 weights, more than the 850 of 84,992 .* "
                                         r"largest reachable sparsity is 0.9593"):
        solve_block_vote(scores, users, units, sparsity=0.99, floors=row_floors(units, 0.001))
    assert row_floors(units, 0.3) == {"trunk": 11, "head.x": 3, "head.y": 3} and row_floors(units, 0) == {}


@pytest.mark.parametrize("method", ["disparse", "snip", "random", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95])
def test_no_layer_is_emptied_by_block_masks_with_the_default_floor(method, sparsity):
    """At width 16 every method empties layers without floors; with them each block row keeps
    a block (99% of this small model is beyond the floors: the test below runs width 64)."""
    model, tasks = small_model(width=16)
    units = BlockUnits({n: tuple(w.shape) for n, w in prunable_parameters(model).items()}, 16)
    batches = make_batches(1, batch=2)
    masks = prune(model, tasks, iter(batches), method=method, sparsity=sparsity, num_batches=1, granularity="block",
                  block=16, keep_first_dense=True)
    assert abs(masks.sparsity - sparsity) * masks.num_total <= 16 * 16
    for fqn, mask in masks.masks.items():
        assert bool(units.unit_mask(fqn, mask).any(dim=1).all()), fqn
    assert masks.meta["min_density"] == 0.001 and masks.meta["layers_at_floor"]


@pytest.mark.parametrize("method", ["disparse", "magnitude"])
def test_no_layer_is_emptied_by_block_masks_at_99_percent(method):
    model, tasks = small_model(width=64)
    masks = prune(model, tasks, iter(make_batches(1, batch=2)), method=method, sparsity=0.99, num_batches=1,
                  granularity="block", block=16, keep_first_dense=True)
    units = BlockUnits({n: tuple(m.shape) for n, m in masks.masks.items()}, 16)
    assert abs(masks.sparsity - 0.99) * masks.num_total <= 16 * 16
    assert all(bool(units.unit_mask(fqn, mask).any(dim=1).all()) for fqn, mask in masks.masks.items())


def test_channel_groups_take_min_density_as_their_floor():
    model, tasks = small_model(width=16)
    batches = make_batches(1, batch=2)
    masks = {density: require_static("disparse").masks(model, tasks, iter(batches), sparsity=0.5, num_batches=1,
                                                       granularity="channel", min_density=density)
             for density in (None, 0.5)}
    assert masks[None].meta["min_density"] == 0.1 and masks[0.5].meta["min_density"] == 0.5
    for name, entry in masks[0.5].meta["channels"].items():
        if not entry.get("fixed"):
            assert len(entry["kept"]) >= math.ceil(0.5 * entry["channels"]), name


def test_min_density_settings():
    assert config_from_dict({"sparsity": {"method": "snip"}}).sparsity.floor_density() == 0.001
    assert config_from_dict({"sparsity": {"method": "snip", "min_density": 0}}).sparsity.floor_density() == 0.0
    with pytest.raises(ValueError, match="min_density must be in"):
        config_from_dict({"sparsity": {"method": "snip", "min_density": 1.5}})
    blocks = config_from_dict({"sparsity": {"method": "snip", "granularity": "block"}}).sparsity
    channels = config_from_dict({"sparsity": {"method": "snip", "granularity": "channel", "min_density": 0.2}})
    assert blocks.floor_density() == 0.001 and channels.sparsity.floor_density() == 0.2
    assert config_from_dict({"sparsity": {"method": "rigl", "min_density": 0.01}}).sparsity.floor_density() == 0.01


# --- dynamic methods: ERK, the random start and every drop/grow keep the floors ----------


def test_erk_floors_lift_only_the_layers_below_them_and_keep_the_budget_exact():
    shapes = {"big": (256, 256, 3, 3), "mid": (64, 64), "small": (4, 64)}
    plain = erk_counts(shapes, 0.01)
    assert erk_counts(shapes, 0.01, floors={n: 1 for n in shapes}) == plain  # floors that do not bind
    floored = erk_counts(shapes, 0.01, floors={"mid": 2000, "small": 200})
    assert floored["mid"] == 2000 and floored["small"] == max(200, plain["small"])
    assert sum(floored.values()) == sum(plain.values()) and floored["big"] < plain["big"]
    with pytest.raises(ValueError, match=r"floors keep 589,824 weights .* largest reachable sparsity is 0.0073"):
        erk_counts(shapes, 0.01, floors={"big": 600_000})


def test_random_masks_draw_the_row_floors_first_and_the_same_draw_without_them():
    shapes, counts = {"w": (6, 10), "v": (3, 4)}, {"w": 9, "v": 5}
    old = random_masks(shapes, counts, seed=3)
    assert all(torch.equal(old[n], m) for n, m in random_masks(shapes, counts, seed=3, row_floors={}).items())
    floored = random_masks(shapes, counts, seed=3, row_floors={"w": 1})
    assert int(floored["w"].sum()) == 9 and bool(floored["w"].any(dim=1).all())
    assert torch.equal(floored["v"], old["v"])
    with pytest.raises(ValueError, match="below its row floors"):
        random_masks(shapes, {"w": 5, "v": 5}, seed=3, row_floors={"w": 1})


def test_drop_and_grow_never_empty_a_row_with_row_floors():
    generator = torch.Generator().manual_seed(7)
    mask = torch.zeros(8, 12, dtype=torch.bool)
    mask[:, 0] = True  # one unit per row: each is its row's floor
    mask[0, 1:6] = True
    users = {"w": frozenset({"a"})}
    for step in range(20):
        weight = torch.rand(8, 12, generator=generator) * mask
        scores = {"a": {"w": torch.rand(8, 12, generator=generator)}}
        new, stats = update_layer_masks({"w": weight}, {"w": mask}, scores, users, 0.9, row_floors={"w": 1},
                                        update_index=step)
        assert int(new["w"].sum()) == int(mask.sum()) and bool(new["w"].any(dim=1).all()), step
        mask = new["w"]
    unfloored, _ = update_layer_masks({"w": torch.rand(8, 12, generator=generator) * mask}, {"w": mask},
                                      {"a": {"w": torch.zeros(8, 12)}}, users, 0.9)
    assert not bool(unfloored["w"].any(dim=1).all())  # without floors the same update empties rows


@pytest.mark.parametrize("method", ["disparse_dynamic", "rigl", "set"])
@pytest.mark.parametrize("granularity", ["element", "block"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
def test_dynamic_starts_keep_every_layer_and_block_row(method, granularity, sparsity):
    model, tasks = small_model(width=64 if granularity == "block" else 8)
    settings = SparsityConfig(method=method, target=sparsity, granularity=granularity,
                              block=16 if granularity == "block" else 32)
    masks = get_method(method).initial_masks(model, MaskInputs(tasks, settings, seed=0, total_steps=10))
    assert masks.meta["min_density"] == 0.001
    units = BlockUnits({n: tuple(m.shape) for n, m in masks.masks.items()}, 16) if granularity == "block" else None
    for fqn, mask in masks.masks.items():
        assert mask.any(), fqn
        if units is not None:
            assert bool(units.unit_mask(fqn, mask).any(dim=1).all()), fqn
    tolerance = 0.5 * len(masks.masks) * 16 * 16 if units is not None else 0
    assert abs(masks.num_kept - round((1 - sparsity) * masks.num_total)) <= tolerance


def test_given_masks_below_the_floor_are_refused_unless_the_floors_are_off(tmp_path):
    model, tasks = small_model()
    weights = prunable_parameters(model)
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    head = next(n for n in weights if n.startswith("heads.edge"))
    masks[head] = torch.zeros_like(masks[head])
    path = tmp_path / "m.pt"
    MaskSet(masks, {"method": "hand", "granularity": "element", "block": None}).save(path)
    for density, refused in ((None, True), (0, False)):
        settings = SparsityConfig(masks=str(path), target=0.5, min_density=density)
        sparsifier = build_sparsifier(settings, MaskInputs(tasks, settings))
        if refused:
            with pytest.raises(ValueError, match=rf"keep less than the floor .* in 1 layer\(s\): {head}; task\(s\) "
                                                 r"edge lose a layer of their own; .* sparsity.min_density=0"):
                sparsifier.prepare(copy.deepcopy(model))
        else:
            sparsifier.prepare(copy.deepcopy(model))
            assert sparsifier.summary()["empty_layers"] == [head] and sparsifier.summary()["cut_off_tasks"] == ["edge"]


def test_floors_naming_unknown_layers_are_refused():
    scores = {"joint": {"a": torch.rand(10)}}
    users = {"a": frozenset({"joint"})}
    with pytest.raises(ValueError, match=r"floors name \['b'\], which are not prunable weights"):
        solve_vote(scores, users, sparsity=0.5, floors={"b": 1})


def test_the_adapmtl_projection_keeps_each_layers_floor_and_refuses_floors_beyond_the_count():
    from dsparse.sparsity.methods.adapmtl import project_exact

    effective = {"a": torch.tensor([0.9, 0.8, 0.7, 0.6]), "b": torch.tensor([0.0, 0.01, 0.0])}
    raw = {"a": effective["a"].clone(), "b": torch.tensor([0.2, 0.3, 0.1])}
    assert not project_exact(effective, raw, 3)["b"].any()
    kept = project_exact(effective, raw, 3, floors={"b": 2})
    assert kept["b"].tolist() == [True, True, False] and kept["a"].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="the layer floors keep 5 weights, more than the 3 the target keeps"):
        project_exact(effective, raw, 3, floors={"a": 3, "b": 2})


def test_pick_floors_refuses_a_layer_without_scores():
    with pytest.raises(ValueError, match=r"a floor names 'b', which has no scores or users"):
        pick_floors({"joint": {"a": torch.rand(4)}}, {"a": frozenset({"joint"})}, {"b": 1})
