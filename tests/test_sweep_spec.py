"""Sweep specs: grid expansion, per-trial overrides, fail-fast validation."""

import pytest
import yaml

from dsparse.config import config_from_dict
from dsparse.sweep import Resources, load_sweep_spec

REPO_SWEEPS = __import__("pathlib").Path(__file__).resolve().parents[1] / "sweeps"


def write_spec(tmp_path, **fields):
    spec = {"base": "synthetic_tiny", **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name, trials", [("synthetic_sparsity", 10), ("synthetic_seeds_90", 6),
                                          ("nyuv2_disparse", 93), ("cityscapes_disparse", 93),
                                          ("taskonomy_disparse", 93)])
def test_repository_specs_load_with_one_dense_trial_per_seed(name, trials):
    spec = load_sweep_spec(REPO_SWEEPS / f"{name}.yaml")
    points = spec.grid_points()
    assert len(points) == trials
    dense = [p for p in points if p.get("sparsity.method") is None]
    assert len(dense) == len(spec.grid.get("seed", [0])) and all(set(p) <= {"sparsity.method", "seed"} for p in dense)


def test_grid_expands_to_every_combination_with_overrides(tmp_path):
    spec = load_sweep_spec(write_spec(tmp_path, overrides={"train.iterations": 7},
                                      grid={"sparsity.method": ["disparse", "snip"], "sparsity.target": [0.5, 0.9]}))
    points = spec.grid_points()
    assert len(points) == 4 and {"sparsity.method": "snip", "sparsity.target": 0.9} in points
    config = config_from_dict(spec.base_config(), spec.trial_overrides(points[0]))
    assert config.train.iterations == 7 and config.sparsity.method == "disparse" and config.sparsity.target == 0.5


def test_a_mapping_grid_value_sets_several_keys_together(tmp_path):
    """Variants that are not a product (xavier scoring exists for disparse, not random)."""
    variants = [{"method": None}, {"method": "disparse"}, {"method": "disparse", "score_init": "xavier"},
                {"method": "random"}]
    spec = load_sweep_spec(write_spec(tmp_path, overrides={"sparsity.target": 0.8},
                                      grid={"sparsity": variants, "seed": [0, 1]}))
    points = spec.grid_points()
    assert len(points) == 8
    assert {"sparsity.method": "disparse", "sparsity.score_init": "xavier", "seed": 1} in points
    assert {"sparsity.method": None, "seed": 0} in points
    config = config_from_dict(spec.base_config(), spec.trial_overrides(points[2]))
    assert (config.sparsity.method, config.sparsity.score_init, config.sparsity.target) == ("disparse", "xavier", 0.8)


def test_task_subsets_are_grid_values(tmp_path):
    spec = load_sweep_spec(write_spec(tmp_path, grid={"tasks": [["seg", "depth"], ["seg", "normal", "edge"]]}))
    config = config_from_dict(spec.base_config(), spec.trial_overrides(spec.grid_points()[1]))
    assert config.tasks == ["seg", "normal", "edge"]


@pytest.mark.parametrize("fields, message", [
    ({"grdi": {}}, r"unknown sweep spec key\(s\) \['grdi'\]"),
    ({"grid": {"sparsity.targt": [0.5]}}, r"trial .* is not a valid run config: unknown config key\(s\) \['targt'\]"),
    ({"grid": {"sparsity.target": [0.5, 1.5]}}, r"sparsity.target must be in \(0, 1\)"),
    ({"grid": {"tasks": [["seg", "albedo"]]}}, r"unknown task\(s\) \['albedo'\]"),
    ({"grid": {"seed": []}}, "grid.seed must be a non-empty list"),
    ({"grid": {"sparsity.method": ["snip"], "sparsity": [{"method": "random"}]}},
     r"grid sets \['sparsity.method'\] twice"),
    ({"search": {"optimizer.lr": {"gauss": [0, 1]}}}, "search.optimizer.lr must be one of"),
    ({"mode": "best"}, "mode must be min or max"),
    ({"resources": {"workers": 0}}, "resources.workers must be >= 1"),
    ({"resources": {"gpus": 1}}, r"unknown resources key\(s\) \['gpus'\]"),
    ({"metric": "seg/miou"}, r"metric must be delta_t or val/<task>/<metric>"),
    ({"metric": "val/seg/mIoU"}, r"task 'seg' reports \['miou', 'pixel_acc'\]"),
    ({"metric": "val/edge/mae", "grid": {"tasks": [["seg", "depth"]]}}, "names task 'edge', which trial"),
    ({"scheduler": {"hyperband": {}}}, "scheduler must be null or {asha:"),
    ({"scheduler": {"asha": {"grace": 1}}, "metric": "val/seg/miou"}, r"unknown scheduler.asha option\(s\)"),
    ({"scheduler": {"asha": {"grace_period": 1}}}, "delta_t exists only after the sweep"),
    ({"search_alg": "bayes"}, r"search_alg must be one of \['random', 'optuna'\]"),
    ({"search_alg": "optuna", "metric": "val/seg/miou"}, "needs a 'search' space"),
    ({"search_alg": "optuna", "search": {"optimizer.lr": {"uniform": [0.1, 0.2]}}}, "delta_t exists only after"),
    ({"search_alg": "optuna", "search": {"optimizer.lr": {"uniform": [0.1, 0.2]}}, "metric": "val/seg/miou",
      "grid": {"seed": [0, 1]}}, "optuna searches one grid point"),
])
def test_bad_specs_fail_fast(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        load_sweep_spec(write_spec(tmp_path, **fields))


def test_impossible_resource_request_is_explained():
    eight_gpus = [{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}]
    with pytest.raises(ValueError, match=r"one trial needs 12 GPU \(6 workers x 2\) but the cluster has 8"):
        Resources(workers=6, cpus_per_worker=1, gpus_per_worker=2).check_fits(eight_gpus)
    with pytest.raises(ValueError, match=r"one worker needs 5 GPU but the largest node has 4"):
        Resources(workers=1, cpus_per_worker=1, gpus_per_worker=5).check_fits(eight_gpus)
    with pytest.raises(ValueError, match=r"needs 2.01 CPU \(2 workers x 1 \+ the trial driver\)"):
        Resources(workers=2, cpus_per_worker=1).check_fits([{"CPU": 2}])
    Resources(workers=4, cpus_per_worker=1, gpus_per_worker=2).check_fits(eight_gpus)
    Resources(workers=2, cpus_per_worker=1).check_fits([{"CPU": 3}])


def test_asha_spec_on_a_validation_metric_loads(tmp_path):
    spec = load_sweep_spec(write_spec(tmp_path, metric="val/depth/abs_err", mode="min",
                                      scheduler={"asha": {"grace_period": 100, "reduction_factor": 2}}))
    assert spec.scheduler == {"asha": {"grace_period": 100, "reduction_factor": 2}}


def test_a_cluster_sweep_after_a_local_one_in_the_same_process_is_refused(tmp_path, monkeypatch):
    from dsparse.sweep import runner

    monkeypatch.setattr(runner, "_started_local_ray", True)
    with pytest.raises(ValueError, match="start a new process"):
        runner.run_sweep(load_sweep_spec(write_spec(tmp_path)), tmp_path / "sweep", address="127.0.0.1:1")


def test_a_grid_of_a_million_trials_is_refused_at_once_naming_the_count(tmp_path):
    spec = write_spec(tmp_path, grid={"seed": list(range(1000)), "train.iterations": list(range(1, 1001))})
    with pytest.raises(ValueError, match=r"1,000,000 trials .* max_trials"):
        load_sweep_spec(spec)


def test_an_empty_grid_is_refused_instead_of_running_one_trial_silently(tmp_path):
    with pytest.raises(ValueError, match=r"grid: \{\} lists no keys"):
        load_sweep_spec(write_spec(tmp_path, grid={}))
