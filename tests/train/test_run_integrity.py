"""Run integrity (issue 12): the resume contract, one owner per run directory, copies,
and a NaN stop that never keeps exploded weights as the last good checkpoint."""

import json
import multiprocessing
import os
import shutil
import signal
import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from dsparse.cli import main
from dsparse.config import config_from_dict
from dsparse.runs import latest_checkpoint, load_model_weights
from dsparse.train.trainer import NonFiniteLossError, train

from .test_trainer_e2e import tiny_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def config(dataset, run_dir, uri, *, optimizer=None, **train):
    raw = tiny_config(dataset, run_dir, uri, **{"iterations": 4, "checkpoint_interval": 1, "eval_interval": 4,
                                                **train})
    raw["optimizer"].update(optimizer or {})
    return config_from_dict(raw)


def test_resume_refuses_incompatible_changes_before_writing_anything(tiny_dataset, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    train(config(tiny_dataset, run_dir, tracking_uri), stop_after=2)
    saved = (run_dir / "config.yaml").read_bytes()
    changed = tiny_config(tiny_dataset, run_dir, tracking_uri, iterations=4, checkpoint_interval=1)
    changed["model"]["base_width"] = 16
    with pytest.raises(ValueError, match=r"--resume cannot change model.base_width: 8 -> 16"):
        train(config_from_dict(changed), resume=True)
    assert (run_dir / "config.yaml").read_bytes() == saved
    assert (run_dir / ".lock").read_text() == ""  # released at once, holder line cleared
    assert train(config(tiny_dataset, run_dir, tracking_uri), resume=True)["step"] == 4


def test_a_run_saved_with_relative_paths_by_an_older_dsparse_resumes(tiny_dataset, tmp_path, tracking_uri,
                                                                      monkeypatch):
    import yaml

    shutil.copytree(tiny_dataset, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    raw = tiny_config("data", "runs/old", tracking_uri, iterations=4, checkpoint_interval=1, eval_interval=4)
    train(config_from_dict(raw), stop_after=2)
    saved = yaml.safe_load((tmp_path / "runs" / "old" / "config.yaml").read_text())
    saved["data"]["path"], saved["output_dir"] = "data", "runs/old"  # as dsparse wrote it before paths were resolved
    (tmp_path / "runs" / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train(config_from_dict(raw), resume=True)["step"] == 4


def test_resume_applies_a_new_learning_rate_and_records_it(tiny_dataset, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    first = train(config(tiny_dataset, run_dir, tracking_uri), stop_after=2)
    resumed = train(config(tiny_dataset, run_dir, tracking_uri, optimizer={"lr": 0.0005}), resume=True)
    history = [json.loads(line) for line in (run_dir / "config-history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["step"] == 2 and history[1]["changes"] == {"optimizer.lr": [0.003, 0.0005]}
    assert "lr: 0.0005" in (run_dir / "config.yaml").read_text()
    run = MlflowClient(tracking_uri).get_run(resumed["mlflow_run_id"])
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    assert json.loads(run.data.tags["resume.step_2.changes"]) == {"optimizer.lr": [0.003, 0.0005]}
    lrs = {m.step: m.value for m in MlflowClient(tracking_uri).get_metric_history(resumed["mlflow_run_id"], "train/lr")}
    assert lrs[2] == pytest.approx(0.003) and lrs[3] == pytest.approx(0.0005)


def test_resume_without_a_checkpoint_is_an_error_unless_asked_to_start(tiny_dataset, tmp_path, tracking_uri, capsys):
    run_dir = tmp_path / "typo"
    with pytest.raises(ValueError, match="no run directory .*typo to resume.*--resume-or-start"):
        train(config(tiny_dataset, run_dir, tracking_uri), resume=True)
    assert not run_dir.exists()
    run_dir.mkdir()  # an existing directory without a checkpoint
    with pytest.raises(ValueError, match="no checkpoint in .*typo to resume from.*--resume-or-start"):
        train(config(tiny_dataset, run_dir, tracking_uri), resume=True)
    assert not (run_dir / "config.yaml").exists()
    summary = train(config(tiny_dataset, run_dir, tracking_uri, iterations=2), resume="auto")
    assert summary["step"] == 2


def test_a_lr_explosion_never_leaves_exploded_weights_as_the_last_checkpoint(tiny_dataset, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    train(config(tiny_dataset, run_dir, tracking_uri), stop_after=2)
    with pytest.raises(NonFiniteLossError, match="held the weights that gave it and was set aside as "
                                                 "step-00000003.nonfinite; the last good checkpoint is step-00000002"
                                                 ".*--resume applies a new learning rate"):
        train(config(tiny_dataset, run_dir, tracking_uri, optimizer={"lr": 1e30}), resume=True)
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == "step-00000002"
    assert all(w.abs().max() < 1e3 for w in load_model_weights(latest).values() if w.is_floating_point())


def hold_run_directory(config_dict, ready):
    """Child process: own the run directory, then wait to be killed."""
    from dsparse.train.rundir import open_run

    with open_run(config_from_dict(config_dict).with_absolute_paths(), resume=False):
        ready.set()
        time.sleep(120)


def test_a_second_run_into_a_held_directory_is_refused_at_once_and_a_dead_holder_is_taken_over(
        tiny_dataset, tmp_path, tracking_uri, caplog):
    run_dir = tmp_path / "run"
    raw = tiny_config(tiny_dataset, run_dir, tracking_uri, iterations=2)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=hold_run_directory, args=(raw, ready))
    holder.start()
    assert ready.wait(60)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"{run_dir} is in use by pid {holder.pid} on host {socket.gethostname()}"):
        train(config_from_dict(raw))
    assert time.perf_counter() - start < 30
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with caplog.at_level("WARNING"):
        summary = train(config_from_dict(raw))
    assert summary["step"] == 2
    assert f"last held by pid {holder.pid}" in caplog.text and "taking it over" in caplog.text
    assert (run_dir / ".lock").read_text() == ""  # released on a clean exit


def test_a_copied_run_directory_gets_its_own_mlflow_run(tiny_dataset, tmp_path, tracking_uri):
    original = tmp_path / "run"
    first = train(config(tiny_dataset, original, tracking_uri), stop_after=2)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    resumed = train(config(tiny_dataset, copy, tracking_uri), resume=True)
    assert resumed["mlflow_run_id"] != first["mlflow_run_id"]
    client = MlflowClient(tracking_uri)
    assert client.get_run(resumed["mlflow_run_id"]).data.tags["copied_from"] == str(original.resolve())
    assert len(client.get_metric_history(first["mlflow_run_id"], "train/loss")) == 2  # the original is untouched
    assert json.loads((copy / "run.json").read_text())["copied_from"] == str(original.resolve())


def test_a_new_run_never_logs_into_the_mlflow_run_of_another_directory(tiny_dataset, tmp_path, tracking_uri):
    """A config taken from a sweep trial names the trial's tracking.run_id."""
    first = train(config(tiny_dataset, tmp_path / "trial", tracking_uri))
    borrowed = config(tiny_dataset, tmp_path / "new", tracking_uri)
    borrowed.tracking.run_id = first["mlflow_run_id"]
    with pytest.raises(ValueError, match="is the MLflow run of another run directory; .* remove tracking.run_id"):
        train(borrowed)
    run = MlflowClient(tracking_uri).get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(MlflowClient(tracking_uri).get_metric_history(first["mlflow_run_id"], "train/loss")) == 4


def test_a_sweep_trial_restarted_before_its_first_checkpoint_keeps_its_mlflow_run(tiny_dataset, tmp_path,
                                                                                   tracking_uri, monkeypatch):
    """Ray restarts a failed trial with resume=auto; without a checkpoint it starts again in
    the same directory and must keep logging into the trial's MLflow run."""
    from dsparse.tasks.dense import DepthTask

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("trial-restart")).info.run_id
    trial = config(tiny_dataset, tmp_path / "trial", tracking_uri, checkpoint_interval=4)
    trial.tracking.run_id = run_id
    original = DepthTask.loss

    def crash(self, pred, target):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(DepthTask, "loss", crash)
    with pytest.raises(RuntimeError, match="worker lost"):
        train(trial, resume="auto")
    monkeypatch.setattr(DepthTask, "loss", original)
    assert train(trial, resume="auto")["mlflow_run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"


def test_cli_resume_mismatch_is_one_line(tiny_dataset, tmp_path, tracking_uri, capsys):
    import yaml

    run_dir = tmp_path / "run"
    raw = tiny_config(tiny_dataset, run_dir, tracking_uri, iterations=4, checkpoint_interval=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "--set", "model.base_width=16"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "model.base_width: 8 -> 16" in error


def test_eval_refuses_a_baseline_on_other_tasks_or_data_or_not_a_summary(tiny_dataset, tmp_path, tracking_uri,
                                                                         capsys):
    from dsparse.evaluation import evaluate_checkpoint
    from dsparse.data.synth.dataset import write_synthetic_dataset

    run = tmp_path / "run"
    train(config(tiny_dataset, run, tracking_uri, iterations=2))
    fewer = tiny_config(tiny_dataset, tmp_path / "fewer", tracking_uri, iterations=2, checkpoint_interval=2,
                        eval_interval=2)
    fewer["tasks"] = ["seg", "depth"]
    train(config_from_dict(fewer))
    with pytest.raises(ValueError, match=r"has tasks \['seg', 'depth'\], this run \['seg', 'normal'"):
        evaluate_checkpoint(run, baseline=tmp_path / "fewer", max_batches=1)
    other_data = tmp_path / "other-data"
    write_synthetic_dataset(other_data, num_train=16, num_val=8, size=32, seed=1, shard_size=4, num_procs=1,
                            progress=False)
    train(config(other_data, tmp_path / "other", tracking_uri, iterations=2))
    with pytest.raises(ValueError, match="trained on another dataset"):
        evaluate_checkpoint(run, baseline=tmp_path / "other", max_batches=1)
    (tmp_path / "base.yaml").write_text("tasks: [seg]\n")
    assert main(["eval", str(run), "--baseline", str(tmp_path / "base.yaml")]) == 2
    assert "is not a finished run directory or its summary.json" in capsys.readouterr().err
    out = tmp_path / "missing" / "dir" / "metrics.json"
    assert main(["eval", str(run), "--baseline", str(run), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["delta_t"] == pytest.approx(0.0)


def test_a_saved_config_with_relative_paths_evaluates_from_anywhere(tiny_dataset, tmp_path, tracking_uri,
                                                                    monkeypatch):
    from dsparse.evaluation import evaluate_checkpoint

    work = tmp_path / "work"
    shutil.copytree(tiny_dataset, work / "data")
    monkeypatch.chdir(work)
    raw = tiny_config("data", "runs/rel", tracking_uri, iterations=2, checkpoint_interval=2, eval_interval=2)
    train(config_from_dict(raw))
    saved = (work / "runs" / "rel" / "config.yaml").read_text()
    assert f"path: {work / 'data'}" in saved and f"output_dir: {work / 'runs' / 'rel'}" in saved
    monkeypatch.chdir(tmp_path)
    assert set(evaluate_checkpoint(work / "runs" / "rel", max_batches=1)["metrics"]) >= {"seg", "depth"}


@pytest.mark.parametrize("stop_after, change, match", [
    (-1, {}, "stop_after must be >= 0"),
    (None, {"batch_size": 64}, "fewer than data.batch_size=64"),
])
def test_a_run_that_fails_at_start_closes_its_mlflow_run_as_failed(tiny_dataset, tmp_path, tracking_uri,
                                                                  stop_after, change, match):
    raw = tiny_config(tiny_dataset, tmp_path / "run", tracking_uri, iterations=2)
    raw["data"].update(change)
    with pytest.raises(ValueError, match=match):
        train(config_from_dict(raw), stop_after=stop_after)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"] and match.split()[0] in runs[0].data.tags["error"]


def test_an_unknown_method_is_refused_before_anything_is_written(tiny_dataset, tmp_path, tracking_uri):
    raw = tiny_config(tiny_dataset, tmp_path / "run", tracking_uri, iterations=2)
    raw["sparsity"] = {"method": "nonexistent", "target": 0.5}
    with pytest.raises(ValueError, match="unknown pruning method 'nonexistent'"):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tiny_dataset, tmp_path, tracking_uri,
                                                                        caplog):
    from dsparse.evaluation import evaluate_checkpoint

    run_dir = tmp_path / "run"
    train(config(tiny_dataset, run_dir, tracking_uri), stop_after=3)
    assert json.loads((run_dir / "checkpoints" / "step-00000003" / "files.json").read_text())
    (run_dir / "checkpoints" / "step-00000003" / "mp_rank_00_model_states.pt").unlink()
    with caplog.at_level("WARNING"):
        assert evaluate_checkpoint(run_dir, max_batches=1)["checkpoint"].endswith("step-00000002")
        summary = train(config(tiny_dataset, run_dir, tracking_uri), resume=True)
    assert "skipping damaged checkpoint step-00000003: mp_rank_00_model_states.pt is missing" in caplog.text
    assert summary["step"] == 4
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step-00000003.damaged").is_dir()  # set aside: never pruned into, resumed or restored
    assert sorted(p.name for p in checkpoints.glob("step-????????")) == ["step-00000003", "step-00000004"]
    weights = checkpoints / "step-00000004" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    (checkpoints / "step-00000003" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ValueError, match="no intact checkpoint .*step-00000004: mp_rank_00_model_states.pt does "
                                         "not match its checksum; step-00000003: mp_rank_00_model_states.pt is "
                                         "missing"):
        train(config(tiny_dataset, run_dir, tracking_uri, iterations=6), resume=True)


def test_two_ranks_resume_from_the_newest_intact_checkpoint(tiny_dataset, tmp_path, tracking_uri, torchrun_train):
    raw = tiny_config(tiny_dataset, tmp_path / "run", tracking_uri, iterations=4, checkpoint_interval=1,
                      eval_interval=4)
    torchrun_train(raw, args=("--stop-after", "3"))
    (tmp_path / "run" / "checkpoints" / "step-00000003" / "mp_rank_00_model_states.pt").unlink()
    summary, log = torchrun_train(raw, args=("--resume",), with_log=True)
    assert summary["world_size"] == 2 and summary["step"] == 4
    assert "skipping damaged checkpoint step-00000003: mp_rank_00_model_states.pt is missing" in log
    history = [json.loads(line) for line in (tmp_path / "run" / "config-history.jsonl").read_text().splitlines()]
    assert history[-1]["event"] == "resume" and history[-1]["step"] == 2


def test_cli_a_truncated_shard_is_one_line_and_debug_shows_the_worker_traceback(tiny_dataset, tmp_path,
                                                                               tracking_uri, capsys):
    import yaml

    dataset = tmp_path / "data"
    shutil.copytree(tiny_dataset, dataset)
    for shard in dataset.glob("train-*.tar"):
        shard.write_bytes(shard.read_bytes()[:3000])
    raw = tiny_config(dataset, tmp_path / "run", tracking_uri, iterations=2)
    raw["data"]["num_workers"] = 1
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dsparse: error: shard ") and ".tar is unreadable" in last
    assert "data.skip_bad: true" in last
    assert main(["--debug", "train", str(path), "--set", f"output_dir={tmp_path / 'run2'}"]) == 2
    assert "Original Traceback" in capsys.readouterr().err


def _sleep_forever():
    time.sleep(120)


def lock_then_fork_a_worker(config_dict, ready, worker_pid):
    """Child: own the run directory, fork a loader-like worker that outlives us, then wait."""
    from dsparse.train.rundir import lock_run_directory

    lock_run_directory(config_from_dict(config_dict).with_absolute_paths())
    worker = multiprocessing.get_context("fork").Process(target=_sleep_forever)
    worker.start()
    worker_pid.value = worker.pid
    ready.set()
    time.sleep(120)


def test_a_forked_loader_worker_does_not_keep_a_dead_runs_directory_locked(tiny_dataset, tmp_path, tracking_uri):
    from dsparse.locks import acquire_lock, release_lock

    run_dir = tmp_path / "run"
    raw = tiny_config(tiny_dataset, run_dir, tracking_uri)
    context = multiprocessing.get_context("spawn")
    ready, worker_pid = context.Event(), context.Value("i", 0)
    owner = context.Process(target=lock_then_fork_a_worker, args=(raw, ready, worker_pid))
    owner.start()
    assert ready.wait(60)
    with pytest.raises(ValueError, match="in use by"):
        acquire_lock(run_dir)
    os.kill(owner.pid, signal.SIGKILL)  # the trainer dies; its forked worker lives on
    owner.join()
    try:
        release_lock(acquire_lock(run_dir))
    finally:
        os.kill(worker_pid.value, signal.SIGKILL)
