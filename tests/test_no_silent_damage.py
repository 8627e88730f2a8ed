"""Nothing of the user's is replaced unasked, and what cannot be meant is refused (issue 19):
every verb that writes refuses an existing target without ``--overwrite``, before any work,
in one line."""

from __future__ import annotations

import shutil

import pytest

from dsparse.cli import main
from dsparse.config import config_from_dict
from dsparse.train.trainer import train

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sparse_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("damage") / "run"
    train(config_from_dict({
        "tasks": ["seg", "depth"], "output_dir": str(run_dir),
        "data": {"path": str(tiny_dataset), "batch_size": 4, "eval_batch_size": 8, "num_workers": 0,
                 "crop_size": 24},
        "model": {"arch": "resnet18", "base_width": 4, "head_dilations": [1, 2]},
        "optimizer": {"name": "adam", "lr": 0.003}, "schedule": {"name": "constant"},
        "train": {"iterations": 2, "eval_interval": 2, "log_interval": 2, "checkpoint_interval": 2,
                  "eval_batches": 1},
        "tracking": {"enabled": False},
        "sparsity": {"method": "disparse", "target": 0.5, "num_batches": 1}}))
    return run_dir


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dsparse: error:"), err
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture
def existing(tmp_path):
    def make(name, text="hand-written, keep me"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return make


def test_prune_refuses_an_existing_out_file_and_a_directory(sparse_run, tmp_path, existing, capsys):
    config = str(sparse_run / "config.yaml")
    target = existing("masks.pt")
    assert main(["prune", config, "--method", "random", "--sparsity", "0.5", "--out", str(target)]) == 2
    _one_line_error(capsys, "exists", "--overwrite")
    assert target.read_text() == "hand-written, keep me"
    assert main(["prune", config, "--method", "random", "--sparsity", "0.5", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a directory")
    assert main(["prune", config, "--method", "random", "--sparsity", "0.5", "--out", str(target),
                 "--overwrite"]) == 0
    assert target.read_bytes() != b"hand-written, keep me"


def test_export_refuses_an_existing_file_the_runs_own_masks_and_a_directory(sparse_run, tmp_path, existing,
                                                                          capsys):
    target = existing("model.pt")
    own_masks = (sparse_run / "masks.pt").read_bytes()
    for out in (target, sparse_run / "masks.pt"):
        assert main(["export", str(sparse_run), "--out", str(out)]) == 2
        _one_line_error(capsys, "exists", "--overwrite")
    assert target.read_text() == "hand-written, keep me"
    assert (sparse_run / "masks.pt").read_bytes() == own_masks
    assert main(["export", str(sparse_run), "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a directory")


def test_eval_refuses_an_existing_out_file_and_a_directory_before_evaluating(sparse_run, tmp_path, existing, capsys,
                                                                           caplog):
    target = existing("metrics.json")
    assert main(["eval", str(sparse_run), "--out", str(target)]) == 2
    _one_line_error(capsys, "exists", "--overwrite")
    assert target.read_text() == "hand-written, keep me"
    assert "evaluating" not in caplog.text, "the refusal must come before the evaluation"
    assert main(["eval", str(sparse_run), "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a directory")


def test_report_refuses_to_replace_a_hand_written_file(sparse_run, tmp_path, existing, capsys):
    notes = existing("notes.md")
    assert main(["report", str(sparse_run), "--no-constant", "--out", str(tmp_path / "notes")]) == 2
    _one_line_error(capsys, "notes.md exists", "--overwrite")
    assert notes.read_text() == "hand-written, keep me"


def test_analyze_refuses_a_non_empty_directory_and_a_file(sparse_run, tmp_path, existing, capsys):
    run = tmp_path / "run"
    shutil.copytree(sparse_run, run)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "mask_iou.csv").write_text("mine")
    assert main(["analyze", str(run), "--out", str(out)]) == 2
    _one_line_error(capsys, "is not empty", "--overwrite")
    assert (out / "mask_iou.csv").read_text() == "mine"
    assert main(["analyze", str(run), "--out", str(existing("afile"))]) == 2
    _one_line_error(capsys, "is a file")
    assert main(["analyze", str(run)]) == 0  # its own default directory, new
    capsys.readouterr()
    assert main(["analyze", str(run)]) == 2  # again: the first analysis is kept
    _one_line_error(capsys, "analysis is not empty")
    assert main(["analyze", str(run), "--overwrite"]) == 0


@pytest.mark.parametrize("target, what", [("0.9999999", "keeps none"), ("1e-9", "prunes none")])
def test_a_sparsity_that_keeps_nothing_or_prunes_nothing_is_refused(sparse_run, tmp_path, capsys, target, what):
    assert main(["prune", str(sparse_run / "config.yaml"), "--method", "random", "--sparsity", target,
                 "--out", str(tmp_path / "m.pt")]) == 2
    _one_line_error(capsys, what, "prunable weights", "use a target between")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("batches", ["0", "-1"])
def test_eval_refuses_a_batch_count_below_one(sparse_run, capsys, batches):
    assert main(["eval", str(sparse_run), "--max-batches", batches]) == 2
    _one_line_error(capsys, "--max-batches must be at least 1")


def test_block_without_block_granularity_is_refused(sparse_run, tmp_path, capsys):
    base = ["prune", str(sparse_run / "config.yaml"), "--method", "random", "--sparsity", "0.5",
            "--out", str(tmp_path / "m.pt")]
    for extra in (["--block", "32"], ["--block", "16"], ["--set", "sparsity.block=64"]):
        assert main(base + extra) == 2
        _one_line_error(capsys, "granularity")


def test_block_masks_keep_the_stem_dense_and_empty_layers_are_loud_and_recorded(tiny_dataset, tmp_path, caplog):
    """The README's block example at width 8 emptied 18 of 34 layers, the stem included, and
    finished "complete" without a word (now the default floors keep a block in every block
    row; switched off here)."""
    import json

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    summary = train(config_from_dict({
        "tasks": ["seg", "normal", "depth", "keypoint", "edge"], "output_dir": str(run),
        "data": {"path": str(tiny_dataset), "batch_size": 4, "num_workers": 0, "crop_size": 24},
        "model": {"arch": "resnet18", "base_width": 8, "head_dilations": [1, 2]},
        "train": {"iterations": 1, "eval_interval": 1, "log_interval": 1, "checkpoint_interval": 1,
                  "eval_batches": 1},
        "tracking": {"uri": uri, "experiment": "tests"},
        "sparsity": {"method": "random", "target": 0.9, "granularity": "block", "block": 16, "min_density": 0}}))
    empty = summary["sparsity"]["empty_layers"]
    assert "trunk.stem.0.weight" not in empty, "block masks keep the stem dense by default"
    assert empty, "this setting empties layers (the tiny heads have one output channel)"
    assert json.loads((run / "summary.json").read_text())["sparsity"]["empty_layers"] == empty
    warning = next(r.getMessage() for r in caplog.records if "keep no weight" in r.getMessage())
    assert all(layer in warning for layer in empty) and "predict constants" in warning
    assert set(summary["sparsity"]["cut_off_tasks"]) <= {"seg", "normal", "depth", "keypoint", "edge"}
    client = MlflowClient(uri)
    mlflow_run = client.get_run(summary["mlflow_run_id"])
    assert mlflow_run.data.metrics["sparsity/empty_layers"] == len(empty)
    assert mlflow_run.data.tags["sparsity.empty_layers"].split(", ") == empty
    # where the sparsity went, per component, in the summary and in MLflow alike
    parts = summary["sparsity"]["components"]
    assert list(parts) == ["trunk", "seg", "normal", "depth", "keypoint", "edge"]
    assert sum(p["kept"] for p in parts.values()) / sum(p["weights"] for p in parts.values()) == pytest.approx(
        1 - summary["sparsity"]["achieved"])
    assert {c: mlflow_run.data.metrics[f"sparsity/component/{c}"] for c in parts} == {
        c: p["sparsity"] for c, p in parts.items()}


def test_analyze_of_a_copied_run_never_logs_into_the_originals_mlflow_run(tiny_dataset, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from dsparse.analysis import analyze

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    original = tmp_path / "original"
    summary = train(config_from_dict({
        "tasks": ["seg", "depth"], "output_dir": str(original),
        "data": {"path": str(tiny_dataset), "batch_size": 4, "num_workers": 0, "crop_size": 24},
        "model": {"arch": "resnet18", "base_width": 4, "head_dilations": [1, 2]},
        "train": {"iterations": 1, "eval_interval": 1, "log_interval": 1, "checkpoint_interval": 1,
                  "eval_batches": 1},
        "tracking": {"uri": uri, "experiment": "tests"},
        "sparsity": {"method": "disparse", "target": 0.5, "num_batches": 1}}))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    result = analyze(copy)
    assert result.mlflow_run_id is None
    assert "is a copy of" in caplog.text
    tags = MlflowClient(uri).get_run(summary["mlflow_run_id"]).data.tags
    assert "analysis.watershed" not in tags and not MlflowClient(uri).list_artifacts(summary["mlflow_run_id"],
                                                                                      "analysis")
    assert analyze(original).mlflow_run_id == summary["mlflow_run_id"]  # the original itself still logs
