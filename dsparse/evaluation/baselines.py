"""The dense baseline a sparse run is compared with (``Delta_T``), and the check that the
comparison means something: the same tasks, the same dataset."""

from __future__ import annotations

from pathlib import Path

from dsparse.config import RunConfig
from dsparse.io import read_json
from dsparse.runs.layout import RunLayout

__all__ = ["check_comparable", "load_baseline"]


def load_baseline(path: str | Path) -> dict:
    """A baseline run's ``summary.json`` (from its run directory, or the file itself).

    Raises:
        ValueError: in one line, for anything else (a config file, an unfinished run, a
            file that is not JSON).
    """
    path = Path(path)
    summary = RunLayout(path).summary if path.is_dir() else path
    if not summary.is_file() or summary.name != "summary.json":
        raise ValueError(f"baseline {path} is not a finished run directory or its summary.json; pass the dense "
                         "run's directory (runs/NAME) once it has finished")
    data = read_json(summary, "baseline")
    if not isinstance(data, dict) or not data.get("final_metrics") or not isinstance(data.get("config"), dict):
        raise ValueError(f"baseline {summary} holds no final metrics (is the run finished?)")
    return data


def check_comparable(baseline: dict, config: RunConfig, dataset: dict, where: str) -> None:
    """Refuse a baseline trained on other tasks or another dataset: ``Delta_T`` would mean nothing."""
    tasks = baseline["config"].get("tasks")
    if sorted(tasks or []) != sorted(config.tasks):
        raise ValueError(f"baseline {where} has tasks {tasks}, this run {config.tasks}; compare runs on the same tasks")
    theirs = baseline.get("dataset")
    if theirs is None:  # summaries written before datasets were recorded: compare the location
        same = Path(baseline["config"]["data"]["path"]).resolve() == Path(config.data.path).resolve()
        theirs = {"path": baseline["config"]["data"]["path"]}
    else:
        same = theirs == dataset
    if not same:
        raise ValueError(f"baseline {where} was trained on another dataset ({theirs}), this run on {dataset}; "
                         "compare runs on the same dataset")
