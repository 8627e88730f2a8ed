"""Tests for dsparse.sparsity.saliency.

The central check compares the retained-graph implementation (one forward per batch,
one ``autograd.grad`` per task) with the plain approach it replaces: for each task a
fresh forward and ``L_t.backward()`` into ``.grad``, accumulated over the same batches.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dsparse.models import build_branched_model, build_model, prunable_parameters
from dsparse.sparsity import saliency
from dsparse.sparsity.criteria import CRITERIA
from dsparse.sparsity.saliency import (
    JOINT,
    all_reduce_scores,
    compute_saliency,
    normalize_scores,
    task_weight_users,
)
from dsparse.tasks import build_tasks

TASK_NAMES = ["seg", "normal", "depth", "keypoint", "edge"]
NUM_CLASSES = 5
TINY = dict(base_width=4, head_dilations=(1, 2))


def make_tasks(names=TASK_NAMES):
    return build_tasks(list(names), num_classes=NUM_CLASSES if "seg" in names else None)


def make_model(tasks, seed=0):
    torch.manual_seed(seed)
    return build_model("resnet18", {t: task.num_channels for t, task in tasks.items()}, **TINY)


def make_batches(num, tasks, batch_size=2, size=32, seed=1):
    """Random tensors shaped like loader batches (with some ignored/invalid pixels)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        b = {"rgb": torch.randn(batch_size, 3, size, size, generator=g), "__key__": ["k"] * batch_size}
        for t in tasks:
            if t == "seg":
                seg = torch.randint(0, NUM_CLASSES, (batch_size, size, size), generator=g)
                seg[:, :4] = 255
                b[t] = seg
            elif t == "normal":
                b[t] = torch.randn(batch_size, 3, size, size, generator=g)
            else:
                b[t] = torch.rand(batch_size, 1, size, size, generator=g)
        batches.append(b)
    return batches


def reference_scores(model, tasks, batches, criterion, joint=False, task_weights=None):
    """The plain approach: per group, a fresh forward and backward into .grad per batch."""
    model = copy.deepcopy(model).train()
    weights = prunable_parameters(model)
    users = task_weight_users(model)
    lambdas = {t: (task_weights or {}).get(t, 1.0) for t in tasks}
    groups = {JOINT: list(users)} if joint else {t: [f for f, u in users.items() if t in u] for t in tasks}
    result = {}
    for group, fqns in groups.items():
        sums = {f: torch.zeros_like(weights[f]) for f in fqns}
        for batch in batches:
            model.zero_grad(set_to_none=True)
            out = model(batch["rgb"])
            if joint:
                loss = sum(lambdas[t] * task.loss(out[t], batch[t]) for t, task in tasks.items())
            else:
                loss = tasks[group].loss(out[group], batch[group])
            loss.backward()
            for f in fqns:
                grad = weights[f].grad if weights[f].grad is not None else torch.zeros_like(weights[f])
                term = (grad * weights[f]).abs() if criterion == "snip" else grad.abs()
                sums[f] += term.detach()
        if criterion == "grad_w2":
            sums = {f: s * weights[f].detach() ** 2 for f, s in sums.items()}
        result[group] = sums
    return result


def assert_scores_close(actual, expected):
    assert list(actual) == list(expected)
    for group in expected:
        assert list(actual[group]) == list(expected[group])
        for fqn, ref in expected[group].items():
            scale = ref.abs().max().item() or 1.0
            torch.testing.assert_close(actual[group][fqn].float(), ref.float(), rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m: f"{group} {fqn}: {m}")


class Untouchable:
    """Batches a data-free criterion must never read."""

    def __iter__(self):
        raise AssertionError("data-free criterion touched the batches")

    def __next__(self):
        raise AssertionError("data-free criterion touched the batches")



@pytest.fixture(scope="module")
def tasks():
    return make_tasks()


@pytest.fixture(scope="module")
def model(tasks):
    return make_model(tasks)


@pytest.fixture(scope="module")
def batches(tasks):
    return make_batches(3, tasks)


# ---------------------------------------------------------------- equivalence with the plain approach


@pytest.mark.parametrize("criterion", ["snip", "grad_w2"])
def test_matches_plain_reference(model, tasks, batches, criterion):
    scores = compute_saliency(model, tasks, batches, criterion=criterion, num_batches=3)
    assert_scores_close(scores, reference_scores(model, tasks, batches, criterion))
    for per_fqn in scores.values():
        for s in per_fqn.values():
            assert s.dtype == (torch.float64 if criterion in ("snip", "grad_w2") else torch.float32) and bool((s >= 0).all())


def test_joint_matches_weighted_joint_loss(model, tasks, batches):
    weights = {"seg": 2.0, "depth": 0.5}
    scores = compute_saliency(model, tasks, batches, num_batches=2, joint=True, task_weights=weights)
    assert list(scores) == [JOINT]
    assert list(scores[JOINT]) == list(prunable_parameters(model))
    assert_scores_close(scores, reference_scores(model, tasks, batches[:2], "snip", joint=True,
                                                 task_weights=weights))


def test_wrapped_model_gives_same_scores(model, tasks, batches):
    class Wrapper(nn.Module):  # stands in for a DeepSpeed engine / DDP
        def __init__(self, module):
            super().__init__()
            self.module = module

    plain = compute_saliency(model, tasks, batches, num_batches=1)
    wrapped = compute_saliency(Wrapper(model), tasks, batches, num_batches=1)
    assert_scores_close(wrapped, plain)


# ---------------------------------------------------------------- which weights each task scores


def test_heads_scored_only_by_their_task_trunk_by_all(model, tasks, batches):
    scores = compute_saliency(model, tasks, batches, num_batches=1)
    weights = prunable_parameters(model)
    for fqn in weights:
        holders = {t for t in scores if fqn in scores[t]}
        if fqn.startswith("trunk."):
            assert holders == set(TASK_NAMES), fqn
        else:
            task = fqn.split(".")[1]  # heads.<task>.branches...
            assert holders == {task}, fqn
            assert scores[task][fqn].sum() > 0, f"{fqn} got no gradient from its own task"


def test_branched_block_scored_only_by_its_tasks():
    tasks = make_tasks(["seg", "normal", "depth"])
    torch.manual_seed(0)
    model = build_branched_model("resnet18", {t: k.num_channels for t, k in tasks.items()},
                                 [{"seg", "depth"}, {"normal"}], branch_from="layer3", **TINY)
    batches = make_batches(2, tasks)
    scores = compute_saliency(model, tasks, batches, num_batches=2)
    assert_scores_close(scores, reference_scores(model, tasks, batches, "snip"))
    shared_by_two = [f for f in prunable_parameters(model) if f.startswith("branches.0.")]
    assert shared_by_two
    for fqn in shared_by_two:
        assert fqn in scores["seg"] and fqn in scores["depth"] and fqn not in scores["normal"]
    stem = next(iter(prunable_parameters(model)))
    assert all(stem in scores[t] for t in tasks)


# ---------------------------------------------------------------- data-free criteria


def test_magnitude_is_abs_weight_and_reads_no_batches(model, tasks):
    scores = compute_saliency(model, tasks, Untouchable(), criterion="magnitude")
    users = task_weight_users(model)
    weights = prunable_parameters(model)
    for t in tasks:
        assert list(scores[t]) == [f for f, u in users.items() if t in u]
        for fqn, s in scores[t].items():
            torch.testing.assert_close(s, weights[fqn].detach().abs(), rtol=0, atol=0)


def test_random_is_seeded_and_reads_no_batches(model, tasks):
    first = compute_saliency(model, tasks, Untouchable(), criterion="random", seed=3)
    torch.manual_seed(12345)  # the global RNG must not matter
    again = compute_saliency(model, tasks, Untouchable(), criterion="random", seed=3)
    other = compute_saliency(model, tasks, Untouchable(), criterion="random", seed=4)
    joint = compute_saliency(model, tasks, Untouchable(), criterion="random", seed=3, joint=True)
    for t in tasks:
        for fqn, s in first[t].items():
            assert torch.equal(s, again[t][fqn])
            assert not torch.equal(s, other[t][fqn])
            assert torch.equal(s, joint[JOINT][fqn])
            assert bool((s >= 0).all() and (s < 1).all())


# ---------------------------------------------------------------- no side effects


def test_no_side_effects_on_grads_bn_and_mode(tasks, batches):
    model = make_model(tasks)
    with torch.no_grad():  # non-trivial running stats to compare against
        model.train()(batches[0]["rgb"])
    model.eval()
    model.heads["seg"].train()  # a mixed mode must come back exactly
    params = dict(model.named_parameters())
    sentinel = {name: torch.full_like(p, 7.0) for i, (name, p) in enumerate(params.items()) if i % 2 == 0}
    for name, p in params.items():
        p.grad = sentinel[name].clone() if name in sentinel else None
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}

    with torch.no_grad():  # scoring must still work inside a no_grad region
        compute_saliency(model, tasks, batches, num_batches=2)

    for name, p in params.items():
        if name in sentinel:
            assert torch.equal(p.grad, sentinel[name]), name
        else:
            assert p.grad is None, name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert {name: m.training for name, m in model.named_modules()} == modes


# ---------------------------------------------------------------- errors


def test_too_few_batches(model, tasks, batches):
    with pytest.raises(ValueError, match=r"criterion snip needs 5 batches but the data gave only 3; "
                                         r"lower --num-batches or use more data"):
        compute_saliency(model, tasks, iter(batches), num_batches=5)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_num_batches_must_be_positive_int(model, tasks, batches, bad):
    with pytest.raises(ValueError, match="num_batches"):
        compute_saliency(model, tasks, batches, num_batches=bad)


def test_unknown_criterion_lists_known(model, tasks, batches):
    with pytest.raises(ValueError, match="unknown saliency criterion 'fisher'") as info:
        compute_saliency(model, tasks, batches, criterion="fisher")
    for name in ("snip", "grad_w2", "magnitude", "random"):
        assert name in str(info.value)
    assert set(CRITERIA) >= {"snip", "grad_w2", "magnitude", "random"}


def test_unknown_task_and_task_weight(model, tasks, batches):
    with pytest.raises(ValueError, match="not tasks of the model"):
        compute_saliency(model, {"semantic": tasks["seg"]}, batches, num_batches=1)
    with pytest.raises(ValueError, match="task_weights"):
        compute_saliency(model, tasks, batches, num_batches=1, joint=True, task_weights={"depht": 1.0})


def test_frozen_weight_is_a_clear_error(tasks, batches):
    model = make_model(tasks)
    model.trunk.stem[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="trunk.stem.0.weight"):
        compute_saliency(model, tasks, batches, num_batches=1)
    compute_saliency(model, tasks, Untouchable(), criterion="magnitude")  # data-free still works


# ---------------------------------------------------------------- normalisation


def test_normalize_each_task_sums_to_one(model, tasks, batches):
    scores = compute_saliency(model, tasks, batches, num_batches=1)
    scores["zero"] = {"a": torch.zeros(3)}
    before = {t: {f: s.clone() for f, s in per.items()} for t, per in scores.items()}
    normalized = normalize_scores(scores)
    for t in tasks:
        total = sum(s.double().sum() for s in normalized[t].values())
        assert abs(total.item() - 1.0) < 1e-5
        for f, s in normalized[t].items():
            assert s.dtype == torch.float32 and s is not scores[t][f]
    assert torch.equal(normalized["zero"]["a"], torch.zeros(3))
    for t, per in before.items():  # the input is not modified
        for f, s in per.items():
            assert torch.equal(scores[t][f], s)


# ---------------------------------------------------------------- all-reduce


def test_all_reduce_is_noop_on_one_rank():
    """Without a process group, or in a group of one (other tests may have made one)."""
    scores = {"seg": {"w": torch.ones(2, 3)}}
    assert not dist.is_initialized() or dist.get_world_size() == 1
    assert all_reduce_scores(scores) is scores


def _rank_scores(rank: int) -> dict:
    # Ranks build their dicts in different key orders; values depend on the rank.
    order = ["b.weight", "a.weight", "c.weight"] if rank == 0 else ["c.weight", "a.weight", "b.weight"]
    shapes = {"a.weight": (2, 3), "b.weight": (4,), "c.weight": (1, 2, 2)}
    per = {f: torch.arange(torch.Size(shapes[f]).numel(), dtype=torch.float32).reshape(shapes[f]) * (rank + 1)
           + 10 * i for i, f in enumerate(sorted(shapes))}
    tasks = ["seg", "depth"] if rank == 0 else ["depth", "seg"]
    return {t: {f: per[f] + (100 if t == "depth" else 0) for f in order} for t in tasks}


def _all_reduce_worker(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        calls = []
        original = saliency.all_reduce_sum
        saliency.all_reduce_sum = lambda t: calls.append(t.numel()) or original(t)
        scores = _rank_scores(rank)
        reduced = all_reduce_scores(scores)
        assert len(calls) == 2, calls  # one all-reduce per task
        assert list(reduced) == list(scores)
        expected = {t: {f: sum(_rank_scores(r)[t][f] for r in range(world_size)) for f in per}
                    for t, per in scores.items()}
        for t in scores:
            assert list(reduced[t]) == list(scores[t])  # keeps this rank's fqn order
            for f in scores[t]:
                assert torch.equal(reduced[t][f], expected[t][f]), (t, f)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_ranks_gloo():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_all_reduce_worker, args=(2, init_file), nprocs=2, join=True)
