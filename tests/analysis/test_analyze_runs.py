"""``dsparse analyze`` on real runs: a dynamic run's checkpoints (agreement over training,
logged to its MLflow run), and a static run turned into a branched model that trains."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dsparse.analysis import analyze
from dsparse.analysis.output import watershed_tag
from dsparse.config import config_from_dict, load_config
from dsparse.models import parameter_users
from dsparse.sparsity.sparsifier import checkpoint_masks, read_sparsifier_state
from dsparse.runs import latest_checkpoint
from dsparse.runs.components import build_configured_model
from dsparse.train.trainer import train

pytestmark = pytest.mark.e2e
TASKS = ["seg", "depth", "normal"]


def config(dataset, run_dir, uri, **sparsity):
    return config_from_dict({
        "tasks": TASKS, "output_dir": str(run_dir),
        "data": {"path": str(dataset), "batch_size": 4, "eval_batch_size": 8, "num_workers": 0, "crop_size": 24},
        "model": {"arch": "resnet18", "base_width": 4, "head_dilations": [1, 2]},
        "optimizer": {"name": "adam", "lr": 0.003}, "schedule": {"name": "constant"},
        "train": {"iterations": 8, "eval_interval": 8, "log_interval": 2, "checkpoint_interval": 2,
                  "keep_checkpoints": 10},
        "tracking": {"uri": uri, "experiment": "tests"},
        "sparsity": {"target": 0.8, "num_batches": 1, **sparsity},
    })


def test_dynamic_run_agreement_over_checkpoints_is_written_and_logged(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "dynamic"
    summary = train(config(tiny_dataset, run_dir, uri, method="disparse_dynamic", interval=2, end=1.0))
    result = analyze(run_dir)
    source = result.source
    assert source.dynamic and source.steps == sorted(source.steps) and len(source.steps) >= 3
    masks = checkpoint_masks(read_sparsifier_state(latest_checkpoint(run_dir / "checkpoints")))
    assert set(masks.task_masks) == set(TASKS), "each task's nominations are kept with the masks"
    written = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert [entry["step"] for entry in written["iou_over_training"]] == source.steps
    assert (run_dir / "analysis" / "mask_iou_over_training.png").is_file()
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "analysis")}
    assert {"analysis/mask_iou.csv", "analysis/mask_iou.png", "analysis/analysis.json"} <= logged
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["analysis.watershed"] == watershed_tag(source.final.watershed)
    history = client.get_metric_history(summary["mlflow_run_id"], "sparsity/task_iou/seg-depth")
    assert sorted(m.step for m in history) == [2, 4, 6], "the tasks' agreement at every update, over training"
    assert all(0.0 <= m.value <= 1.0 for m in history)


def test_static_run_branches_at_its_watershed_and_the_branched_config_trains(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "static"
    train(config(tiny_dataset, run_dir, uri, method="disparse"))
    result = analyze(run_dir, branch=True, num_groups=2, same_params=True)
    branched = load_config(result.branched_config)
    assert branched.model.branch_from == result.plan.branch_from
    assert sorted(t for group in branched.model.branches for t in group) == sorted(TASKS)
    assert len(branched.model.branches) == 2 and branched.output_dir == str(run_dir) + "-branched"
    channels = {"seg": 10, "depth": 1, "normal": 3}  # any channel counts: sizes are compared like for like
    shared_size = sum(p.numel() for p in build_configured_model(load_config(run_dir / "config.yaml").model,
                                                                channels).parameters())
    assert sum(p.numel() for p in build_configured_model(branched.model, channels).parameters()) <= shared_size

    raw = yaml.safe_load(result.branched_config.read_text())
    raw["train"]["iterations"] = 4
    summary = train(config_from_dict(raw))
    assert summary["status"] == "complete"
    model = build_configured_model(branched.model, {"seg": 1, "depth": 1, "normal": 3})
    users = parameter_users(model)
    for index, group in enumerate(branched.model.branches):
        branch_users = {u for name, u in users.items() if name.startswith(f"branches.{index}.")}
        assert branch_users == {frozenset(group)}
    masks = checkpoint_masks(read_sparsifier_state(latest_checkpoint(run_dir.with_name("static-branched") /
                                                                     "checkpoints")))
    for index, group in enumerate(branched.model.branches):
        layer = next(n for n in masks.masks if n.startswith(f"branches.{index}."))
        voters = {t for t, per in masks.task_masks.items() if layer in per}
        assert voters == set(group), "only the branch's own tasks vote on its weights"
