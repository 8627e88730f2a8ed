"""Block granularity in the methods: the vote exact to the block, ERK on blocks, drop/grow
on blocks, against brute-force references on small shapes; block and element appliers
agree given the same masks; ranks agree; mismatched granularity is refused."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsparse.config import SparsityConfig, config_from_dict
from dsparse.models import build_model, prunable_parameters
from dsparse.sparsity import MaskInputs, MaskSet, build_sparsifier, prune
from dsparse.sparsity.block.vote import solve_block_vote
from dsparse.sparsity.block.geometry import BlockUnits, block_grid
from dsparse.sparsity.dynamic import update_layer_masks
from dsparse.tasks import build_tasks

from .test_distributed_masks import TASKS, make_batches
from .test_vote import make_scores, reference_vote

SHAPES = {"trunk.0": (20, 3, 3, 3), "trunk.1": (40, 20), "branch": (24, 40), "head_a": (5, 24), "head_b": (7, 24, 1, 1)}
USERS = {"trunk.0": frozenset("ab"), "trunk.1": frozenset("ab"), "branch": frozenset("a"), "head_a": frozenset("a"),
         "head_b": frozenset("b")}


def brute_force_block_vote(scores, units, sparsity, scope, dense):
    """Every block count K, voted by the reference on pooled scores; keep the K whose
    element count is closest to the target (the smaller count on a tie)."""
    block_scores = {t: {f: units.pool(f, s.double()).float() for f, s in per.items()} for t, per in scores.items()}
    block_users = {f: USERS[f] for f in SHAPES}
    sizes = {f: units.sizes(f) for f in SHAPES}
    num_blocks = sum(s.numel() for s in sizes.values())
    target = round((1 - sparsity) * sum(int(s.sum()) for s in sizes.values()))
    num_dense = sum(sizes[f].numel() for f in dense)
    best = None
    for count in range(num_dense, num_blocks + 1):
        kept, _, _ = reference_vote(block_scores, block_users, 1 - count / num_blocks, scope, dense)
        elements = sum(int(sizes[f].reshape(-1)[i]) for f, i in kept) + sum(int(sizes[f].sum()) for f in dense)
        candidate = (abs(elements - target), elements, kept)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return best[2], best[1]


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_block_vote_matches_brute_force(scope):
    units = BlockUnits(SHAPES, 16)
    for seed, sparsity, regime in itertools.product(range(2), (0.3, 0.6, 0.9), ("random", "duplicated")):
        dense = ("trunk.0",) if seed == 1 and sparsity < 0.7 else ()
        scores = make_scores(USERS, SHAPES, regime, seed)
        vote = solve_block_vote(scores, USERS, units, sparsity=sparsity, scope=scope, dense=dense)
        kept, elements = brute_force_block_vote(scores, units, sparsity, scope, dense)
        got = {(f, int(i)) for f, mask in vote.result.masks.items() if f not in dense
               for i in torch.nonzero(mask.reshape(-1)).flatten()}
        assert got == kept, (seed, sparsity, regime)
        assert vote.num_kept == elements
        for fqn, mask in vote.masks.items():
            assert mask.shape == SHAPES[fqn] and units.unit_mask(fqn, mask) is not None


def tiny_model(tasks, width=8):
    torch.manual_seed(0)
    return build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=width,
                       head_dilations=(1, 2))


@pytest.mark.parametrize("method", ["disparse", "snip", "random"])
@pytest.mark.parametrize("block", [16, 32])
def test_static_block_masks_are_whole_blocks_and_exact_to_the_block(method, block):
    tasks = build_tasks(TASKS, num_classes=10)
    model = tiny_model(tasks)
    masks = prune(model, tasks, iter(make_batches(1)), method=method, sparsity=0.8, num_batches=1,
                  granularity="block", block=block)
    assert masks.meta["granularity"] == "block" and masks.meta["block"] == block
    units = BlockUnits({n: tuple(w.shape) for n, w in prunable_parameters(model).items()}, block)
    largest_block = block * block
    assert abs(masks.num_kept - round(0.2 * masks.num_total)) <= largest_block
    for fqn, mask in masks.masks.items():
        units.unit_mask(fqn, mask)  # raises on a partial block
    for task, per_task in masks.task_masks.items():
        for fqn, mask in per_task.items():
            assert not bool((mask & ~masks.masks[fqn]).any()), "task masks are within the final mask"


def test_erk_on_blocks_keeps_each_layer_within_half_a_block_of_its_erk_count():
    from dsparse.sparsity.erk import erk_counts

    tasks = build_tasks(TASKS, num_classes=10)
    model = tiny_model(tasks)
    settings = SparsityConfig(method="rigl", target=0.9, granularity="block", block=16)
    sparsifier = build_sparsifier(settings, MaskInputs(tasks, settings, seed=0, total_steps=100))
    sparsifier.prepare(model)
    masks = sparsifier.masks
    shapes = {fqn: tuple(mask.shape) for fqn, mask in masks.masks.items()}
    erk = erk_counts(shapes, 0.1, dense=masks.meta["dense_layers"])
    for fqn, mask in masks.masks.items():
        grid = block_grid(shapes[fqn], 16)
        kept_blocks = int(grid.reduce(mask).sum())
        assert abs(kept_blocks - erk[fqn] / mask.numel() * grid.grid[0] * grid.grid[1]) <= 0.5 + 1e-9, fqn


def test_block_drop_and_grow_match_brute_force():
    generator = torch.Generator().manual_seed(3)
    shape, block = (48, 40), 16
    grid = block_grid(shape, block)
    weight = torch.randn(shape, generator=generator)
    score = torch.rand(shape, generator=generator)
    block_mask = torch.tensor([[True, False, True], [False, True, False], [True, True, False]])
    units = BlockUnits({"w": shape}, block)
    new, stats = update_layer_masks({"w": units.pool("w", weight.abs())}, {"w": block_mask},
                                    {"joint": {"w": units.pool("w", score)}}, {"w": frozenset({"joint"})}, 0.5,
                                    grow="gradient")
    # brute force: block sums in Python, drop the smallest magnitudes, grow the largest scores
    cells = list(itertools.product(range(3), range(3)))

    def block_sum(values, r, c):
        gemm = grid.to_gemm(values)
        return float(gemm[r * block:(r + 1) * block, c * block:(c + 1) * block].sum())

    active = [cell for cell in cells if block_mask[cell]]
    num_drop = int(0.5 * len(active))
    dropped = sorted(active, key=lambda cell: (block_sum(weight.abs(), *cell), cells.index(cell)))[:num_drop]
    candidates = [cell for cell in cells if not block_mask[cell] or cell in dropped]
    grown = sorted(candidates, key=lambda cell: (-block_sum(score, *cell), cells.index(cell)))[:num_drop]
    expected = {cell for cell in active if cell not in dropped} | set(grown)
    assert {cell for cell in cells if new["w"][cell]} == expected
    assert stats.dropped["w"] == num_drop


def test_dynamic_block_update_moves_blocks_and_restarts_them_at_zero():
    tasks = build_tasks(TASKS, num_classes=10)
    model = tiny_model(tasks)
    settings = SparsityConfig(method="disparse_dynamic", target=0.8, interval=1, end=1.0, granularity="block", block=16)
    sparsifier = build_sparsifier(settings, MaskInputs(tasks, settings, seed=0, total_steps=10))
    model = sparsifier.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sparsifier.bind(optimizer)
    layers = sparsifier.state.applier.layers
    assert layers, "masked layers are swapped for block-sparse ones"
    before = {fqn: layer.block_mask().clone() for fqn, layer in layers.items()}
    batch = make_batches(1)[0]
    for step in range(1, 3):
        outputs = model(batch["rgb"])
        sum(task.loss(outputs[n], batch[n]) for n, task in tasks.items()).backward()
        optimizer.step()
        optimizer.zero_grad()
        report = sparsifier.step(step, batch)
        assert report["sparsity/grown"] > 0
    masks = sparsifier.masks
    assert masks.meta["num_kept"] == masks.num_kept and masks.meta["sparsity_achieved"] == masks.sparsity
    moved = 0
    for fqn, layer in layers.items():
        after = layer.block_mask()
        assert int(after.sum()) == int(before[fqn].sum()), "every layer keeps its number of blocks"
        assert torch.equal(sparsifier.masks.masks[fqn], block_grid(layer.weight_shape, 16).expand(after))
        moved += int((after & ~before[fqn]).sum())
    assert moved > 0
    # the last update's grown blocks restart at zero weight and zero Adam state
    last = sparsifier.masks.masks
    weights = sparsifier.state.applier.weights()
    for fqn, layer in layers.items():
        state = optimizer.state[layer.blocks]
        dense_avg = layer.dense_of(state["exp_avg"])
        grown_positions = weights[fqn].eq(0) & last[fqn]
        assert torch.count_nonzero(dense_avg[grown_positions]) == 0


def test_block_and_element_appliers_train_alike_given_the_same_masks(tmp_path):
    tasks = build_tasks(TASKS, num_classes=10)
    reference = tiny_model(tasks)
    masks = prune(reference, tasks, None, method="random", sparsity=0.7, granularity="block", block=16)
    element_masks = MaskSet({k: v.clone() for k, v in masks.masks.items()}, {**masks.meta, "granularity": "element",
                                                                             "block": None})
    element_model = copy.deepcopy(reference)
    losses = {}
    for label, model, given, granularity in (("element", element_model, element_masks, "element"),
                                             ("block", reference, masks, "block")):
        given.save(tmp_path / f"{label}.pt")
        config = SparsityConfig(masks=str(tmp_path / f"{label}.pt"), granularity=granularity,
                                **({"block": 16} if granularity == "block" else {}))
        sparsifier = build_sparsifier(config, MaskInputs(tasks, config))
        model = sparsifier.prepare(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
        sparsifier.bind(optimizer)
        losses[label] = []
        for batch in make_batches(3):
            outputs = model(batch["rgb"])
            loss = sum(task.loss(outputs[n], batch[n]) for n, task in tasks.items())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[label].append(float(loss.detach()))
        weights = sparsifier.state.applier.weights()
        for fqn, mask in sparsifier.masks.masks.items():
            assert torch.count_nonzero(weights[fqn][~mask]) == 0
    torch.testing.assert_close(torch.tensor(losses["block"]), torch.tensor(losses["element"]), rtol=1e-4, atol=1e-4)


def _rank_worker(rank, world_size, init_file, batches, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tasks = build_tasks(TASKS, num_classes=10)
        masks = prune(tiny_model(tasks), tasks, iter(batches[rank::world_size]), method="disparse", sparsity=0.9,
                      num_batches=len(batches) // world_size, granularity="block", block=16)
        if rank == 0:
            masks.save(out)
    finally:
        dist.barrier()  # no rank tears gloo down while the other still has work in flight
        dist.destroy_process_group()


def test_one_and_two_ranks_derive_the_same_block_masks(tmp_path):
    batches = make_batches(4)
    tasks = build_tasks(TASKS, num_classes=10)
    single = prune(tiny_model(tasks), tasks, iter(batches), method="disparse", sparsity=0.9, num_batches=4,
                   granularity="block", block=16)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), batches, str(tmp_path / "two.pt")), nprocs=2)
    assert MaskSet.load(tmp_path / "two.pt").digest() == single.digest()


def test_mismatched_granularity_is_refused(tmp_path):
    tasks = build_tasks(TASKS, num_classes=10)
    block_masks = prune(tiny_model(tasks), tasks, None, method="random", sparsity=0.5, granularity="block", block=32)
    element_masks = prune(tiny_model(tasks), tasks, None, method="random", sparsity=0.5)
    block_masks.save(tmp_path / "block.pt")
    element_masks.save(tmp_path / "element.pt")
    cases = [("block.pt", "element", 32, "hold block masks \\(block 32\\) but the config asks for element masks"),
             ("block.pt", "block", 16, "set sparsity.granularity=block sparsity.block=32"),
             ("element.pt", "block", 32, "hold element masks but the config asks for block masks \\(block 32\\)")]
    for name, granularity, block, message in cases:
        settings = SparsityConfig(masks=str(tmp_path / name), granularity=granularity, block=block)
        with pytest.raises(ValueError, match=message):
            build_sparsifier(settings, MaskInputs(tasks, settings))
    with pytest.raises(ValueError, match="sparsity.block must be one of 16, 32, 64"):
        config_from_dict({"sparsity": {"method": "disparse", "granularity": "block", "block": 24}})
    with pytest.raises(ValueError, match="sparsity.granularity must be one of element, block"):
        config_from_dict({"sparsity": {"method": "disparse", "granularity": "row"}})
    with pytest.raises(ValueError, match="sparsity.kernel must be one of auto, cpu, triton, torch"):
        config_from_dict({"sparsity": {"method": "disparse", "granularity": "block", "kernel": "cuda"}})


@pytest.mark.parametrize("method, granularity, zero_stage", [
    ("disparse_dynamic", "element", None), ("disparse_dynamic", "block", None), ("rigl", "element", None),
    ("rigl", "block", None), ("disparse_dynamic", "element", 0), ("disparse_dynamic", "block", 2)])
def test_growth_from_the_training_step_equals_growth_from_its_own_pass(method, granularity, zero_stage):
    """Scores taken from the step's joint backward (plus a backward per task but one) equal
    those of a separate forward and a backward per task at the same weights, up to float32
    rounding of the joint gradient (1e-4 of each layer's largest score)."""
    tasks = build_tasks(TASKS, num_classes=10)
    weights = {"seg": 1.0, "normal": 3.0, "depth": 2.0, "keypoint": 7.0, "edge": 0.5}
    settings = SparsityConfig(method=method, target=0.8, interval=1, end=1.0, granularity=granularity,
                              block=16 if granularity == "block" else 32)
    sparsifier = build_sparsifier(settings, MaskInputs(tasks, settings, task_weights=weights, total_steps=10))
    model = sparsifier.prepare(tiny_model(tasks))
    batch = make_batches(1)[0]
    if zero_stage is None:
        engine, optimizer = None, torch.optim.Adam(model.parameters())
    else:
        engine = _engine(model, zero_stage)
        optimizer = engine.optimizer
    sparsifier.bind(optimizer)
    state = sparsifier.state
    reference = state.method_scores = sparsifier.method.growth_scores(state, [batch])  # own forward, no capture
    sparsifier.begin_step(1, batch)
    outputs = (engine or model)(batch["rgb"])
    loss = sum(weights[n] * task.loss(outputs[n], batch[n]) for n, task in tasks.items())
    engine.backward(loss) if engine is not None else loss.backward()
    captured = sparsifier.method.growth_scores(state, [batch])
    assert set(captured) == set(reference)
    for task, per_layer in reference.items():
        assert set(captured[task]) == set(per_layer)
        for name, score in per_layer.items():
            error = float((captured[task][name] - score).abs().max())
            assert error <= 1e-4 * float(score.abs().max()), f"{task} {name}: {error}"


def _engine(model, zero_stage):
    import deepspeed

    from dsparse.distributed import init_distributed

    init_distributed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters()), config={
        "train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False})
    return engine


def test_bf16_weights_take_every_task_gradient_directly():
    from dsparse.sparsity.methods.dynamic import derived_task

    tasks = build_tasks(TASKS, num_classes=10)
    settings = SparsityConfig(method="disparse_dynamic", target=0.8)
    inputs = MaskInputs(tasks, settings, task_weights={"normal": 3.0})
    assert derived_task(inputs, {"w": torch.zeros(2)}) == "normal"
    assert derived_task(inputs, {"w": torch.zeros(2, dtype=torch.bfloat16)}) is None


def test_checkpoints_from_before_the_sparsifier_still_resume(tmp_path):
    from dsparse.sparsity.sparsifier import read_sparsifier_state

    masks = MaskSet({"w": torch.tensor([True, False])}, {"method": "rigl"})
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    assert read_sparsifier_state(checkpoint) == {}
    masks.save(tmp_path / "run" / "masks.pt")  # a static run kept its masks in the run directory
    assert MaskSet.from_state_dict(read_sparsifier_state(checkpoint)["masks"]).digest() == masks.digest()
    masks.masks["w"] = torch.tensor([False, True])
    masks.save(checkpoint / "masks.pt")  # a dynamic run kept them beside each checkpoint
    assert MaskSet.from_state_dict(read_sparsifier_state(checkpoint)["masks"]).digest() == masks.digest()
