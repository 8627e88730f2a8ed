"""Paper-style comparison tables of finished runs (``dsparse report``).

    report = build_report(sweep="runs/sweeps/synthetic_open_question")
    paths = write_report(report, "reports/open_question")   # .md .csv .tex .png
    print(to_markdown(report))

Rows: the best constant predictor of the training labels, dense, then each method (per
setting that varies, e.g. training length); columns: each task's metrics with the better
direction, achieved sparsity and Delta_T; seeds aggregated as mean ± std. The rules (what
is aggregated, the baseline of Delta_T, best and seed-noise marks) are in ``table.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dsparse.io import check_output_file, write_text_atomic
from dsparse.report.render import to_csv, to_latex, to_markdown, to_png, to_records
from dsparse.report.runs import RunRecord, load_run, runs_of_experiment, runs_of_sweep, sampled_keys
from dsparse.report.table import Report, build_table, within_noise

__all__ = ["Report", "RunRecord", "build_report", "check_report_out", "collect_runs", "load_run", "to_csv", "to_latex", "to_markdown",
           "to_png", "to_records", "within_noise", "write_report"]

log = logging.getLogger("dsparse.report")


def collect_runs(runs=(), sweep: str | Path | None = None, experiment: str | None = None,
                 tracking_uri: str | None = None) -> list[RunRecord]:
    """Records of the given run directories, sweep directory and MLflow experiment.

    Raises:
        ValueError: if none is given, or any source has no finished run.
    """
    records = [load_run(path) for path in runs]
    if sweep is not None:
        records += runs_of_sweep(sweep)
    if experiment is not None:
        from dsparse.config import TrackingConfig
        from dsparse.tracking.mlflow_tracker import resolve_tracking_uri

        records += runs_of_experiment(experiment, tracking_uri or resolve_tracking_uri(TrackingConfig()))
    if not records:
        raise ValueError("nothing to report: give run directories, --sweep DIR or --experiment NAME")
    return records


def build_report(runs=(), sweep: str | Path | None = None, experiment: str | None = None,
                 tracking_uri: str | None = None, constant: bool = True, baselines=(),
                 delta_t: str = "standard") -> Report:
    """The comparison table of the runs (see ``collect_runs``), with the constant
    predictor's row when ``constant`` and the dense runs' dataset is readable; with
    ``baselines`` (dense run directories), Delta_T of every row is against them, by seed;
    ``delta_t`` is ``standard`` or ``per-task-sum`` (AdapMTL's)."""
    records = collect_runs(runs, sweep, experiment, tracking_uri)
    baseline_records = [load_run(path) for path in baselines]
    reference = next((r for r in baseline_records + records if r.is_dense), None)
    constant_metrics = None
    if constant and reference is not None:
        from dsparse.evaluation import constant_predictor_metrics

        try:
            constant_metrics = constant_predictor_metrics(reference.config)
        except (ValueError, OSError) as error:  # data moved or not mounted here: the table stands without it
            log.warning("no constant-predictor row: the data of %s cannot be read (%s)", reference.name, error)
    return build_table(records, constant_metrics, baseline_records or None,
                       ignore=sampled_keys(Path(sweep)) if sweep is not None else (), delta_t=delta_t)


REPORT_SUFFIXES = (".md", ".csv", ".tex", ".png")


def check_report_out(out: str | Path, overwrite: bool = False) -> list[Path]:
    """The files ``write_report(report, out)`` writes; refused before any work when one
    exists (unless ``overwrite``) or is a directory."""
    out = Path(out)
    return [check_output_file(out.with_name(out.name + suffix), overwrite) for suffix in REPORT_SUFFIXES]


def write_report(report: Report, out: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``OUT.md``, ``OUT.csv``, ``OUT.tex`` and ``OUT.png`` (``out`` without a suffix)."""
    markdown, csv, latex, png = check_report_out(out, overwrite)
    for path, text in ((markdown, to_markdown(report)), (csv, to_csv(report)), (latex, to_latex(report))):
        write_text_atomic(path, text)
    return [markdown, csv, latex, to_png(report, png)]
