"""A 2-trial sweep on local Ray, each trial 2 DeepSpeed workers: results table and MLflow runs."""

import pytest
import ray
from mlflow.tracking import MlflowClient

from dsparse.sweep import load_sweep_spec
from dsparse.sweep.results import results_table
from dsparse.sweep.runner import SweepFailedError, run_sweep

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def shutdown_ray():
    """A fresh local Ray per test: one instance for the module hung a later trial (the
    earlier tests' placement groups were still being cleaned up and held its CPUs)."""
    yield
    ray.shutdown()


def test_two_trial_sweep_on_local_ray(tiny_spec, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec_path = tiny_spec(overrides={"sparsity.num_batches": 1},
                          grid={"sparsity.method": [None, "random"], "sparsity.target": [0.5]},
                          search={"optimizer.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
                          resources={"workers": 2, "cpus_per_worker": 1})
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


def test_resume_reruns_only_unfinished_trials(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    spec_path = tiny_spec(overrides={"train.iterations": 2, "train.checkpoint_interval": 1}, grid={"seed": [0, 1]})
    run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")
    trials = tmp_path / "sweep" / "trials"
    kept, interrupted = sorted(trials.iterdir())
    kept_mtime = (kept / "summary.json").stat().st_mtime_ns
    (interrupted / "summary.json").unlink()  # as if killed after its last checkpoint
    rows = run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep", resume=True)
    assert len(rows) == 2 and (interrupted / "summary.json").is_file()
    assert (kept / "summary.json").stat().st_mtime_ns == kept_mtime, "a finished trial was rerun"


def test_asha_stops_a_trial_that_trails_at_its_first_rung(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    # Same seed, so at step 8 the lr=1e-12 trial still has the initial model while the first
    # trial has trained 8 steps: ASHA (one trial at a time) must stop the second at step 8.
    spec_path = tiny_spec(overrides={"train.iterations": 16, "train.eval_interval": 8,
                                                            "train.checkpoint_interval": 8},
                          grid={"optimizer.lr": [1.0e-2, 1.0e-12]}, metric="val/depth/abs_err", mode="min",
                          scheduler={"asha": {"grace_period": 8, "reduction_factor": 2}})
    rows = {row["trial"]: row for row in run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")}
    assert rows["lr=0.01"]["status"] == "complete"
    assert rows["lr=1e-12"]["status"] == "stopped at step 8"
    assert rows["lr=1e-12"]["depth/abs_err"] > rows["lr=0.01"]["depth/abs_err"]
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}, "an early-stopped trial's run must be closed"


def test_config_errors_fail_the_trial_once_with_the_message(tiny_spec, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    spec_path = tiny_spec(max_failures=5, grid={
        "data.path": [str(tmp_path / "no_such_dataset"), str(tiny_dataset)],
        "sparsity.method": ["snip"], "sparsity.from_checkpoint": [str(tmp_path / "no_such_run")]})
    first_error = r"(?s)2 trial\(s\) failed; the first error: dsparse.sweep.runner.TrialConfigError: .*--resume"
    with pytest.raises(SweepFailedError, match=first_error):
        run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")
    (worker_error,) = (tmp_path / "sweep" / "trials").glob("*/trial_error.json")
    assert "no checkpoint found at" in worker_error.read_text()
    rows = results_table(tmp_path / "sweep")
    assert [row["status"] for row in rows] == ["error"]


def test_restarted_trial_restores_ray_trains_checkpoint_when_its_directory_lost_it(tiny_spec, tmp_path, monkeypatch):
    import json
    import shutil

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    spec_path = tiny_spec(grid={"seed": [0]})
    run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")
    (trial,) = (tmp_path / "sweep" / "trials").iterdir()
    registered = list((tmp_path / "sweep" / "ray").glob(f"{trial.name}/checkpoint_*"))
    assert registered, "checkpoints must be registered with Ray Train's storage"
    shutil.rmtree(trial / "checkpoints")  # as if the trial moved to a node without its local files
    (trial / "summary.json").unlink()
    run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep", resume=True)
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["step"] == 4
    assert summary["steps_this_invocation"] == 0, "the trial must resume from Ray's checkpoint, not retrain"


def test_killed_worker_resumes_the_trial_from_its_checkpoint(tiny_spec, tmp_path, monkeypatch):
    import json
    import signal
    import threading
    import time

    import psutil

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    spec_path = tiny_spec(overrides={"train.iterations": 60, "train.eval_interval": 60, "train.checkpoint_interval": 5,
                                     "train.log_interval": 5},
                          grid={"seed": [0]}, resources={"workers": 2, "cpus_per_worker": 1}, max_failures=2)
    killed = []

    def kill_a_worker_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if list((tmp_path / "sweep" / "trials").glob("*/checkpoints/latest")):
                ours = psutil.Process().children(recursive=True)  # never another Ray's workers on this machine
                for process in ours:
                    try:
                        command = " ".join(process.cmdline())
                    except psutil.Error:  # exited meanwhile
                        continue
                    if "RayTrainWorker" in command:
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
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED", "a restart must not add an MLflow run"


def test_optuna_searches_the_learning_rate_of_one_grid_point(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    spec_path = tiny_spec(grid={"seed": [0]}, search={"optimizer.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
                          search_alg="optuna", num_samples=2, metric="val/depth/abs_err", mode="min")
    rows = run_sweep(load_sweep_spec(spec_path), tmp_path / "sweep")
    assert [row["status"] for row in rows] == ["complete", "complete"]
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    rates = sorted(float(r.data.params["optimizer.lr"]) for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert len(rates) == 2 and rates[0] != rates[1] and all(1e-4 <= lr <= 1e-2 for lr in rates)
