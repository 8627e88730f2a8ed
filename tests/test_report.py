"""``dsparse report``: values equal the runs' summaries, Delta_T signs follow each metric's
direction, seeds aggregate as checked by hand, best and seed-noise marks, refusals."""

import json
import statistics

import pytest
from scipy import stats

from dsparse.config import load_config
from dsparse.report import build_report, to_csv, to_latex, to_markdown
from dsparse.report.table import within_noise

TASKS = ["seg", "depth"]


def metrics(miou, acc, abs_err, rel_err):
    return {"seg": {"miou": miou, "pixel_acc": acc}, "depth": {"abs_err": abs_err, "rel_err": rel_err}}


def write_run(root, name, seed, values, method=None, iterations=600, tasks=TASKS, dataset=None, summary_sparsity=None,
              **sparsity):
    overrides = [f"seed={seed}", f"train.iterations={iterations}", f"tasks=[{', '.join(tasks)}]",
                 f"output_dir={root / name}"]
    if method:
        overrides += [f"sparsity.method={method}", "sparsity.target=0.9"]
        overrides += [f"sparsity.{k}={v}" for k, v in sparsity.items()]
    config = load_config("synthetic_tiny", overrides)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    summary = {"status": "complete", "final_metrics": values, "config": config.to_dict(),
               "dataset": dataset or {"name": "synthetic", "splits": {"train": 4000}},
               "sparsity": (summary_sparsity or {"achieved": 0.9}) if method else None}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    dense = [metrics(0.40, 0.80, 0.50, 0.20), metrics(0.42, 0.82, 0.52, 0.22)]
    disparse = [metrics(0.36, 0.78, 0.55, 0.21), metrics(0.38, 0.80, 0.56, 0.23)]
    random = [metrics(0.30, 0.70, 0.60, 0.30), metrics(0.31, 0.71, 0.61, 0.31)]
    paths = [write_run(tmp_path, f"dense{s}", s, dense[s]) for s in (0, 1)]
    paths += [write_run(tmp_path, f"disparse{s}", s, disparse[s], "disparse") for s in (0, 1)]
    paths += [write_run(tmp_path, f"random{s}", s, random[s], "random") for s in (0, 1)]
    return paths, dense, disparse, random


def delta_by_hand(run, base):
    seg = ((run["seg"]["miou"] - base["seg"]["miou"]) / base["seg"]["miou"]
           + (run["seg"]["pixel_acc"] - base["seg"]["pixel_acc"]) / base["seg"]["pixel_acc"]) / 2
    depth = (-(run["depth"]["abs_err"] - base["depth"]["abs_err"]) / base["depth"]["abs_err"]
             - (run["depth"]["rel_err"] - base["depth"]["rel_err"]) / base["depth"]["rel_err"]) / 2
    return 100 * (seg + depth) / 2


def test_values_seed_aggregation_and_delta_t_equal_hand_computation(runs):
    paths, dense, disparse, random = runs
    report = build_report(paths, constant=False)
    rows = {row.label: row for row in report.rows}
    assert [row.label for row in report.rows] == ["dense", "disparse", "random"]
    cell = rows["disparse"].cells["seg/miou"]
    assert cell.values == [0.36, 0.38] and cell.mean == pytest.approx(0.37)
    assert cell.std == pytest.approx(statistics.stdev([0.36, 0.38]))
    expected = [delta_by_hand(disparse[s], dense[s]) for s in (0, 1)]
    assert rows["disparse"].cells["delta_t"].values == pytest.approx(expected)
    assert rows["dense"].cells["delta_t"].values == pytest.approx([0.0, 0.0])
    # lower abs_err is better: a depth error below dense counts positive
    better_depth = metrics(0.40, 0.80, 0.40, 0.20)
    assert delta_by_hand(better_depth, dense[0]) > 0
    assert rows["random"].seeds == [0, 1] and rows["disparse"].cells["sparsity"].mean == pytest.approx(0.9)


def test_per_task_sum_delta_t_sums_each_tasks_metric_changes(runs, capsys):
    from dsparse.cli import main

    paths, dense, disparse, _ = runs
    report = build_report(paths, constant=False, delta_t="per-task-sum")
    rows = {row.label: row for row in report.rows}
    # every task here has two metrics, so the per-task sum is twice the standard mean
    expected = [2 * delta_by_hand(disparse[s], dense[s]) for s in (0, 1)]
    assert rows["disparse"].cells["delta_t"].values == pytest.approx(expected)
    assert "Delta_T % (per-task sum)" in to_markdown(report)
    assert main(["report", *map(str, paths), "--no-constant", "--delta-t", "per-task-sum", "--quiet"]) in (0, None)
    with pytest.raises(ValueError, match="delta_t must be one of standard, per-task-sum"):
        build_report(paths, constant=False, delta_t="sum")


def test_best_is_bold_and_seed_noise_is_flagged_by_welch_t_test(runs):
    paths, *_ = runs
    report = build_report(paths, constant=False)
    rows = {row.label: row for row in report.rows}
    assert rows["disparse"].cells["seg/miou"].best and not rows["random"].cells["seg/miou"].best
    assert rows["disparse"].cells["depth/abs_err"].best, "lower is better for errors"
    p = stats.ttest_ind([0.36, 0.38], [0.30, 0.31], equal_var=False).pvalue
    assert rows["random"].cells["seg/miou"].within_noise == (p >= 0.05)
    assert within_noise([1.0, 1.2, 0.9], [1.05, 1.1, 1.0]) and not within_noise([1.0, 1.01], [2.0, 2.02])
    assert not within_noise([1.0], [1.0, 2.0]), "one seed cannot be tested"
    markdown = to_markdown(report)
    assert "| disparse | scratch | 2 | **0.3700 ± 0.0141** |" in markdown
    assert "seg miou ↑" in markdown and "depth abs_err ↓" in markdown and "Welch t-test" in markdown
    assert r"\textbf{0.3700 $\pm$ 0.0141}" in to_latex(report)
    assert "seg/miou_best" in to_csv(report).splitlines()[0]


def test_settings_that_vary_become_columns_and_method_variants_get_labels(tmp_path):
    values = metrics(0.4, 0.8, 0.5, 0.2)
    paths = [write_run(tmp_path, f"dense{it}", 0, values, iterations=it) for it in (600, 2000)]
    paths += [write_run(tmp_path, f"d{it}", 0, metrics(0.3, 0.7, 0.6, 0.3), "disparse", iterations=it)
              for it in (600, 2000)]
    paths.append(write_run(tmp_path, "dx", 0, metrics(0.35, 0.7, 0.6, 0.3), "disparse", score_init="xavier"))
    report = build_report(paths, constant=False)
    assert report.setting_keys == ["train.iterations"]
    labels = [(row.label, row.settings["train.iterations"]) for row in report.rows]
    assert labels == [("dense", 2000), ("disparse (score_init=model)", 2000), ("dense", 600),
                      ("disparse (score_init=model)", 600), ("disparse (score_init=xavier)", 600)]
    rows = {(r.label, r.settings["train.iterations"]): r for r in report.rows}
    assert rows[("disparse (score_init=xavier)", 600)].cells["seg/miou"].best


@pytest.mark.parametrize("change, message", [
    ({"tasks": ["seg", "normal"]}, "train different tasks"),
    ({"dataset": {"name": "other"}}, "used different datasets"),
])
def test_mismatched_runs_are_refused(tmp_path, change, message):
    values = metrics(0.4, 0.8, 0.5, 0.2)
    first = write_run(tmp_path, "a", 0, values)
    other_values = {"seg": values["seg"], "normal": {}} if "tasks" in change else values
    second = write_run(tmp_path, "b", 1, other_values, **change)
    with pytest.raises(ValueError, match=message):
        build_report([first, second], constant=False)


def test_sparse_runs_without_their_dense_configuration_are_refused(tmp_path):
    dense = write_run(tmp_path, "dense", 0, metrics(0.4, 0.8, 0.5, 0.2), iterations=600)
    sparse = write_run(tmp_path, "sparse", 0, metrics(0.3, 0.8, 0.5, 0.2), "random", iterations=2000)
    with pytest.raises(ValueError, match="no dense run with the configuration of sparse"):
        build_report([dense, sparse], constant=False)


def test_cli_writes_every_format_and_unfinished_runs_are_one_line_errors(runs, tmp_path, capsys):
    from dsparse.cli import main

    paths, *_ = runs
    out = tmp_path / "out" / "table"
    (tmp_path / "out").mkdir()
    assert main(["report", *map(str, paths), "--no-constant", "--out", str(out)]) == 0
    for suffix in (".md", ".csv", ".tex", ".png"):
        assert out.with_name("table" + suffix).is_file()
    assert "| dense |" in capsys.readouterr().out
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert main(["report", str(unfinished)]) == 2
    assert "is not a finished run" in capsys.readouterr().err


def test_explicit_baselines_compare_other_configurations_by_seed(tmp_path):
    dense = [write_run(tmp_path, f"dense{s}", s, metrics(0.4, 0.8, 0.5, 0.2 + 0.01 * s)) for s in (0, 1)]
    wide = metrics(0.3, 0.7, 0.6, 0.3)
    other = write_run(tmp_path, "narrow0", 0, wide, "disparse", iterations=999)  # no dense of its own config
    report = build_report([other], constant=False, baselines=dense)
    row = next(r for r in report.rows if r.kind == "sparse")
    assert row.cells["delta_t"].values == pytest.approx([delta_by_hand(wide, metrics(0.4, 0.8, 0.5, 0.2))])
    assert any("against the baseline runs dense0, dense1" in note for note in report.notes)
    with pytest.raises(ValueError, match="baseline runs must be dense"):
        build_report([dense[0]], constant=False, baselines=[other])


def test_dense_runs_ignore_their_inert_sparsity_keys_and_paths(tmp_path):
    """A dense run's sparsity.* settings do nothing, and data paths differ by machine."""
    a = write_run(tmp_path, "dense0", 0, metrics(0.4, 0.8, 0.5, 0.2))
    b = write_run(tmp_path, "dense1", 1, metrics(0.42, 0.8, 0.5, 0.2))
    summary = json.loads((b / "summary.json").read_text())
    summary["config"]["data"]["path"] = "/elsewhere/synthetic"
    summary["config"]["sparsity"]["target"] = 0.5
    (b / "summary.json").write_text(json.dumps(summary))
    sparse = write_run(tmp_path, "sparse0", 0, metrics(0.3, 0.8, 0.5, 0.2), "random")
    report = build_report([a, b, sparse], constant=False)
    dense_rows = [row for row in report.rows if row.kind == "dense"]
    assert len(dense_rows) == 1 and dense_rows[0].seeds == [0, 1]
    row = next(r for r in report.rows if r.kind == "sparse")
    assert row.cells["delta_t"].values == pytest.approx([delta_by_hand(metrics(0.3, 0.8, 0.5, 0.2),
                                                                       metrics(0.4, 0.8, 0.5, 0.2))])
    assert not row.notes, "seed 0 has its dense run"


def test_a_sweeps_sampled_keys_do_not_hide_its_dense_trial(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "trials").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "s", "search_keys": ["optimizer.lr"]}))
    write_run(sweep / "trials", "dense", 0, metrics(0.4, 0.8, 0.5, 0.2), **{})
    sparse = write_run(sweep / "trials", "sparse", 0, metrics(0.3, 0.8, 0.5, 0.2), "random")
    summary = json.loads((sparse / "summary.json").read_text())
    summary["config"]["optimizer"]["lr"] = 0.0123  # sampled: differs from the dense trial's
    (sparse / "summary.json").write_text(json.dumps(summary))
    report = build_report(sweep=sweep, constant=False)
    row = next(r for r in report.rows if r.kind == "sparse")
    assert row.cells["delta_t"].values == pytest.approx([delta_by_hand(metrics(0.3, 0.8, 0.5, 0.2),
                                                                       metrics(0.4, 0.8, 0.5, 0.2))])


def test_sparsity_as_trained_and_per_component_come_from_each_summary(tmp_path):
    def parts(trunk, seg, depth):
        return {"trunk": {"sparsity": trunk}, "seg": {"sparsity": seg}, "depth": {"sparsity": depth}}

    values = metrics(0.4, 0.8, 0.5, 0.2)
    paths = [write_run(tmp_path, f"dense{s}", s, values) for s in (0, 1)]
    paths += [write_run(tmp_path, f"adapmtl{s}", s, values, "adapmtl", summary_sparsity={
        "achieved": 0.9, "components": parts(0.85 + 0.01 * s, 0.99, 0.98),
        "adapmtl": {"trained_sparsity": 0.8 + 0.02 * s}}) for s in (0, 1)]
    paths += [write_run(tmp_path, "snip0", 0, values, "snip", summary_sparsity={
        "achieved": 0.9, "components": parts(0.9, 0.8, 0.7)})]
    report = build_report(paths, constant=False)
    keys = [c.key for c in report.columns]
    assert keys[-5:] == ["sparsity/trained", "sparsity/trunk", "sparsity/seg", "sparsity/depth", "delta_t"]
    rows = {row.label: row for row in report.rows}
    assert rows["adapmtl"].cells["sparsity/trained"].mean == pytest.approx(0.81)
    assert rows["adapmtl"].cells["sparsity/trunk"].values == pytest.approx([0.85, 0.86])
    assert rows["snip"].cells["sparsity/trained"].values == [] and rows["snip"].cells["sparsity/seg"].mean == 0.8
    assert rows["dense"].cells["sparsity/trunk"].values == []
    markdown = to_markdown(report)
    assert "| sparsity trained | trunk sparsity | seg sparsity | depth sparsity |" in markdown
    assert "0.810" in markdown and "trunk (shared by every task)" in markdown


def test_empty_layers_get_a_column_when_some_run_emptied_layers(tmp_path):
    values = metrics(0.4, 0.8, 0.5, 0.2)
    paths = [write_run(tmp_path, f"dense{s}", s, values) for s in (0, 1)]
    paths += [write_run(tmp_path, f"snip{s}", s, values, "snip", summary_sparsity={"achieved": 0.9, "empty_layers": []})
              for s in (0, 1)]
    assert "empty_layers" not in [c.key for c in build_report(paths, constant=False).columns]
    paths += [write_run(tmp_path, f"random{s}", s, values, "random", summary_sparsity={
        "achieved": 0.9, "empty_layers": ["heads.seg.0.weight"] * (1 + s)}) for s in (0, 1)]
    report = build_report(paths, constant=False)
    rows = {row.label: row for row in report.rows}
    assert [c.key for c in report.columns][-2:] == ["empty_layers", "delta_t"]
    assert rows["random"].cells["empty_layers"].values == [1, 2] and rows["snip"].cells["empty_layers"].values == [0, 0]
    assert rows["dense"].cells["empty_layers"].values == []
    assert "| 1.5 |" in to_markdown(report) and "empty layers: masked layers that kept no weight" in to_markdown(report)


def test_labels_name_the_block_size_only_for_block_masks(tmp_path):
    values = metrics(0.4, 0.8, 0.5, 0.2)
    paths = [write_run(tmp_path, "dense0", 0, values)]
    paths += [write_run(tmp_path, f"snip{g}{b}", 0, values, "snip", granularity=g, **({"block": b} if b else {}))
              for g, b in (("element", None), ("block", 16))]
    labels = sorted(row.label for row in build_report(paths, constant=False).rows)
    assert labels == ["dense", "snip (block=16, granularity=block)", "snip (granularity=element)"]
