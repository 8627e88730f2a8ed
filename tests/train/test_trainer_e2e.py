"""End to end on the real stack: DeepSpeed training, checkpoints, resume, NaN stop, MLflow, eval."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dsparse.config import config_from_dict
from dsparse.evaluation import evaluate_checkpoint
from dsparse.tasks.dense import DepthTask
from dsparse.runs import latest_checkpoint, load_model_weights
from dsparse.train.checkpoint import PARTIAL
from dsparse.train.trainer import NonFiniteLossError, train

pytestmark = pytest.mark.e2e


def tiny_config(dataset, run_dir, uri, **train_overrides) -> dict:
    train_section = {"iterations": 12, "eval_interval": 12, "log_interval": 1, "checkpoint_interval": 4}
    train_section.update(train_overrides)
    return {
        "tasks": ["seg", "normal", "depth", "keypoint", "edge"],
        "output_dir": str(run_dir),
        "data": {"path": str(dataset), "batch_size": 4, "eval_batch_size": 8, "num_workers": 0, "crop_size": 24},
        "model": {"arch": "resnet18", "base_width": 8, "head_dilations": [1, 2]},
        "optimizer": {"name": "adam", "lr": 0.003},
        "schedule": {"name": "constant"},
        "train": train_section,
        "tracking": {"uri": uri, "experiment": "tests"},
    }


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def losses_of(uri, run_id, key="train/loss"):
    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_single_process_training_learns_and_is_tracked(tiny_dataset, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    threads_before = torch.get_num_threads()
    raw = tiny_config(tiny_dataset, run_dir, tracking_uri, iterations=30)
    raw["train"]["threads"] = 1
    summary = train(config_from_dict(raw))
    assert summary["status"] == "complete" and summary["step"] == 30
    assert summary["threads"] == 1 and torch.get_num_threads() == threads_before, "the caller's setting is restored"
    losses = losses_of(tracking_uri, summary["mlflow_run_id"])
    assert len(losses) == 30
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    written = json.loads((run_dir / "summary.json").read_text())
    assert set(written["final_metrics"]) == {"seg", "normal", "depth", "keypoint", "edge"}
    assert written["samples_per_s"] > 0 and written["wall_time_s"] > 0
    run = MlflowClient(tracking_uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.iterations"] == "30"
    assert "val/seg/miou" in run.data.metrics and "train/loss/depth" in run.data.metrics
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(summary["mlflow_run_id"])}
    assert {"config.yaml", "summary.json"} <= artifacts

    # dsparse eval on the checkpoint reproduces the final validation metrics; Delta_T vs itself is 0
    result = evaluate_checkpoint(run_dir, baseline=run_dir)
    assert result["delta_t"] == pytest.approx(0.0, abs=1e-6)
    for task, values in written["final_metrics"].items():
        for metric, value in values.items():
            assert result["metrics"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_resume_after_stop_equals_uninterrupted_run(tiny_dataset, tmp_path, tracking_uri):
    straight = tmp_path / "straight"
    train(config_from_dict(tiny_config(tiny_dataset, straight, tracking_uri)))
    resumed = tmp_path / "resumed"
    config = config_from_dict(tiny_config(tiny_dataset, resumed, tracking_uri))
    first = train(config, stop_after=5)
    assert first["status"] == "stopped" and not (resumed / "summary.json").exists()
    (resumed / "checkpoints" / PARTIAL / "step-00000099").mkdir(parents=True)  # debris of a killed save
    second = train(config, resume=True)
    assert second["status"] == "complete" and second["step"] == 12
    assert second["mlflow_run_id"] == first["mlflow_run_id"], "resume must continue the same MLflow run"
    a = load_model_weights(latest_checkpoint(straight / "checkpoints"))
    b = load_model_weights(latest_checkpoint(resumed / "checkpoints"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_nan_loss_stops_naming_task_and_step_and_keeps_last_checkpoint(tiny_dataset, tmp_path, tracking_uri,
                                                                        monkeypatch):
    calls = {"n": 0}
    original = DepthTask.loss

    def poisoned(self, pred, target):
        calls["n"] += 1
        loss = original(self, pred, target)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(DepthTask, "loss", poisoned)
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) \['depth'\] is not finite at step 7; checkpoint "
                                                 r"step-00000006 held the weights that gave it and was set aside as "
                                                 r"step-00000006.nonfinite; the last good checkpoint is step-00000004"):
        train(config_from_dict(tiny_config(tiny_dataset, run_dir, tracking_uri, checkpoint_interval=2)))
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-00000004"
    assert not (run_dir / "checkpoints" / "step-00000006").exists()
    assert (run_dir / "checkpoints" / "step-00000006.nonfinite").is_dir()
    assert not (run_dir / "summary.json").exists()


def test_existing_run_without_resume_is_refused(tiny_dataset, tmp_path, tracking_uri):
    config = config_from_dict(tiny_config(tiny_dataset, tmp_path / "r", tracking_uri, iterations=2))
    train(config)
    with pytest.raises(ValueError, match="pass --resume"):
        train(config)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_processes_under_deepspeed(tiny_dataset, tmp_path, tracking_uri, zero_stage, torchrun_train):
    run_dir = tmp_path / f"ddp{zero_stage}"
    raw = tiny_config(tiny_dataset, run_dir, tracking_uri, iterations=20, checkpoint_interval=10, eval_interval=20)
    raw["deepspeed"] = {"zero_stage": zero_stage}
    summary = torchrun_train(raw)
    assert summary["world_size"] == 2 and summary["step"] == 20
    assert summary["threads"] >= 1, "the intra-op threads each process used are recorded"
    losses = losses_of(tracking_uri, summary["mlflow_run_id"])
    assert len(losses) == 20, "rank 0 alone logs, once per step"
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    # ZeRO-2 partitions optimizer state: every rank wrote its shard into the same checkpoint
    if zero_stage == 2:
        assert len(list(Path(summary["checkpoint"]).glob("*optim_states.pt"))) == 2


def test_resuming_a_finished_run_keeps_its_summary(tiny_dataset, tmp_path, tracking_uri):
    config = config_from_dict(tiny_config(tiny_dataset, tmp_path / "done", tracking_uri, iterations=2,
                                          checkpoint_interval=2, eval_interval=2))
    first = train(config)
    again = train(config, resume=True)
    assert again["final_metrics"] == first["final_metrics"] is not None
    assert json.loads((tmp_path / "done" / "summary.json").read_text())["final_metrics"] is not None


def test_dangling_latest_pointer_and_bad_stop_after_are_errors(tiny_dataset, tmp_path, tracking_uri):
    run_dir = tmp_path / "dangling"
    config = config_from_dict(tiny_config(tiny_dataset, run_dir, tracking_uri, iterations=4, checkpoint_interval=2))
    train(config, stop_after=2)
    with pytest.raises(ValueError, match="stop_after must be >= 0"):
        train(config, resume=True, stop_after=-1)
    (run_dir / "checkpoints" / "latest").write_text("step-00000099")
    with pytest.raises(ValueError, match="names 'step-00000099', which does not exist"):
        train(config, resume=True)
