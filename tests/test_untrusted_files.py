"""Files from others never run code (issue 19): a crafted checkpoint, dataset manifest or
export is refused in one line, and nothing it carries is executed."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dsparse.cli import main
from dsparse.config import config_from_dict
from dsparse.runs import latest_checkpoint
from dsparse.train.checkpoint import write_file_list
from dsparse.train.trainer import train

pytestmark = pytest.mark.e2e


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _run_config(dataset, run_dir, **sparsity):
    return config_from_dict({
        "tasks": ["seg", "depth"], "output_dir": str(run_dir),
        "data": {"path": str(dataset), "batch_size": 4, "eval_batch_size": 8, "num_workers": 0, "crop_size": 24},
        "model": {"arch": "resnet18", "base_width": 4, "head_dilations": [1, 2]},
        "optimizer": {"name": "adam", "lr": 0.003}, "schedule": {"name": "constant"},
        "train": {"iterations": 4, "eval_interval": 4, "log_interval": 4, "checkpoint_interval": 2,
                  "eval_batches": 1},
        "deepspeed": {"zero_stage": 1}, "tracking": {"enabled": False},
        "sparsity": sparsity or {"method": "random", "target": 0.5}})


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("untrusted") / "run"
    train(_run_config(tiny_dataset, run_dir), stop_after=2)
    return run_dir


def _poisoned_copy(run_dir, tmp_path, file_glob):
    """A copy of the run whose checkpoint file ``file_glob`` runs a command when unpickled,
    with ``files.json`` rewritten to match (as anyone sending the run could)."""
    copy = tmp_path / "poisoned"
    shutil.copytree(run_dir, copy)
    (copy / ".lock").unlink(missing_ok=True)
    checkpoint = latest_checkpoint(copy / "checkpoints")
    marker = tmp_path / "PWNED"
    target = next(checkpoint.glob(file_glob))
    state = torch.load(target, map_location="cpu", weights_only=False)  # our own file: trusted here
    state["payload"] = _Payload(marker)
    torch.save(state, target)
    write_file_list(checkpoint)
    return copy, marker


@pytest.mark.parametrize("verb", ["eval", "export", "prune", "resume"])
def test_a_crafted_checkpoint_is_refused_in_one_line_and_runs_nothing(trained_run, tiny_dataset, tmp_path, capsys,
                                                                     verb):
    run, marker = _poisoned_copy(trained_run, tmp_path, "mp_rank_*_model_states.pt")
    argv = {"eval": ["eval", str(run)],
            "export": ["export", str(run), "--out", str(tmp_path / "model.pt")],
            "prune": ["prune", str(run / "config.yaml"), "--method", "magnitude", "--sparsity", "0.5",
                      "--from", str(run), "--out", str(tmp_path / "masks.pt")],
            "resume": ["train", str(run / "config.yaml"), "--set", f"output_dir={run}", "--resume"]}[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "unpickling the checkpoint ran its command"
    assert "mp_rank_00_model_states.pt" in err and "posix.system" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) < 600
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "masks.pt").exists()


def test_a_crafted_optimizer_partition_is_refused_on_resume(trained_run, tmp_path, capsys):
    run, marker = _poisoned_copy(trained_run, tmp_path, "zero_pp_rank_*_optim_states.pt")
    assert main(["train", str(run / "config.yaml"), "--set", f"output_dir={run}", "--resume"]) == 2
    assert not marker.exists(), "unpickling the optimizer partition ran its command"
    assert "optim_states.pt" in capsys.readouterr().err


def test_a_zero_1_run_resumes_through_the_safe_loader(trained_run, tmp_path):
    """The allow-list covers what DeepSpeed writes (loss scaler, ZeRO stage, fragment addresses)."""
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / ".lock").unlink(missing_ok=True)
    from dsparse.config import load_config

    summary = train(load_config(str(run / "config.yaml"), [f"output_dir={run}"]), resume=True)
    assert summary["status"] == "complete" and summary["step"] == 4


def test_a_manifest_with_a_shard_name_the_writer_never_makes_is_refused(tiny_dataset, tmp_path):
    import json

    from dsparse.data.manifest import load_manifest

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = "x; touch PWNED_$(id -u); true .tar"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard name 'x; touch .* must be train-NNNNNN.tar"):
        load_manifest(data)


def test_a_pipe_command_gets_each_shard_name_quoted():
    from dsparse.data.loader import StreamSpec

    spec = StreamSpec(data_dir="/data", split="train", shards=[], labels={}, batch_size=1, shard_url="pipe:aws s3 cp s3://b/{name} -")
    assert spec.url({"name": "train-000001.tar"}) == "pipe:aws s3 cp s3://b/train-000001.tar -"
    assert spec.url({"name": "a b;c.tar"}) == "pipe:aws s3 cp s3://b/'a b;c.tar' -"
    plain = StreamSpec(data_dir="/data", split="train", shards=[], labels={}, batch_size=1, shard_url="/mnt/shards/{name}")
    assert plain.url({"name": "a b.tar"}) == "/mnt/shards/a b.tar"
