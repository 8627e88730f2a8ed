"""Sparse training end to end: masks hold under DeepSpeed ZeRO 0/1/2, exact sparsity, resume."""

import json
import re

import pytest
import torch
import yaml

from dsparse.config import config_from_dict
from dsparse.models import prunable_parameters
from dsparse.sparsity.masks import MaskSet
from dsparse.runs import latest_checkpoint, load_model_weights
from dsparse.train.trainer import train

pytestmark = pytest.mark.e2e


def sparse_config(dataset, run_dir, *, zero_stage=0, method="disparse", target=0.9, iterations=8, **sparsity):
    return {
        "tasks": ["seg", "normal", "depth", "keypoint", "edge"],
        "output_dir": str(run_dir),
        "data": {"path": str(dataset), "batch_size": 4, "eval_batch_size": 8, "num_workers": 0},
        "model": {"arch": "resnet18", "base_width": 8, "head_dilations": [1, 2]},
        "optimizer": {"name": "adam", "lr": 0.003, "weight_decay": 0.01},
        "schedule": {"name": "constant"},
        "train": {"iterations": iterations, "eval_interval": iterations, "log_interval": 4,
                  "checkpoint_interval": iterations},
        "deepspeed": {"zero_stage": zero_stage},
        "tracking": {"enabled": False},
        "sparsity": {"method": method, "target": target, "num_batches": 2, **sparsity},
    }


def check_weights_follow_masks(run_dir):
    masks = MaskSet.load(run_dir / "masks.pt")
    weights = load_model_weights(latest_checkpoint(run_dir / "checkpoints"))
    kept = 0
    for name, mask in masks.masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0, f"pruned weights of {name} moved"
        kept += int(torch.count_nonzero(weights[name]))
    assert kept == masks.num_kept, "every kept weight should be nonzero after training"
    return masks


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_pruned_weights_stay_zero_under_zero_stages(tiny_dataset, tmp_path, zero_stage):
    run_dir = tmp_path / f"zero{zero_stage}"
    summary = train(config_from_dict(sparse_config(tiny_dataset, run_dir, zero_stage=zero_stage)))
    masks = check_weights_follow_masks(run_dir)
    assert masks.num_kept == round(0.1 * masks.num_total)
    assert summary["sparsity"]["achieved"] == pytest.approx(1 - masks.num_kept / masks.num_total)
    assert summary["sparsity"]["requested"] == 0.9 and summary["sparsity"]["pruned_nonzeros"] == 0


def test_masks_survive_resume(tiny_dataset, tmp_path):
    run_dir = tmp_path / "resume"
    config = config_from_dict(sparse_config(tiny_dataset, run_dir, iterations=8, method="snip"))
    train(config, stop_after=3)
    before = MaskSet.load(run_dir / "masks.pt")
    train(config, resume=True)
    after = check_weights_follow_masks(run_dir)
    assert before.digest() == after.digest()


def test_lottery_rewinds_to_initial_weights(tiny_dataset, tmp_path):
    dense = tmp_path / "dense"
    raw = sparse_config(tiny_dataset, dense, iterations=4)
    raw.pop("sparsity")
    train(config_from_dict(raw))
    ticket = tmp_path / "ticket"
    raw = sparse_config(tiny_dataset, ticket, iterations=1, method="lottery", from_checkpoint=str(dense))
    raw["sparsity"]["min_density"] = 0  # no layer floors: the pure global top-k
    train(config_from_dict(raw), stop_after=0)
    masks = MaskSet.load(ticket / "masks.pt")
    trained = load_model_weights(latest_checkpoint(dense / "checkpoints"))
    # masks are the global top-10% magnitudes of the trained weights
    magnitudes = torch.cat([trained[n].abs().flatten() for n in masks.masks])
    threshold = magnitudes.sort(descending=True).values[masks.num_kept - 1]
    for name, mask in masks.masks.items():
        assert bool((trained[name].abs()[mask] >= threshold).all()), name
    # ...applied to the initial weights, which the seed reproduces
    rewound = load_model_weights(latest_checkpoint(ticket / "checkpoints"))
    from dsparse.data.manifest import load_manifest
    from dsparse.runs.components import build_run_model, build_run_tasks

    config = config_from_dict(raw)
    torch.manual_seed(config.seed)
    initial = build_run_model(config, build_run_tasks(config, load_manifest(tiny_dataset))).state_dict()
    for name, mask in masks.masks.items():
        assert torch.equal(rewound[name], initial[name] * mask), name


def test_two_process_zero2_sparse_training(tiny_dataset, tmp_path, torchrun_train):
    run_dir = tmp_path / "ddp"
    summary = torchrun_train(sparse_config(tiny_dataset, run_dir, zero_stage=2, iterations=6))
    assert summary["world_size"] == 2 and summary["sparsity"]["pruned_nonzeros"] == 0
    check_weights_follow_masks(run_dir)


def test_mask_file_from_prune_cli_trains(tiny_dataset, tmp_path, capsys):
    from dsparse.cli import main

    base = sparse_config(tiny_dataset, tmp_path / "run", iterations=2)
    base.pop("sparsity")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(base))
    masks_path = tmp_path / "m.pt"
    assert main(["prune", str(config_path), "--method", "disparse", "--sparsity", "0.8", "--num-batches", "2",
                 "--out", str(masks_path)]) == 0
    out = capsys.readouterr().out
    kept, total = map(int, re.search(r"\((\d+) of (\d+) weights kept\)", out).groups())
    assert kept == round(0.2 * total) and "trunk." in out
    assert main(["train", str(config_path), "--masks", str(masks_path)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sparsity"]["achieved"] == pytest.approx(0.8, abs=1e-5)
    assert main(["prune", str(config_path), "--method", "disparse", "--sparsity", "1.5"]) == 2
    assert "must be in (0, 1)" in capsys.readouterr().err
    assert main(["prune", str(config_path), "--method", "obd", "--sparsity", "0.5"]) == 2
    assert "unknown pruning method 'obd'" in capsys.readouterr().err


def test_prunable_weights_cover_model(tiny_dataset, tmp_path):
    """The mask file covers exactly the model's prunable weights."""
    run_dir = tmp_path / "cover"
    train(config_from_dict(sparse_config(tiny_dataset, run_dir, iterations=1, method="random")))
    masks = MaskSet.load(run_dir / "masks.pt")
    from dsparse.data.manifest import load_manifest
    from dsparse.runs.components import build_run_model, build_run_tasks

    config = config_from_dict(sparse_config(tiny_dataset, run_dir))
    model = build_run_model(config, build_run_tasks(config, load_manifest(tiny_dataset)))
    assert list(masks.masks) == list(prunable_parameters(model))
