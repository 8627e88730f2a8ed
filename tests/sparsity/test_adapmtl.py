"""AdapMTL: the soft threshold against hand-computed values, thresholds attached from outside
the model, the freeze at the target, the exact projection, resume, ranks, refusals."""

import logging
import math
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsparse.config import config_from_dict
from dsparse.models import build_model, parameter_users, prunable_parameters
from dsparse.runs import latest_checkpoint, load_model_weights
from dsparse.runs.restore import restore_run
from dsparse.sparsity import MaskInputs, build_sparsifier
from dsparse.sparsity.appliers import count_pruned_nonzeros
from dsparse.sparsity.components import component_sparsity, components
from dsparse.sparsity.methods.adapmtl import GROUP, project_exact
from dsparse.sparsity.soft_threshold import (THRESHOLDS, attach_soft_thresholds, release_layers, soft_threshold,
                                             thresholded_layers)
from dsparse.tasks import build_tasks
from dsparse.train.optim import build_optimizer

from .test_distributed_masks import TASKS, make_batches
from .test_dynamic_training import dynamic_config


def logit(p):
    return math.log(p / (1 - p))


def test_soft_threshold_forward_and_gradient_match_the_hand_computed_ones():
    w = torch.tensor([0.5, -0.2, 0.05, 0.0, -0.6, 0.1], requires_grad=True)
    s = torch.tensor([logit(0.1)], requires_grad=True)
    out = soft_threshold(w, torch.sigmoid(s))
    assert torch.allclose(out, torch.tensor([0.4, -0.1, 0.0, 0.0, -0.5, 0.0]), atol=1e-6)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (out * upstream).sum().backward()
    # d/dw = 1 where |w| > tau (sign(w)^2), else 0; d/ds = -sum over kept of upstream * sign(w) * sigmoid'(s)
    assert torch.equal(w.grad, torch.tensor([1.0, 2.0, 0.0, 0.0, 5.0, 0.0]))
    expected = -(1.0 * 1 + 2.0 * -1 + 5.0 * -1) * 0.1 * 0.9
    assert s.grad.item() == pytest.approx(expected, rel=1e-5)


def small_model():
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=8, head_dilations=(1, 2))
    return model, tasks


def test_thresholds_attach_from_outside_keeping_every_name_and_declaring_their_users():
    model, _ = small_model()
    before = set(model.state_dict())
    users = parameter_users(model)
    weights = prunable_parameters(model)
    layers = components(users)
    x = torch.randn(2, 3, 32, 32)
    conv_name = "trunk.layer1.0.conv1.weight"
    thresholds = attach_soft_thresholds(model, {n: layers[n] for n in weights}, {layers[n]: users[n] for n in weights},
                                        sinit=logit(0.05))
    after = set(model.state_dict())
    assert after - before == {f"{THRESHOLDS}.components.{c}.s" for c in ["trunk", *TASKS]} and before <= after
    declared = parameter_users(model)  # the thresholds are covered, with their component's users
    assert declared[f"{THRESHOLDS}.components.trunk.s"] == frozenset(TASKS)
    assert declared[f"{THRESHOLDS}.components.depth.s"] == frozenset({"depth"})
    assert prunable_parameters(model).keys() == weights.keys()
    conv = model.get_submodule(conv_name.rsplit(".", 1)[0])
    inputs = torch.randn(1, conv.in_channels, 8, 8)
    expected = torch.nn.functional.conv2d(inputs, soft_threshold(conv.weight, torch.tensor(0.05)), None, conv.stride,
                                          conv.padding, conv.dilation)
    assert torch.allclose(conv(inputs), expected, atol=1e-6)
    assert set(thresholded_layers(model)) == set(weights)
    sum(out.sum() for out in model(x).values()).backward()
    assert all(p.grad is not None for p in thresholds.parameters())
    release_layers(model)
    assert type(conv) is torch.nn.Conv2d and not thresholded_layers(model)


def test_projection_keeps_exactly_k_by_effective_then_raw_magnitude_then_position():
    effective = {"a": torch.tensor([0.0, 0.3, 0.0, 0.1]), "b": torch.tensor([[0.1, 0.0], [0.0, 0.5]])}
    raw = {"a": torch.tensor([0.2, 0.4, 0.25, 0.2]), "b": torch.tensor([[0.2, 0.25], [0.1, 0.6]])}
    for keep in range(9):
        kept = project_exact(effective, raw, keep)
        flat = torch.cat([kept["a"], kept["b"].flatten()])
        # brute force: order by (-effective, -raw, position)
        eff = torch.cat([effective["a"], effective["b"].flatten()]).tolist()
        mag = torch.cat([raw["a"], raw["b"].flatten()]).tolist()
        order = sorted(range(8), key=lambda i: (-eff[i], -mag[i], i))
        assert flat.tolist() == [i in order[:keep] for i in range(8)], keep
    with pytest.raises(ValueError, match="cannot keep 9 of 8"):
        project_exact(effective, raw, 9)


def sparsifier_for(model, tasks, *, sinit, target=0.8, total_steps=6, wd=0.1):
    config = config_from_dict({"tasks": TASKS, "sparsity": {
        "method": "adapmtl", "target": target, "interval": 1,
        "adapmtl": {"sinit": sinit, "threshold_weight_decay": wd}}})
    sparsifier = build_sparsifier(config.sparsity, MaskInputs(tasks, config.sparsity, seed=0, total_steps=total_steps))
    sparsifier.prepare(model)
    optimizer = build_optimizer(model.parameters(), config_from_dict({}).optimizer, sparsifier.param_groups())
    sparsifier.bind(optimizer)  # a plain torch optimizer: no engine needed
    return sparsifier, optimizer


def train_steps(model, tasks, sparsifier, optimizer, steps, batches):
    reports = []
    for step, batch in zip(steps, batches):
        optimizer.zero_grad()
        outputs = model(batch["rgb"])
        sum(task.loss(outputs[n], batch[n]) for n, task in tasks.items()).backward()
        optimizer.step()
        reports.append(sparsifier.step(step, batch))
    return reports


def thresholds_of(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(THRESHOLDS)}


def test_the_thresholds_freeze_at_the_target_and_the_weights_keep_training():
    model, tasks = small_model()
    sparsifier, optimizer = sparsifier_for(model, tasks, sinit=logit(0.2), target=0.6, total_steps=100)
    method = sparsifier.method
    group = sparsifier.state.optimizer.param_group(GROUP)
    assert group["weight_decay"] == 0.1 and optimizer.param_groups[0]["weight_decay"] == 5e-4  # the config's
    batches = make_batches(4, batch=2)
    first = train_steps(model, tasks, sparsifier, optimizer, [1], batches[:1])[0]
    assert method.reached_at == 1 and first["sparsity/trained"] >= 0.6  # large thresholds: reached at once
    assert group["weight_decay"] == 0.0
    frozen, weights = thresholds_of(model), {k: v.clone() for k, v in prunable_parameters(model).items()}
    train_steps(model, tasks, sparsifier, optimizer, [2, 3, 4], batches[1:])
    assert all(torch.equal(v, thresholds_of(model)[k]) for k, v in frozen.items())  # bit-equal, despite Adam
    assert all(optimizer.state[p]["exp_avg"].abs().sum() == 0 for p in method.thresholds.parameters())
    assert any(not torch.equal(w, prunable_parameters(model)[k]) for k, w in weights.items())


def test_training_below_the_target_keeps_the_thresholds_learning():
    model, tasks = small_model()
    sparsifier, optimizer = sparsifier_for(model, tasks, sinit=-30.0, target=0.6, total_steps=100)
    before = thresholds_of(model)
    reports = train_steps(model, tasks, sparsifier, optimizer, [1, 2], make_batches(2, batch=2))
    assert sparsifier.method.reached_at is None and reports[0]["sparsity/trained"] < 0.6
    assert all(not torch.equal(v, thresholds_of(model)[k]) for k, v in before.items())  # weight decay moves s


def test_the_last_step_projects_to_exactly_the_target_as_a_plain_masked_model(caplog):
    model, tasks = small_model()
    sparsifier, optimizer = sparsifier_for(model, tasks, sinit=-30.0, target=0.8, total_steps=2)
    with caplog.at_level(logging.WARNING, logger="dsparse.sparsity"):
        reports = train_steps(model, tasks, sparsifier, optimizer, [1, 2], make_batches(2, batch=2))
    assert "reached sparsity" in caplog.text and "Raise sparsity.adapmtl.threshold_weight_decay" in caplog.text
    masks = sparsifier.masks
    total = masks.num_total
    assert masks.num_kept == round(0.2 * total) and reports[-1]["sparsity/achieved"] == masks.sparsity
    assert not thresholded_layers(model)  # plain layers: the effective weights are stored
    weights = prunable_parameters(model)
    assert count_pruned_nonzeros(weights, masks) == 0
    summary = sparsifier.summary()
    assert summary["adapmtl"]["target_reached"] is False and summary["adapmtl"]["projected_at"] == 2
    assert summary["achieved"] == masks.sparsity and summary["adapmtl"]["trained_sparsity"] < 0.01
    assert set(summary["components"]) == {"trunk", *TASKS}
    # the stem is dense (the rule of dynamic methods) and counted as kept
    assert masks.meta["dense_layers"] == ["trunk.stem.0.weight"] and masks.masks["trunk.stem.0.weight"].all()
    # a step after the projection changes no mask and trains the kept weights only
    train_steps(model, tasks, sparsifier, optimizer, [3], make_batches(1, batch=2))
    assert count_pruned_nonzeros(prunable_parameters(model), masks) == 0


def test_component_sparsity_counts_each_component():
    masks = {"t.w": torch.tensor([True, False, False, False]), "h.a": torch.tensor([True, True]),
             "h.b": torch.tensor([False, False])}
    users = {"t.w": frozenset({"a", "b"}), "h.a": frozenset({"a"}), "h.b": frozenset({"b"})}
    assert component_sparsity(masks, users) == {"trunk": {"weights": 4, "kept": 1, "sparsity": 0.75},
                                                "a": {"weights": 2, "kept": 2, "sparsity": 0.0},
                                                "b": {"weights": 2, "kept": 0, "sparsity": 1.0}}


@pytest.mark.parametrize("setting, message", [
    ({"granularity": "block", "block": 16}, "supports sparsity.granularity=element only, not block"),
    ({"granularity": "channel"}, "supports sparsity.granularity=element only, not channel"),
    ({"criterion": "snip"}, "scores no weights: sparsity.criterion has no effect"),
    ({"masks": "masks.pt"}, "cannot take sparsity.masks"),
    ({"score_init": "xavier"}, "no effect with method 'adapmtl'"),
    ({"adapmtl": {"threshold_weight_decay": -1}}, "threshold_weight_decay must be >= 0"),
    ({"adapmtl": {"sinit": float("nan")}}, "sinit must be a finite number"),
])
def test_settings_adapmtl_cannot_honour_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"sparsity": {"method": "adapmtl", **setting}})


def test_adapmtl_settings_with_another_method_are_refused():
    with pytest.raises(ValueError, match="sparsity.adapmtl has no effect with method 'disparse'"):
        config_from_dict({"sparsity": {"method": "disparse", "adapmtl": {"sinit": -10}}})


def _measure_worker(rank, world_size, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, tasks = small_model()
        sparsifier, _ = sparsifier_for(model, tasks, sinit=logit(0.1))
        if rank == 1:  # the ranks' weights differ: the count must still be one value on both
            with torch.no_grad():
                for weight in prunable_parameters(model).values():
                    weight.mul_(2.0)
        measured = sparsifier.method.measure(sparsifier.state)
        torch.save(measured["sparsity"], f"{out}.{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_ranks_agree_on_the_counted_sparsity(tmp_path):
    out = tmp_path / "measured"
    mp.spawn(_measure_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    assert torch.load(f"{out}.0") == torch.load(f"{out}.1")


def adapmtl_config(dataset, run_dir, *, sinit, iterations=10, zero_stage=0, checkpoint_interval=None):
    config = dynamic_config(dataset, run_dir, method="adapmtl", zero_stage=zero_stage, iterations=iterations)
    config["sparsity"] = {"method": "adapmtl", "target": 0.5, "interval": 1,
                          "adapmtl": {"sinit": sinit, "threshold_weight_decay": 1.0}}
    config["train"]["checkpoint_interval"] = checkpoint_interval or iterations
    return config


@pytest.mark.e2e
@pytest.mark.parametrize("sinit", [-3.5, -30.0], ids=["freezes-before-the-stop", "never-freezes"])
def test_a_run_resumed_after_a_stop_equals_the_uninterrupted_run(tiny_dataset, tmp_path, sinit):
    from dsparse.train.trainer import Trainer

    straight = Trainer(config_from_dict(adapmtl_config(tiny_dataset, tmp_path / "a", sinit=sinit)))
    summary = straight.fit()
    config = config_from_dict(adapmtl_config(tiny_dataset, tmp_path / "b", sinit=sinit))
    Trainer(config).fit(stop_after=5)
    resumed = Trainer(config, resume=True)
    reached = summary["sparsity"]["adapmtl"]["reached_at"]
    assert resumed.sparsifier.method.reached_at == (reached if reached is not None and reached <= 5 else None)
    resumed_summary = resumed.fit()
    assert resumed.sparsifier.masks.digest() == straight.sparsifier.masks.digest()
    a = load_model_weights(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    b = load_model_weights(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert resumed_summary["sparsity"]["adapmtl"] == summary["sparsity"]["adapmtl"]
    assert summary["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-5)
    if sinit > -10:
        assert summary["sparsity"]["adapmtl"]["reached_at"] <= 5  # the freeze state crossed the resume


@pytest.mark.e2e
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_frozen_thresholds_stay_put_under_every_zero_stage(tiny_dataset, tmp_path, zero_stage):
    """ZeRO 1/2 link a later parameter group's optimizer state to nothing (DeepSpeed links
    them after the first group's first step); the freeze must reach that state anyway."""
    from dsparse.train.trainer import Trainer

    trainer = Trainer(config_from_dict(adapmtl_config(tiny_dataset, tmp_path / "run", sinit=-3.5, iterations=6,
                                                      zero_stage=zero_stage)))
    method, seen = trainer.sparsifier.method, {}
    update = method.update

    def spy(step, batches, state):
        result = update(step, batches, state)
        seen[step] = method.thresholds.values()
        return result

    method.update = spy
    trainer.fit()
    assert method.reached_at is not None and method.reached_at < 5
    frozen = [seen[step] for step in range(method.reached_at, 7)]
    assert all(values == frozen[0] for values in frozen)


@pytest.mark.e2e
def test_checkpoints_restore_as_plain_models_computing_what_the_run_computed(tiny_dataset, tmp_path):
    from dsparse.train.trainer import Trainer

    trainer = Trainer(config_from_dict(adapmtl_config(tiny_dataset, tmp_path / "run", sinit=-3.5, iterations=6,
                                                      checkpoint_interval=3)))
    trainer.fit(stop_after=3)  # a checkpoint before the projection: the thresholds are folded in
    x = torch.randn(2, 3, 32, 32)
    model = trainer.engine.module.eval()
    with torch.no_grad():
        expected = model(x)
    restored = restore_run(tmp_path / "run").model.eval()
    assert not hasattr(restored, THRESHOLDS) and not thresholded_layers(restored)
    with torch.no_grad():
        got = restored(x)
    assert all(torch.allclose(got[t], expected[t], atol=1e-5) for t in expected)
    Trainer(trainer.config, resume=True).fit()  # after the projection: the stored weights themselves
    final = restore_run(tmp_path / "run")
    assert final.masks.meta["projected"] is True and count_pruned_nonzeros(
        prunable_parameters(final.model), final.masks) == 0


@pytest.mark.e2e
def test_two_process_zero2_adapmtl_training(tiny_dataset, tmp_path, torchrun_train):
    summary, log = torchrun_train(adapmtl_config(tiny_dataset, tmp_path / "ddp", sinit=-3.5, iterations=6,
                                                 zero_stage=2), with_log=True)
    # the projection checked the mask digest across both ranks; exactly the target, pruned weights zero
    adapmtl = summary["sparsity"]["adapmtl"]
    assert summary["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-5)
    assert summary["sparsity"]["pruned_nonzeros"] == 0 and adapmtl["projected_at"] == 6
    # frozen before the end under ZeRO 2's partitioned optimizer: the thresholds did not move after it
    assert adapmtl["target_reached"] and adapmtl["reached_at"] < 6
    frozen = re.search(r"thresholds frozen at (.*)", log).group(1)
    values = dict(part.split(" ") for part in frozen.split(", "))
    assert {c: float(v) for c, v in values.items()} == pytest.approx(adapmtl["thresholds"], rel=1e-3)
