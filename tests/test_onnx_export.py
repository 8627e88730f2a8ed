"""ONNX export of channel and block runs, checked in ONNX Runtime, evaluated by dsparse eval."""

import importlib.util

import pytest
import torch

from dsparse.config import config_from_dict
from dsparse.evaluation import evaluate_checkpoint
from dsparse.onnx_export import OnnxRuntimeModel, export_onnx, load_onnx
from dsparse.runs.restore import restore_run
from dsparse.train.trainer import train

from .sparsity.test_sparse_training import sparse_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def channel_and_block_runs(tiny_dataset, tmp_path_factory):
    runs = {}
    for kind, sparsity in (("channel", {"granularity": "channel", "target": 0.5}),
                           ("block", {"granularity": "block", "block": 16, "target": 0.5})):
        run_dir = tmp_path_factory.mktemp(kind)
        config = sparse_config(tiny_dataset, run_dir, iterations=2, **sparsity)
        config["tasks"] = ["seg", "depth"]
        train(config_from_dict(config))
        runs[kind] = run_dir
    return runs


@pytest.mark.parametrize("kind", ["channel", "block"])
def test_an_onnx_export_runs_in_onnx_runtime_like_pytorch_and_evaluates(kind, channel_and_block_runs, tmp_path):
    run_dir = channel_and_block_runs[kind]
    out = tmp_path / f"{kind}.onnx"
    result = export_onnx(run_dir, out)
    assert out.is_file() and result["max_difference"] <= 1e-4 and result["tasks"] == ["seg", "depth"]
    model, config = load_onnx(out)
    assert isinstance(model, OnnxRuntimeModel) and config.tasks == ["seg", "depth"]
    reference = restore_run(run_dir).model.eval()
    x = torch.randn(5, 3, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        expected = reference(x)
    got = model(x)
    for task in ("seg", "depth"):
        torch.testing.assert_close(got[task], expected[task], atol=1e-4, rtol=0)
    from_onnx = evaluate_checkpoint(out, max_batches=2)["metrics"]
    from_run = evaluate_checkpoint(run_dir, max_batches=2)["metrics"]
    for task, values in from_run.items():
        for name, value in values.items():
            assert from_onnx[task][name] == pytest.approx(value, abs=1e-3), (task, name)


def test_onnx_export_refuses_a_missing_package_a_wrong_suffix_and_an_existing_file(channel_and_block_runs, tmp_path,
                                                                                   monkeypatch):
    run_dir = channel_and_block_runs["channel"]
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(run_dir, tmp_path / "model.pt")
    existing = tmp_path / "there.onnx"
    existing.write_text("keep me")
    with pytest.raises(ValueError, match="exists"):
        export_onnx(run_dir, existing)
    assert existing.read_text() == "keep me"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ValueError, match="pip install onnxruntime"):
        export_onnx(run_dir, tmp_path / "new.onnx")
    assert not (tmp_path / "new.onnx").exists()
