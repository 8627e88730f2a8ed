"""The results of a sweep: one row per trial (from its ``summary.json``) with Delta_T
against the dense trial of the same configuration and seed (``dsparse.report.table.pick_baseline``,
which ``dsparse report`` uses too), as ``results.csv`` and a plot.
The comparison table across seeds is ``dsparse report --sweep`` (``dsparse.report``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dsparse.config import config_from_dict
from dsparse.report.runs import sampled_keys


def results_table(out_dir: Path) -> list[dict]:
    """One row per trial, written to ``results.csv`` (and plotted to ``results.png``).

    Finished trials carry their final key metrics and Delta_T against the dense trial of
    the same configuration and seed. Unfinished ones (stopped early by the scheduler, failed,
    or interrupted) are listed with their status and last validation metrics.
    """
    summaries = {path.parent.name: json.loads(path.read_text())
                 for path in sorted((out_dir / "trials").glob("*/summary.json"))}
    ignore = sampled_keys(out_dir)
    configs = {name: config_from_dict(summary["config"]) for name, summary in summaries.items()}
    dense = [(config.to_dict(), config.seed, summaries[name]["final_metrics"])
             for name, config in configs.items() if not config.sparsity.enabled]
    rows = [_finished_row(name, configs[name], summary, dense, ignore) for name, summary in summaries.items()]
    for trial_dir in sorted((out_dir / "trials").glob("*/config.yaml")):
        if trial_dir.parent.name not in summaries:
            rows.append(_unfinished_row(trial_dir.parent))
    if rows:
        keys = sorted({k for row in rows for k in row}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with (out_dir / "results.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        plot_results(rows, out_dir / "results.png")
    return rows


def _tasks(config):
    from dsparse.data.manifest import load_manifest
    from dsparse.runs.components import build_run_tasks

    return build_run_tasks(config, load_manifest(config.data.path))


def _describe(name: str, config, status: str) -> dict:
    sparsity = config.sparsity
    return {"trial": name, "status": status, "method": sparsity.method or "dense",
            "target": sparsity.target if sparsity.method else 0.0, "tasks": "+".join(config.tasks),
            "seed": config.seed}


def _finished_row(name: str, config, summary: dict, dense: list, ignore=()) -> dict:
    """A finished trial's row; ``dense`` lists the dense trials as ``pick_baseline`` takes them."""
    from dsparse.report.table import pick_baseline
    from dsparse.tasks import delta_t

    tasks = _tasks(config)
    picked = pick_baseline(config.to_dict(), config.seed, dense, ignore)
    row = _describe(name, config, "complete")
    row["achieved"] = (summary.get("sparsity") or {}).get("achieved", 0.0)
    row.update({f"{t}/{task.key_metric}": summary["final_metrics"][t][task.key_metric] for t, task in tasks.items()})
    row["delta_t"] = delta_t(summary["final_metrics"], picked[0], tasks) if picked else None
    return row


def _unfinished_row(trial_dir: Path) -> dict:
    """A trial without a summary: its error, or the step and metrics of its last checkpoint."""
    import yaml

    from dsparse.runs import RunLayout
    from dsparse.runs.checkpoints import STATE_FILE, latest_checkpoint
    from dsparse.sweep.worker import read_error

    run = RunLayout(trial_dir)
    config = config_from_dict(yaml.safe_load(run.config.read_text()))
    checkpoint = latest_checkpoint(run.checkpoints)
    state = json.loads((checkpoint / STATE_FILE).read_text()) if checkpoint is not None else {}
    error = read_error(trial_dir)
    status = "error" if error else f"stopped at step {state.get('step', 0)}"
    row = _describe(trial_dir.name, config, status)
    row["achieved"] = None
    if state.get("history"):
        last = state["history"][-1]["metrics"]
        row.update({f"{t}/{task.key_metric}": last[t][task.key_metric] for t, task in _tasks(config).items()})
    row["delta_t"] = None
    return row


def plot_results(rows: list[dict], path: Path) -> None:
    """Delta_T vs sparsity, one line per method and task set (the dense trial sits at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["delta_t"] is not None:
            groups.setdefault((row["method"], row["tasks"]), []).append(row)
    for (method, tasks), members in sorted(groups.items()):
        members.sort(key=lambda r: r["achieved"])
        axis.plot([r["achieved"] for r in members], [r["delta_t"] for r in members], marker="o",
                  label=method if len({t for _, t in groups}) == 1 else f"{method} ({tasks})")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("achieved sparsity")
    axis.set_ylabel("Delta_T vs dense (%)")
    if groups:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
