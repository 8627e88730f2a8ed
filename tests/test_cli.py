"""The CLI is a thin layer: user errors exit 2 with a message, verbs call the library."""

import json

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
