"""A 2-trial sweep on local Ray, each trial 2 DeepSpeed workers: results table and MLflow runs."""

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from dsparse.sweep import load_sweep_spec
from dsparse.sweep.runner import run_sweep

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def shutdown_ray():
    yield
    ray.shutdown()


def test_two_trial_sweep_on_local_ray(tiny_dataset, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec_path = tmp_path / "tiny_sweep.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": "synthetic_tiny",
        "overrides": {"data.path": str(tiny_dataset), "data.batch_size": 4, "data.num_workers": 0,
                      "model.base_width": 4, "model.head_dilations": [1, 2], "train.iterations": 4,
                      "train.eval_interval": 2, "train.checkpoint_interval": 2, "train.log_interval": 2,
                      "sparsity.num_batches": 1},
        "grid": {"sparsity.method": [None, "random"], "sparsity.target": [0.5]},
        "search": {"optimizer.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "max_concurrent": 1,
    }))
    rows = run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"dense", "random"}
    assert by_method["dense"]["delta_t"] == pytest.approx(0.0)
    assert by_method["random"]["achieved"] == pytest.approx(0.5, abs=1e-4)
    assert (tmp_path / "sweep" / "results.csv").is_file() and (tmp_path / "sweep" / "results.png").is_file()
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all("val/seg/miou" in c.data.metrics for c in children)
    assert all(1e-3 <= float(c.data.params["optimizer.lr"]) <= 1e-2 for c in children)

    with pytest.raises(ValueError, match="already holds a sweep; pass --resume"):
        run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")


def test_resume_reruns_only_unfinished_trials(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    spec_path = tmp_path / "resume.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": "synthetic_tiny",
        "overrides": {"data.path": str(tiny_dataset), "data.batch_size": 4, "data.num_workers": 0,
                      "model.base_width": 4, "model.head_dilations": [1, 2], "train.iterations": 2,
                      "train.eval_interval": 2, "train.checkpoint_interval": 1},
        "grid": {"seed": [0, 1]},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }))
    run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")
    trials = tmp_path / "sweep" / "trials"
    kept, interrupted = sorted(trials.iterdir())
    kept_mtime = (kept / "summary.json").stat().st_mtime_ns
    (interrupted / "summary.json").unlink()  # as if killed after its last checkpoint
    rows = run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep", resume=True)
    assert len(rows) == 2 and (interrupted / "summary.json").is_file()
    assert (kept / "summary.json").stat().st_mtime_ns == kept_mtime, "a finished trial was rerun"


def test_scheduler_is_refused_until_supported(tmp_path):
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump({"base": "synthetic_tiny", "scheduler": {"asha": {"grace_period": 1}}}))
    with pytest.raises(ValueError, match="not supported by dsparse sweep yet"):
        run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")


def test_killed_worker_resumes_the_trial_from_its_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    import json
    import signal
    import threading
    import time

    import psutil

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    spec_path = tmp_path / "fault.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": "synthetic_tiny",
        "overrides": {"data.path": str(tiny_dataset), "data.batch_size": 4, "data.num_workers": 0,
                      "model.base_width": 4, "model.head_dilations": [1, 2], "train.iterations": 60,
                      "train.eval_interval": 60, "train.checkpoint_interval": 5, "train.log_interval": 5},
        "grid": {"seed": [0]},
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "max_failures": 2,
    }))
    killed = []

    def kill_a_worker_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if list((tmp_path / "sweep" / "trials").glob("*/checkpoints/latest")):
                for process in psutil.process_iter(["cmdline"]):
                    if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                        process.send_signal(signal.SIGKILL)
                        killed.append(process.pid)
                        return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    (summary_path,) = (tmp_path / "sweep" / "trials").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "complete" and summary["step"] == 60
    assert summary["steps_this_invocation"] < 60, "the restarted workers must resume, not start over"
