"""The CLI is a thin layer: user errors exit 2 with a message, verbs call the library."""

import json
import logging

import pytest

from dsparse.cli import main


def test_missing_config_exits_2_with_a_message(capsys):
    assert main(["train", "no-such-config.yaml"]) == 2
    assert "neither a file nor a preset" in capsys.readouterr().err


def test_unknown_task_lists_the_known_ones(tiny_dataset, tmp_path, capsys):
    code = main(["train", "synthetic_tiny", "--set", f"data.path={tiny_dataset}", "--set", "tasks=[seg, albedo]",
                 "--set", f"output_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown task(s) ['albedo']" in err and "'keypoint'" in err


def test_eval_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


@pytest.mark.e2e
def test_train_then_eval_with_baseline_writes_json(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"data.path={tiny_dataset}", f"output_dir={run}", "train.iterations=3", "train.eval_interval=3",
                 "train.checkpoint_interval=3", "data.batch_size=4", "data.num_workers=0", "model.base_width=4",
                 "tracking.enabled=false"]
    assert main(["train", "synthetic_tiny", *[a for o in overrides for a in ("--set", o)]]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--baseline", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "delta_t_%" in printed and "miou" in printed
    result = json.loads(out.read_text())
    assert result["delta_t"] == pytest.approx(0.0, abs=1e-6)
    assert set(result["metrics"]) == {"seg", "normal", "depth", "keypoint", "edge"}


@pytest.mark.parametrize("flags", [["--json", "--quiet"], ["--quiet", "--json"]])
def test_json_and_quiet_work_before_or_after_the_verb_and_json_is_the_only_stdout(tmp_path, capsys, caplog, flags):
    out = tmp_path / "data"
    args = ["data", "synth", "--out", str(out), "--num-train", "6", "--num-val", "2", "--size", "16", "--procs", "1"]
    argv = [flags[0], *args, flags[1]]
    caplog.set_level(logging.INFO)
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == {"train": 6, "val": 2} and result["out"] == str(out)
    assert not [r for r in caplog.records if r.levelno < logging.WARNING], "--quiet hides progress and info"


def test_progress_lines_carry_rate_and_eta(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--num-train", "6", "--num-val", "2", "--size", "16",
                 "--procs", "1"]) == 0
    assert any("8/8 samples" in r.getMessage() and "samples/s, ETA" in r.getMessage() for r in caplog.records)


def test_errors_under_json_are_a_json_object_too(capsys):
    assert main(["--json", "train", "no-such-config.yaml"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": json.loads(captured.out)["error"], "exit_code": 2}
    assert "no-such-config.yaml" in captured.err
