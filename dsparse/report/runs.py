"""Finished runs as records a report compares: from run directories, a sweep directory or
an MLflow experiment. Everything comes from each run's ``summary.json`` (the numbers the
run itself wrote), never from logs."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dsparse.config import RunConfig, config_from_dict
from dsparse.io import read_json
from dsparse.runs.layout import RunLayout


@dataclass
class RunRecord:
    """One finished run: its config, final validation metrics and dataset identity."""

    name: str
    config: RunConfig
    metrics: dict[str, dict[str, float]]
    dataset: dict | None
    achieved_sparsity: float
    trained_sparsity: float | None = None
    """AdapMTL: the sparsity its thresholds reached before the projection to ``achieved``."""
    component_sparsity: dict[str, float] | None = None
    """Component (trunk, each head or branch) -> its sparsity, for sparse runs."""
    empty_layers: int | None = None
    """Sparse runs: how many masked layers kept no weight."""

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def is_dense(self) -> bool:
        return not self.config.sparsity.enabled


def record_from_summary(summary: dict, name: str) -> RunRecord:
    """A record of a ``summary.json`` payload.

    Raises:
        ValueError: if the summary is not of a finished run.
    """
    if not isinstance(summary, dict) or summary.get("status") != "complete" or not summary.get("final_metrics"):
        raise ValueError(f"run {name} has not finished (its summary.json holds no final metrics); finish it with "
                         "dsparse train ... --resume, or leave it out")
    config = config_from_dict(summary["config"])
    sparsity = summary.get("sparsity") or {}
    trained = (sparsity.get("adapmtl") or {}).get("trained_sparsity")
    parts = {name: float(entry["sparsity"]) for name, entry in (sparsity.get("components") or {}).items()}
    empty = sparsity.get("empty_layers")
    return RunRecord(name, config, summary["final_metrics"], summary.get("dataset"), float(sparsity.get("achieved", 0.0)),
                     None if trained is None else float(trained), parts or None, None if empty is None else len(empty))


def load_run(path: str | Path) -> RunRecord:
    """A run directory (or its ``summary.json``).

    Raises:
        ValueError: in one line, for a path that is no finished run.
    """
    path = Path(path)
    summary = RunLayout(path).summary if path.is_dir() else path
    if not summary.is_file():
        raise ValueError(f"{path} is not a finished run: it has no summary.json (pass run directories, "
                         "--sweep DIR or --experiment NAME)")
    return record_from_summary(read_json(summary, "run summary"), path.name if path.is_dir() else path.parent.name)


def runs_of_sweep(sweep_dir: str | Path) -> list[RunRecord]:
    """The finished trials of a sweep directory (``OUT/trials/*/summary.json``).

    Raises:
        ValueError: if the directory holds no finished trial.
    """
    sweep_dir = Path(sweep_dir)
    summaries = sorted((sweep_dir / "trials").glob("*/summary.json"))
    if not summaries:
        raise ValueError(f"{sweep_dir} holds no finished trial (no trials/*/summary.json); is it a sweep directory "
                         "(dsparse sweep --out)?")
    return [load_run(path.parent) for path in summaries]


def runs_of_experiment(name: str, tracking_uri: str) -> list[RunRecord]:
    """The finished runs of an MLflow experiment, from their logged ``summary.json``.

    Raises:
        ValueError: for an unknown experiment or one without finished dsparse runs.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment {name!r} at {tracking_uri}; experiments there: {known}")
    records = []
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=50000)
    with tempfile.TemporaryDirectory() as scratch:
        for run in runs:
            if not any(a.path == "summary.json" for a in client.list_artifacts(run.info.run_id)):
                continue  # a sweep's parent run, or a run that logged no summary
            local = client.download_artifacts(run.info.run_id, "summary.json", scratch)
            summary = json.loads(Path(local).read_text())
            records.append(record_from_summary(summary, run.info.run_name or run.info.run_id))
    if not records:
        raise ValueError(f"MLflow experiment {name!r} has no finished dsparse run with a summary.json")
    return records


def sampled_keys(out_dir: Path) -> list[str]:
    """The config keys a sweep samples (``search``), recorded in ``OUT/sweep.json``: its dense
    trials sample other values, so they are left out when matching a trial to its dense one."""
    state = Path(out_dir) / "sweep.json"
    return json.loads(state.read_text()).get("search_keys", []) if state.is_file() else []
