"""Sparse export: the file stores kept blocks or values, loads back into block-sparse layers
that reproduce the masked dense model (fp32, rtol=atol=1e-4), and bad input is refused."""

from __future__ import annotations

import pytest
import torch

from dsparse.cli import main
from dsparse.config import config_from_dict
from dsparse.data.manifest import load_manifest
from dsparse.evaluation import evaluate_checkpoint
from dsparse.export import export_run, load_sparse
from dsparse.models import prunable_parameters
from dsparse.sparsity.block.layers import BlockSparseLayer
from dsparse.runs import latest_checkpoint
from dsparse.runs.components import build_run_model, build_run_tasks
from dsparse.train.trainer import train

pytestmark = pytest.mark.e2e


def run_config(dataset, run_dir, sparsity):
    return config_from_dict({
        "tasks": ["seg", "depth"], "output_dir": str(run_dir),
        "data": {"path": str(dataset), "batch_size": 4, "eval_batch_size": 8, "num_workers": 0},
        "model": {"arch": "resnet18", "base_width": 16, "head_dilations": [1, 2]},
        "optimizer": {"name": "adam", "lr": 0.01}, "schedule": {"name": "constant"},
        "train": {"iterations": 3, "eval_interval": 3, "log_interval": 3, "checkpoint_interval": 3, "eval_batches": 1},
        "tracking": {"enabled": False}, "sparsity": sparsity})


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    made = {}
    for name, sparsity in (("block", {"method": "random", "target": 0.8, "granularity": "block", "block": 16}),
                           ("element", {"method": "random", "target": 0.8}),
                           ("dense", {})):
        config = run_config(tiny_dataset, root / name, sparsity)
        train(config)
        made[name] = (root / name, config)
    return made


def masked_dense_model(run_dir, config):
    """The trained model as dense weights with zeros (the reference of the export)."""
    from dsparse.sparsity.masks import MaskSet
    from dsparse.sparsity.sparsifier import read_sparsifier_state, swap_sparse_layers
    from dsparse.runs import load_model_weights

    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    tasks = build_run_tasks(config, load_manifest(config.data.path))
    dense = build_run_model(config, tasks)
    sparse = build_run_model(config, tasks)
    masks = MaskSet.from_state_dict(read_sparsifier_state(checkpoint)["masks"])
    layers = swap_sparse_layers(sparse, masks)  # the swap the run used, then the dense weights of it
    sparse.load_state_dict(load_model_weights(checkpoint))
    state = dict(sparse.state_dict())
    weights = prunable_parameters(dense)
    with torch.no_grad():
        for fqn, layer in layers.items():
            weights[fqn].copy_(layer.dense_weight())
        dense.load_state_dict({k: v for k, v in state.items() if k in dense.state_dict()}, strict=False)
    return dense, masks


@pytest.mark.parametrize("kind", ["block", "element"])
def test_export_round_trip_matches_the_masked_dense_model(runs, tmp_path, kind):
    run_dir, config = runs[kind]
    report = export_run(run_dir, tmp_path / "model.pt")
    assert report.num_bytes < report.dense_bytes, "a sparse export must be smaller than the dense model"
    model, loaded_config = load_sparse(tmp_path / "model.pt")
    assert loaded_config.tasks == config.tasks
    has_block_layers = any(isinstance(m, BlockSparseLayer) for m in model.modules())
    assert has_block_layers == (kind == "block")
    reference, masks = masked_dense_model(run_dir, config)
    for fqn, weight in prunable_parameters(reference).items():
        assert torch.count_nonzero(weight[~masks.masks[fqn]]) == 0
    model.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, expected = model(x), reference(x)
    for task in config.tasks:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-4, atol=1e-4)


def test_eval_runs_an_exported_file(runs, tmp_path):
    run_dir, _ = runs["block"]
    export_run(run_dir, tmp_path / "model.pt")
    from_export = evaluate_checkpoint(tmp_path / "model.pt", max_batches=1)
    from_run = evaluate_checkpoint(run_dir, max_batches=1)
    for task, values in from_run["metrics"].items():
        for name, value in values.items():
            assert from_export["metrics"][task][name] == pytest.approx(value, rel=1e-4, abs=1e-4)


def test_cli_export_reports_sizes_and_refuses_bad_input(runs, tmp_path, capsys):
    run_dir, _ = runs["block"]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "a.pt")]) == 0
    assert "of the dense model" in capsys.readouterr().out
    dense_dir, _ = runs["dense"]
    assert main(["export", str(dense_dir), "--out", str(tmp_path / "b.pt")]) == 2
    assert "is a dense run" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists()
    config = runs["element"][1]
    tasks = build_run_tasks(config, load_manifest(config.data.path))
    narrower = config_from_dict({**config.to_dict(), "model": {**config.to_dict()["model"], "base_width": 8}})
    with pytest.raises(ValueError, match="exported from another model"):
        load_sparse(tmp_path / "a.pt", model=build_run_model(narrower, tasks))


def _edited(source, target, edit):
    payload = torch.load(source, weights_only=True)
    edit(payload["sparse"])
    torch.save(payload, target)
    return target


def _first_block_entry(sparse):
    return next(entry for entry in sparse.values() if entry["kind"] == "block" and entry["slot_rows"].numel() > 1)


def _repeat_first_block(sparse):
    entry = _first_block_entry(sparse)
    entry["slot_rows"][1], entry["slot_cols"][1] = entry["slot_rows"][0].item(), entry["slot_cols"][0].item()


@pytest.mark.parametrize("edit, message", [
    (lambda s: _first_block_entry(s)["slot_rows"].__setitem__(0, 999), r"block position \(999, .* is outside"),
    (lambda s: _first_block_entry(s).update(blocks=_first_block_entry(s)["blocks"][1:]), "block positions but blocks"),
    (_repeat_first_block, "listed twice"),
    (lambda s: _first_block_entry(s).pop("slot_cols"), "lacks or garbles"),
])
def test_an_edited_block_export_is_refused_in_one_line(runs, tmp_path, capsys, edit, message):
    """Hand-edited files crashed with an IndexError traceback or loaded silently wrong."""
    run_dir, _ = runs["block"]
    export_run(run_dir, tmp_path / "model.pt")
    edited = _edited(tmp_path / "model.pt", tmp_path / "edited.pt", edit)
    with pytest.raises(ValueError, match=message):
        load_sparse(edited)
    assert main(["eval", str(edited), "--max-batches", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert "is damaged or was edited" in error and len(error.splitlines()) == 1


def test_an_edited_element_export_is_refused(runs, tmp_path):
    run_dir, _ = runs["element"]
    export_run(run_dir, tmp_path / "model.pt")
    entry = lambda s: next(iter(s.values()))  # noqa: E731
    edited = _edited(tmp_path / "model.pt", tmp_path / "edited.pt",
                     lambda s: entry(s).update(values=entry(s)["values"][1:]))
    with pytest.raises(ValueError, match="values are stored"):
        load_sparse(edited)


def test_a_truncated_export_says_it_cannot_be_read(runs, tmp_path, capsys):
    """It said `no checkpoint found`, as if the user had named the wrong path."""
    run_dir, _ = runs["block"]
    export_run(run_dir, tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert main(["eval", str(tmp_path / "cut.pt")]) == 2
    error = capsys.readouterr().err
    assert "cannot be read" in error and "no checkpoint found" not in error


def test_a_full_disk_during_export_is_one_line_and_leaves_no_file(runs, tmp_path, capsys):
    """torch's writer reported a full disk as `unexpected pos` (a RuntimeError traceback)."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        run_dir, _ = runs["block"]
        assert main(["export", str(run_dir), "--out", str(small / "model.pt")]) == 2
        error = capsys.readouterr().err.strip()
        assert "no space left" in error and len(error.splitlines()) == 1
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)])
