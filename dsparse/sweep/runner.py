"""``dsparse sweep``: Ray Tune drives the trials of a spec; each trial is a Ray Train
``TorchTrainer`` whose workers run the same training function as ``dsparse train``.

Three pieces, as in Ray's own layout: the per-worker loop (:func:`_worker_loop`), the
trial driver that builds one ``TorchTrainer`` per trial (:func:`_run_trial`), and the
``Tuner`` over the grid (:func:`run_sweep`). Metrics reach Tune through
``TuneReportCallback``; every rank reports at every validation, so ``ray.train.report`` is
called equally often on all workers. Each trial trains in its own directory with
``resume=True``, so a restarted worker group continues from the trial's last checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

from dsparse.config import config_from_dict
from dsparse.sweep.spec import SweepSpec
from dsparse.tracking.mlflow_tracker import RunTracker, resolve_tracking_uri

log = logging.getLogger("dsparse.sweep")


def _worker_loop(loop_config: dict) -> None:
    """One Ray Train worker: the process group is up; train with dsparse's loop."""
    import ray.train

    from dsparse.train.trainer import train

    def report(step: int, metrics: dict) -> None:
        flat = {f"val/{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}
        ray.train.report({"step": step, **flat})

    config = config_from_dict(loop_config["raw"], loop_config["overrides"])
    train(config, resume=True, on_validation=report)


def _run_trial(params: dict) -> None:
    """Tune function trainable: one multi-worker TorchTrainer for one trial."""
    import ray.train
    from ray import tune
    from ray.train import FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    overrides = list(params["overrides"])
    if params["sampled"]:  # searched keys: one directory per sampled trial (stable across restarts)
        overrides += [f"{key}={value}" for key, value in params["sampled"].items()]
        name = f"{params['trial_name']}-{tune.get_context().get_trial_id()}"
        overrides = [o for o in overrides if not o.startswith(("output_dir=", "tracking.run_name="))]
        overrides += [f"output_dir={Path(params['trials_dir']) / name}", f"tracking.run_name={name}"]
        params = {**params, "trial_name": name}
    resources = params["resources"]
    use_gpu = resources["gpus_per_worker"] > 0
    per_worker = {"CPU": resources["cpus_per_worker"], **({"GPU": resources["gpus_per_worker"]} if use_gpu else {})}
    TorchTrainer(
        _worker_loop,
        train_loop_config={"raw": params["raw"], "overrides": overrides},
        scaling_config=ScalingConfig(num_workers=resources["workers"], use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=params["trial_name"], storage_path=params["storage"],
                                       failure_config=FailureConfig(max_failures=params["max_failures"]),
                                       callbacks=[TuneReportCallback()]),
    ).fit()


def _search_space(search: dict) -> dict:
    from ray import tune

    makers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
              "choice": lambda *values: tune.choice(list(values))}
    return {key: makers[kind](*arguments) for key, distribution in search.items()
            for kind, arguments in distribution.items()}


def trial_name(point: dict) -> str:
    text = "_".join(f"{key.split('.')[-1]}={value}" for key, value in point.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)


def _absolute(raw: dict, root: Path) -> dict:
    """Paths in a config are relative to where the user runs the sweep, not to Ray's workers."""
    raw = dict(raw)
    data = dict(raw.get("data") or {})
    if "path" in data:
        data["path"] = str((root / data["path"]).resolve())
    raw["data"] = data
    return raw


def _init_ray(address: str | None) -> None:
    import ray

    if address:
        ray.init(address=address)
    elif not ray.is_initialized():
        # One logical CPU more than the machine has: trial drivers only wait on their workers.
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False)


def _parent_run(spec: SweepSpec, out_dir: Path, resume: bool) -> RunTracker:
    """The sweep's MLflow parent run; a resumed sweep keeps logging into the same one."""
    state_file = out_dir / "sweep.json"
    run_id = json.loads(state_file.read_text())["mlflow_parent_run_id"] if resume and state_file.is_file() else None
    parent = RunTracker(config_from_dict(spec.base_config()).tracking, spec.name, run_id=run_id)
    state_file.write_text(json.dumps({"name": spec.name, "mlflow_parent_run_id": parent.run_id}))
    return parent


def _is_complete(trial_dir: Path) -> bool:
    summary = trial_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "complete"


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, address: str | None = None, resume: bool = False) -> list[dict]:
    """Run every grid point as a trial; returns the results rows (also written as CSV/PNG).

    With ``resume``, finished trials are kept and the others continue from their last
    checkpoint (sampled ``search`` trials get new samples).

    Raises:
        ValueError: an unsupported scheduler, a trial that can never be placed on the
            cluster, or an existing sweep directory without ``resume``.
    """
    from ray import tune

    if spec.scheduler is not None:
        raise ValueError("sweep spec 'scheduler' (ASHA) is parsed but not supported by dsparse sweep yet; remove it")
    out_dir = Path(out_dir).resolve()
    trials_dir = out_dir / "trials"
    if not resume and trials_dir.is_dir() and any(trials_dir.iterdir()):
        raise ValueError(f"{out_dir} already holds a sweep; pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    _init_ray(address)
    import ray

    spec.resources.check_fits(ray.cluster_resources())
    uri = resolve_tracking_uri(config_from_dict(spec.base_config()).tracking)
    parent = _parent_run(spec, out_dir, resume)
    raw = _absolute(spec.base_config(), Path.cwd())
    trials = []
    for point in spec.grid_points():
        name = trial_name(point)
        if resume and not spec.search and _is_complete(trials_dir / name):
            log.info("trial %s finished before; not rerun", name)
            continue
        overrides = spec.trial_overrides(point) + [
            f"output_dir={trials_dir / name}", f"tracking.uri={uri}", f"tracking.run_name={name}",
            f"tracking.parent_run_id={parent.run_id}"]
        trials.append({"trial_name": name, "point": point, "raw": raw, "overrides": overrides})
    if not trials:
        rows = results_table(out_dir)
        parent.finish("FINISHED")
        return rows
    param_space = {"trial": tune.grid_search(trials), "sampled": _search_space(spec.search)}
    common = {"resources": vars(spec.resources), "storage": str(out_dir / "ray"), "max_failures": spec.max_failures,
              "trials_dir": str(trials_dir)}
    ranked = spec.metric != "delta_t"  # Delta_T needs the dense trial: computed after the sweep
    tuner = tune.Tuner(
        tune.with_resources(lambda params: _run_trial({**params["trial"], "sampled": params["sampled"], **common}),
                            {"CPU": 0.01}),
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, num_samples=spec.num_samples,
                                    metric=spec.metric if ranked else None, mode=spec.mode if ranked else None),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(out_dir / "ray")),
    )
    results = tuner.fit()
    errors = [str(error) for error in results.errors]
    rows = results_table(out_dir)
    if parent.enabled:
        parent.log_artifact(out_dir / "results.csv")
        parent.finish("FAILED" if errors else "FINISHED")
    if errors:
        raise RuntimeError(f"{len(errors)} trial(s) failed: {errors[0][:2000]}")
    return rows


def results_table(out_dir: Path) -> list[dict]:
    """One row per trial from its summary.json, with Delta_T against the dense trial of the
    same task set and seed; written to results.csv."""
    from dsparse.data.shards import load_manifest
    from dsparse.tasks import delta_t
    from dsparse.train.components import build_run_tasks

    summaries = {path.parent.name: json.loads(path.read_text())
                 for path in sorted((out_dir / "trials").glob("*/summary.json"))}
    rows = []
    for name, summary in summaries.items():
        config = config_from_dict(summary["config"])
        tasks = build_run_tasks(config, load_manifest(config.data.path))
        dense = [s for s in summaries.values() if s.get("sparsity") is None
                 and s["config"]["tasks"] == summary["config"]["tasks"] and s["config"]["seed"] == summary["config"]["seed"]]
        sparsity = summary.get("sparsity") or {}
        row = {"trial": name, "method": sparsity.get("method") or "dense", "target": sparsity.get("requested", 0.0),
               "achieved": sparsity.get("achieved", 0.0), "tasks": "+".join(config.tasks), "seed": config.seed}
        row.update({f"{t}/{task.key_metric}": summary["final_metrics"][t][task.key_metric] for t, task in tasks.items()})
        row["delta_t"] = delta_t(summary["final_metrics"], dense[0]["final_metrics"], tasks) if dense else None
        rows.append(row)
    if rows:
        keys = sorted({k for row in rows for k in row}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with (out_dir / "results.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        plot_results(rows, out_dir / "results.png")
    return rows


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
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
