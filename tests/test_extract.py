"""Task extraction: export a run for a subset of its tasks."""

import pytest
import torch

from dsparse.config import config_from_dict
from dsparse.export import export_run, load_sparse
from dsparse.models import prunable_parameters
from dsparse.onnx_export import export_onnx, load_onnx
from dsparse.runs.restore import restore_run
from dsparse.train.trainer import train

from .sparsity.test_sparse_training import sparse_config

pytestmark = pytest.mark.e2e

TASKS = ["seg", "normal", "depth"]


def trained(dataset, run_dir, model=None, **sparsity):
    config = sparse_config(dataset, run_dir, iterations=2, **sparsity)
    config["tasks"] = TASKS
    config["model"].update(model or {})
    train(config_from_dict(config))
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    hidden = {"head_hidden": 8}
    return {
        "channel": trained(tiny_dataset, tmp_path_factory.mktemp("channel"), hidden, granularity="channel",
                           target=0.5),
        "block": trained(tiny_dataset, tmp_path_factory.mktemp("block"), hidden, granularity="block", block=16,
                         target=0.5),
        "branched": trained(tiny_dataset, tmp_path_factory.mktemp("branched"),
                            {"branches": [["seg"], ["normal", "depth"]], "branch_from": "layer3"},
                            granularity="channel", target=0.5),
    }


def outputs(model, x, tasks):
    model.eval()
    with torch.no_grad():
        result = model(x)
    return {t: result[t] for t in tasks}


@pytest.mark.parametrize("kind", ["channel", "block", "branched"])
def test_extraction_keeps_the_kept_tasks_outputs_and_drops_the_rest(kind, runs, tmp_path):
    keep = ["normal", "depth"] if kind == "branched" else ["seg", "depth"]  # branched: seg's branch goes
    full = restore_run(runs[kind]).model
    x = torch.randn(2, 3, 32, 32)
    expected = outputs(full, x, keep)
    report = export_run(runs[kind], tmp_path / "subset.pt", keep_tasks=keep, revote=False)
    model, config = load_sparse(report.path)
    assert config.tasks == keep and list(model.tasks) == keep
    got = outputs(model, x, keep)
    for task in keep:
        torch.testing.assert_close(got[task], expected[task], atol=1e-6, rtol=0)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())


def test_re_voting_without_the_dropped_tasks_removes_channels_only_they_kept(runs, tmp_path):
    kept_alone = export_run(runs["channel"], tmp_path / "plain.pt", keep_tasks=["seg"], revote=False)
    revoted = export_run(runs["channel"], tmp_path / "revoted.pt", keep_tasks=["seg"])
    plain_model, _ = load_sparse(kept_alone.path)
    model, _ = load_sparse(revoted.path)
    plain_weights, weights = prunable_parameters(plain_model), prunable_parameters(model)
    assert set(weights) == set(plain_weights)
    assert all(weights[n].numel() <= plain_weights[n].numel() for n in weights)
    assert sum(w.numel() for w in weights.values()) < sum(w.numel() for w in plain_weights.values())
    payload = torch.load(revoted.path, weights_only=True)
    record = payload["masks_meta"]["channels"]
    before = torch.load(kept_alone.path, weights_only=True)["masks_meta"]["channels"]
    for name, entry in record.items():
        assert set(entry["kept"]) <= set(before[name]["kept"]) and entry["kept"]  # a subset, never empty
    model(torch.randn(1, 3, 32, 32))  # the re-voted architecture is consistent


def test_onnx_extraction_and_unknown_tasks(runs, tmp_path):
    result = export_onnx(runs["channel"], tmp_path / "seg.onnx", keep_tasks=["seg"])
    model, config = load_onnx(tmp_path / "seg.onnx")
    assert result["tasks"] == ["seg"] and model.tasks == ["seg"] and config.tasks == ["seg"]
    with pytest.raises(ValueError, match="--tasks names keypoint, which the run does not have; it has seg, normal, "
                                         "depth"):
        export_run(runs["channel"], tmp_path / "x.pt", keep_tasks=["keypoint"])
    assert not (tmp_path / "x.pt").exists()


def _signature(module: torch.nn.Module) -> tuple:
    return type(module).__name__, tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


@pytest.mark.parametrize("attempt", range(3))
def test_extraction_renames_exactly_the_modules_that_remain(attempt):
    """Dropped modules are freed during the selection; their ids must never map a dropped
    module's name onto a new container (this once sent a branch's name to shrink_model)."""
    from dsparse.extract import extract_tasks
    from dsparse.models import build_branched_model
    from dsparse.tasks import build_tasks

    tasks = build_tasks(TASKS, num_classes=5)
    model = build_branched_model("resnet18", {t: tasks[t].num_channels for t in TASKS}, [{"seg"}, {"normal", "depth"}],
                                 base_width=8, branch_from="layer3")
    old = {name: _signature(module) for name, module in model.named_modules()}
    config = config_from_dict({"tasks": TASKS, "model": {"branches": [["seg"], ["normal", "depth"]]}})
    renamed = extract_tasks(model, config, None, tasks, ["normal", "depth"]).renamed
    new = dict(model.named_modules())
    dropped = ("branches.0", "heads.seg")
    expected = {name for name in old if name not in ("branches", "heads")
                and not any(name == d or name.startswith(d + ".") for d in dropped)}
    assert set(renamed) == expected
    assert renamed.pop("") == ""  # the model itself: its contents changed
    for name, new_name in renamed.items():
        assert _signature(new[new_name]) == old[name]
        assert new_name == (f"branches.0{name[len('branches.1'):]}" if name.startswith("branches.1") else name)
