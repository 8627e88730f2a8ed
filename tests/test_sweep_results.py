"""The per-trial results table of a sweep: Delta_T against the dense trial of the same
configuration and seed (a sweep over training lengths has one dense trial per length)."""

import json

import pytest

from dsparse.config import load_config
from dsparse.sweep.results import results_table
from dsparse.tasks import TASKS, delta_t


def trial(out, name, dataset, iterations, values, method=None):
    overrides = [f"data.path={dataset}", f"train.iterations={iterations}", "tasks=[seg, depth]"]
    if method:
        overrides.append(f"sparsity.method={method}")
    summary = {"status": "complete", "final_metrics": values,
               "config": load_config("synthetic_tiny", overrides).to_dict(),
               "sparsity": {"achieved": 0.9} if method else None}
    (out / "trials" / name).mkdir(parents=True)
    (out / "trials" / name / "summary.json").write_text(json.dumps(summary))


def test_delta_t_is_against_the_dense_trial_of_the_same_length(tiny_dataset, tmp_path):
    short = {"seg": {"miou": 0.2, "pixel_acc": 0.6}, "depth": {"abs_err": 0.8, "rel_err": 0.4}}
    long = {"seg": {"miou": 0.4, "pixel_acc": 0.8}, "depth": {"abs_err": 0.5, "rel_err": 0.2}}
    sparse = {"seg": {"miou": 0.3, "pixel_acc": 0.7}, "depth": {"abs_err": 0.6, "rel_err": 0.3}}
    trial(tmp_path, "a_dense_600", tiny_dataset, 600, short)
    trial(tmp_path, "b_dense_2000", tiny_dataset, 2000, long)
    trial(tmp_path, "c_random_2000", tiny_dataset, 2000, sparse, "random")
    rows = {row["trial"]: row for row in results_table(tmp_path)}
    tasks = {t: TASKS[t] for t in ("seg", "depth")}
    assert rows["c_random_2000"]["delta_t"] == pytest.approx(delta_t(sparse, long, tasks))
    assert rows["c_random_2000"]["delta_t"] < 0
