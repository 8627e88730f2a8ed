"""Channel granularity end to end: prune, train the smaller dense model under DeepSpeed,
resume it, refuse what does not fit."""

import json
import re

import pytest
import torch
import yaml

from dsparse.config import config_from_dict
from dsparse.models import prunable_parameters
from dsparse.runs import latest_checkpoint, load_model_weights
from dsparse.runs.restore import restore_run
from dsparse.sparsity.masks import MaskSet
from dsparse.train.trainer import train

from .test_sparse_training import sparse_config

pytestmark = pytest.mark.e2e


def channel_config(dataset, run_dir, **kwargs):
    config = sparse_config(dataset, run_dir, granularity="channel", **kwargs)
    config["data"]["crop_size"] = 32
    return config


def check_shrunk(run_dir):
    """The checkpoint holds the smaller layers: each weight has exactly its mask's kept
    elements, and the run restores (eval, export) into that architecture."""
    masks = MaskSet.load(run_dir / "masks.pt")
    assert masks.meta["granularity"] == "channel"
    weights = load_model_weights(latest_checkpoint(run_dir / "checkpoints"))
    for name, mask in masks.masks.items():
        assert weights[name].numel() == int(mask.sum()), name
    restored = restore_run(run_dir)
    for name, weight in prunable_parameters(restored.model).items():
        assert weight.numel() == int(masks.masks[name].sum())
    return masks


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_channel_pruned_model_trains_smaller_under_deepspeed(tiny_dataset, tmp_path, zero_stage):
    run_dir = tmp_path / f"zero{zero_stage}"
    summary = train(config_from_dict(channel_config(tiny_dataset, run_dir, target=0.5, zero_stage=zero_stage,
                                                    iterations=4)))
    masks = check_shrunk(run_dir)
    if zero_stage == 0:  # the export is the smaller dense model, and loads into it
        from dsparse.export import export_run, load_sparse

        report = export_run(run_dir, tmp_path / "small.dsparse.pt")
        assert report.granularity == "channel" and report.ratio < 0.75
        loaded, _ = load_sparse(report.path)
        restored = restore_run(run_dir).model
        restored.eval(), loaded.eval()
        x = torch.randn(2, 3, 32, 32)
        for task, out in restored(x).items():
            torch.testing.assert_close(loaded(x)[task], out)
    assert summary["status"] == "complete"
    assert summary["sparsity"]["granularity"] == "channel" and summary["sparsity"]["pruned_nonzeros"] == 0
    assert masks.meta["budget_sparsity_achieved"] == pytest.approx(0.5, abs=0.03)


def test_a_channel_run_resumes_into_the_same_architecture(tiny_dataset, tmp_path):
    run_dir = tmp_path / "resume"
    config = config_from_dict(channel_config(tiny_dataset, run_dir, target=0.5, method="snip", iterations=6,
                                             zero_stage=1, budget="flops"))
    train(config, stop_after=3)
    before = MaskSet.load(run_dir / "masks.pt")
    summary = train(config, resume=True)
    assert summary["status"] == "complete" and summary["step"] == 6
    assert check_shrunk(run_dir).digest() == before.digest()


def test_two_process_channel_training(tiny_dataset, tmp_path, torchrun_train):
    run_dir = tmp_path / "ddp"
    summary = torchrun_train(channel_config(tiny_dataset, run_dir, target=0.5, zero_stage=2, iterations=4))
    assert summary["world_size"] == 2 and summary["sparsity"]["granularity"] == "channel"
    check_shrunk(run_dir)


def test_prune_cli_prints_channels_per_layer_and_size_before_and_after(tiny_dataset, tmp_path, capsys):
    from dsparse.cli import main

    base = channel_config(tiny_dataset, tmp_path / "run", iterations=2)
    base.pop("sparsity")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(base))
    masks_path = tmp_path / "channels.pt"
    assert main(["prune", str(config_path), "--method", "disparse", "--sparsity", "0.5", "--granularity", "channel",
                 "--budget", "flops", "--num-batches", "2", "--out", str(masks_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| trunk\.layer2\.0\.conv1 \| \d+ / 16 \| \d+ / 8 \|", out)  # width 8: layer2 has 16
    before, after = map(lambda s: int(s.replace(",", "")),
                        re.search(r"FLOPs at 32x32: ([\d,]+) -> ([\d,]+)", out).groups())
    assert after / before == pytest.approx(0.5, abs=0.03)
    assert re.search(r"parameters: [\d,]+ -> [\d,]+ \(\d+\.\d% removed\)", out)
    kept = [(int(k), int(n)) for k, n in re.findall(r"\| trunk\.\S+ \| (\d+) / (\d+) \|", out)]
    assert kept and all(k % 8 == 0 or k == n for k, n in kept)  # sparsity.channel_multiple's default
    # channel masks into an element run, and a dynamic method with channels: one line each
    assert main(["train", str(config_path), "--masks", str(masks_path)]) == 2
    assert "hold channel masks but the config asks for element masks" in capsys.readouterr().err
    assert main(["prune", str(config_path), "--method", "disparse", "--sparsity", "0.5", "--budget", "flops"]) == 2
    assert "sparsity.budget=flops has no effect with element masks" in capsys.readouterr().err
    assert main(["prune", str(config_path), "--method", "disparse", "--sparsity", "0.5", "--channel-multiple", "4"]) == 2
    assert "sparsity.channel_multiple=4 has no effect with element masks" in capsys.readouterr().err
    dynamic = tmp_path / "dynamic.yaml"
    dynamic.write_text(yaml.safe_dump({**base, "sparsity": {"method": "rigl", "target": 0.5,
                                                            "granularity": "channel"}}))
    assert main(["train", str(dynamic)]) == 2
    assert "channel granularity rebuilds the model smaller once" in capsys.readouterr().err
    json.loads(json.dumps(MaskSet.load(masks_path).meta))  # the record is plain values
    torch.load(masks_path, weights_only=True)
