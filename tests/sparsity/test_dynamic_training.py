"""Dynamic sparse training in the real loop: exact ERK densities after every update, grown
weights and their optimizer state zero under ZeRO 0/1/2, schedule end, resume, ranks agree."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsparse.config import config_from_dict
from dsparse.models import build_model, prunable_parameters
from dsparse.sparsity import MaskInputs, MaskSet, build_sparsifier
from dsparse.sparsity.optim_state import optimizer_state_at
from dsparse.tasks import build_tasks
from dsparse.runs import latest_checkpoint, load_model_weights
from dsparse.train.trainer import Trainer

from .test_distributed_masks import TASKS, make_batches

pytestmark = pytest.mark.e2e


def dynamic_config(dataset, run_dir, *, method="disparse_dynamic", zero_stage=0, iterations=8, interval=2,
                   end=1.0, lr=0.01):
    return {
        "tasks": TASKS,
        "output_dir": str(run_dir),
        "data": {"path": str(dataset), "batch_size": 4, "eval_batch_size": 8, "num_workers": 0},
        "model": {"arch": "resnet18", "base_width": 8, "head_dilations": [1, 2]},
        "optimizer": {"name": "adam", "lr": lr, "weight_decay": 0.01},
        "schedule": {"name": "constant"},
        "train": {"iterations": iterations, "eval_interval": iterations, "log_interval": iterations,
                  "checkpoint_interval": iterations, "eval_batches": 1},
        "deepspeed": {"zero_stage": zero_stage},
        "tracking": {"enabled": False},
        "sparsity": {"method": method, "target": 0.8, "interval": interval, "end": end, "alpha0": 0.5},
    }


def spy_on_updates(trainer):
    """Record the masks before every update that happens."""
    sparsifier, before = trainer.sparsifier, {}
    original = sparsifier.step

    def spy(step, batch):
        snapshot = {n: m.clone() for n, m in sparsifier.masks.masks.items()}
        result = original(step, batch)
        if result is not None:
            before[step] = snapshot
        return result

    sparsifier.step = spy
    return before


def layer_counts(masks):
    return {name: int(mask.sum()) for name, mask in masks.items()}


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_updates_keep_erk_counts_and_zero_grown_state(tiny_dataset, tmp_path, zero_stage):
    trainer = Trainer(config_from_dict(dynamic_config(tiny_dataset, tmp_path / "run", zero_stage=zero_stage)))
    erk = layer_counts(trainer.sparsifier.masks.masks)
    before = spy_on_updates(trainer)
    trainer.fit(stop_after=4)  # updates after steps 2 and 4; nothing trains after the second
    assert sorted(before) == [2, 4]
    masks = trainer.sparsifier.masks.masks
    assert layer_counts(masks) == erk, "every layer must return exactly to its ERK count"
    weights = prunable_parameters(trainer.engine.module)
    num_grown = 0
    for name, mask in masks.items():
        grown = mask & ~before[4][name]
        num_grown += int(grown.sum())
        assert torch.count_nonzero(weights[name].detach()[~mask]) == 0, name
        assert torch.count_nonzero(weights[name].detach()[grown]) == 0, f"grown weights of {name} must start at 0"
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer_state_at(weights[name], trainer.engine.optimizer, key)
            assert torch.count_nonzero(state.reshape(mask.shape)[grown]) == 0, f"{key} of grown {name}"
    assert num_grown > 0


def test_no_mask_change_after_end(tiny_dataset, tmp_path):
    trainer = Trainer(config_from_dict(dynamic_config(tiny_dataset, tmp_path / "run", iterations=8, end=0.5)))
    before = spy_on_updates(trainer)
    summary = trainer.fit()
    assert sorted(before) == [2, 4]
    assert summary["sparsity"]["num_updates"] == 2
    densities = summary["sparsity"]["layer_density"]
    assert set(densities) == set(trainer.sparsifier.masks.masks)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_baselines_run_in_the_same_loop(tiny_dataset, tmp_path, method):
    trainer = Trainer(config_from_dict(dynamic_config(tiny_dataset, tmp_path / method, method=method, iterations=4)))
    erk = layer_counts(trainer.sparsifier.masks.masks)
    summary = trainer.fit()
    assert summary["sparsity"]["num_updates"] == 2 and summary["sparsity"]["pruned_nonzeros"] == 0
    assert layer_counts(trainer.sparsifier.masks.masks) == erk


def test_resume_mid_schedule_equals_uninterrupted(tiny_dataset, tmp_path):
    straight = Trainer(config_from_dict(dynamic_config(tiny_dataset, tmp_path / "a", iterations=10)))
    straight.fit()
    config = config_from_dict(dynamic_config(tiny_dataset, tmp_path / "b", iterations=10))
    Trainer(config).fit(stop_after=5)
    resumed = Trainer(config, resume=True)
    resumed.fit()
    assert resumed.sparsifier.masks.digest() == straight.sparsifier.masks.digest()
    a = load_model_weights(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    b = load_model_weights(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _dynamic_masks_after_updates(batches_per_update, rank_slice):
    torch.manual_seed(0)
    tasks = build_tasks(TASKS, num_classes=10)
    model = build_model("resnet18", {n: t.num_channels for n, t in tasks.items()}, base_width=8, head_dilations=(1, 2))
    config = config_from_dict({"tasks": TASKS, "sparsity": {"method": "disparse_dynamic", "target": 0.8,
                                                            "interval": 1, "end": 1.0, "alpha0": 0.5}})
    sparsifier = build_sparsifier(config.sparsity, MaskInputs(tasks, config.sparsity, seed=0, total_steps=10))
    sparsifier.prepare(model)
    sparsifier.bind(torch.optim.Adam(model.parameters()))  # a plain torch optimizer: no engine needed
    for step, batches in enumerate(batches_per_update, start=1):
        sparsifier.step(step, batches[rank_slice])
    return sparsifier.masks


def _rank_worker(rank, world_size, init_file, batches_per_update, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        masks = _dynamic_masks_after_updates(batches_per_update, slice(rank, None, world_size))
        if rank == 0:
            masks.save(out)
    finally:
        dist.barrier()  # no rank tears gloo down while the other still has work in flight
        dist.destroy_process_group()


def test_one_and_two_ranks_agree_after_several_updates(tmp_path):
    batches_per_update = [make_batches(2, batch=2) for _ in range(3)]
    single = _dynamic_masks_after_updates(batches_per_update, slice(None))
    out = tmp_path / "two.pt"
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), batches_per_update, str(out)), nprocs=2)
    assert MaskSet.load(out).digest() == single.digest()


def test_two_process_zero2_dynamic_training(tiny_dataset, tmp_path, torchrun_train):
    summary = torchrun_train(dynamic_config(tiny_dataset, tmp_path / "ddp", zero_stage=2, iterations=6))
    # every update checked the mask digest across both ranks; pruned weights stayed zero
    assert summary["sparsity"]["num_updates"] == 3 and summary["sparsity"]["pruned_nonzeros"] == 0
