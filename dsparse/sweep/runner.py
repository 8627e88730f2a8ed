"""``dsparse sweep``: Ray Tune drives the trials of a spec; each trial is a Ray Train
``TorchTrainer`` whose workers run the same training function as ``dsparse train``.

Three pieces, as in Ray's own layout: the per-worker loop (:mod:`dsparse.sweep.worker`),
the trial driver that builds one ``TorchTrainer`` per trial (:func:`_run_trial`), and the
``Tuner`` over the grid (:func:`run_sweep`). Metrics reach Tune through
``TuneReportCallback``. Each trial trains in its own directory under ``--out`` and
registers its checkpoints with Ray Train, so a restarted worker group continues from the
trial's last checkpoint; ``max_failures`` bounds the restarts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from dsparse.config import apply_overrides, config_from_dict
from dsparse.sweep.results import results_table
from dsparse.sweep.spec import DRIVER_CPUS, SweepSpec, format_override
from dsparse.sweep.worker import ERROR_FILE, read_error, worker_loop
from dsparse.io import write_text_atomic
from dsparse.tracking.mlflow_tracker import RunTracker, resolve_tracking_uri

log = logging.getLogger("dsparse.sweep")

RUN_ID_FILE = "mlflow_run_id"
PATH_KEYS = (("data", "path"), ("deepspeed", "config_file"), ("sparsity", "masks"), ("sparsity", "from_checkpoint"))


class SweepFailedError(RuntimeError):
    """Some trials failed; the finished ones are in the results, ``--resume`` reruns the rest."""


class TrialConfigError(RuntimeError):
    """A trial stopped on an error that a restart would repeat; it is not retried."""


def _run_trial(params: dict) -> None:
    """Tune function trainable: check the trial, then run one multi-worker TorchTrainer."""
    import ray.train
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from dsparse.data.manifest import load_manifest

    overrides = list(params["overrides"])
    name = params["trial_name"]
    if params["sampled"] or params["repeated"]:  # one directory per sample (stable across restarts)
        overrides += [format_override(key, value) for key, value in params["sampled"].items()]
        name = f"{name}-{tune.get_context().get_trial_id()}"
        overrides = [o for o in overrides if not o.startswith(("output_dir=", "tracking.run_name="))]
        overrides += [f"output_dir={Path(params['trials_dir']) / name}", f"tracking.run_name={name}"]
    config = config_from_dict(params["raw"], overrides)
    try:
        load_manifest(config.data.path)  # the commonest config error, caught before any worker starts
    except ValueError as error:
        raise TrialConfigError(f"trial {name}: {error}") from None
    run_dir = Path(config.output_dir)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    if config.tracking.enabled:
        overrides.append(f"tracking.run_id={_trial_mlflow_run(config, run_dir)}")
    resources = params["resources"]
    use_gpu = resources["gpus_per_worker"] > 0
    per_worker = {"CPU": resources["cpus_per_worker"], **({"GPU": resources["gpus_per_worker"]} if use_gpu else {})}
    TorchTrainer(
        worker_loop,
        train_loop_config={"raw": params["raw"], "overrides": overrides},
        scaling_config=ScalingConfig(num_workers=resources["workers"], use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=params["storage"],
            failure_config=FailureConfig(max_failures=params["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            callbacks=[TuneReportCallback()]),
    ).fit()
    error = read_error(run_dir)
    if error is not None:
        raise TrialConfigError(f"trial {name} stopped on {error} (not retried: a restart would fail the same way)")


def _trial_mlflow_run(config, run_dir: Path) -> str:
    """The trial's MLflow child run, created once and kept in the trial directory, so
    restarted workers and ``--resume`` keep logging into it."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = RunTracker(config.tracking, config.tracking.run_name, parent_run_id=config.tracking.parent_run_id).run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, run_id)
    return run_id


def _trial_entry(params: dict, trials: dict, common: dict) -> None:
    _run_trial({**trials[params["trial"]], "sampled": params["sampled"], **common})


def _tune_trial_name(trial) -> str:
    return f"{trial.config['trial']}-{trial.trial_id}"


def _search_space(search: dict) -> dict:
    from ray import tune

    makers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
              "choice": lambda *values: tune.choice(list(values))}
    return {key: makers[kind](*arguments) for key, distribution in search.items()
            for kind, arguments in distribution.items()}


def _scheduler(spec: SweepSpec, iterations: int):
    if spec.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    options = {"max_t": iterations, **spec.scheduler["asha"]}
    return ASHAScheduler(time_attr="step", **options)


def _search_alg(spec: SweepSpec):
    """None: Tune's own random sampling and grid expansion."""
    if spec.search_alg != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=0)


def trial_name(point: dict) -> str:
    text = "_".join(f"{key.split('.')[-1]}={value}" for key, value in point.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)


def _absolute(raw: dict, root: Path) -> dict:
    """Paths in a config are relative to where the user runs the sweep, not to Ray's workers."""
    raw = dict(raw)
    for section, key in PATH_KEYS:
        values = dict(raw.get(section) or {})
        if values.get(key):
            values[key] = str((root / values[key]).resolve())
            raw[section] = values
    return raw


_started_local_ray = False  # this process has run a local Ray instance


def _init_ray(address: str | None) -> None:
    global _started_local_ray
    import ray

    if address:
        if _started_local_ray:
            # Ray Tune 2.60: trial actors die at once ("The actor never ran") when a process
            # that ran a local Ray instance connects to a cluster; checked with a plain Tuner.
            raise ValueError("this Python process already ran a sweep on a local Ray instance, and Ray Tune "
                             "cannot then run trials on a cluster from it; start a new process (e.g. "
                             f"`dsparse sweep SPEC --address {address}`)")
        ray.init(address=address, log_to_driver=False, runtime_env=_worker_environment())
    elif not ray.is_initialized():
        # One logical CPU more than the machine has: trial drivers only wait on their workers.
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False,
                 runtime_env=_worker_environment())
        _started_local_ray = True


def _worker_environment() -> dict:
    """Ray workers start their own Python (and OpenMP): they get the passive wait policy
    (``dsparse.cpus``) through the runtime environment, unless the user chose one."""
    from dsparse.cpus import set_openmp_wait_policy

    environment = {key: os.environ[key] for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
                   if key in os.environ}
    set_openmp_wait_policy(environment)
    return {"env_vars": environment}


def _parent_run(spec: SweepSpec, tracking, out_dir: Path, resume: bool) -> RunTracker:
    """The sweep's MLflow parent run; a resumed sweep keeps logging into the same one."""
    state_file = out_dir / "sweep.json"
    run_id = json.loads(state_file.read_text())["mlflow_parent_run_id"] if resume and state_file.is_file() else None
    parent = RunTracker(tracking, spec.name, run_id=run_id)
    write_text_atomic(state_file, json.dumps({"name": spec.name, "mlflow_parent_run_id": parent.run_id,
                                              "search_keys": sorted(spec.search)}))
    return parent


def _is_complete(trial_dir: Path) -> bool:
    from dsparse.runs import RunLayout

    return (RunLayout(trial_dir).read_summary() or {}).get("status") == "complete"


def _close_interrupted_runs(trials_dir: Path, uri: str) -> None:
    """Mark the MLflow runs of trials that never finished (stopped early by the scheduler,
    or failed) as KILLED; their processes were ended from outside and could not."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for path in sorted(trials_dir.glob(f"*/{RUN_ID_FILE}")):
        run_id = path.read_text().strip()
        if not _is_complete(path.parent) and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")


def _last_exception(text: str) -> str:
    """The final ``SomeError: message`` of a remote traceback (Tune's error text is all of it)."""
    matches = list(re.finditer(r"^[\w.]*(?:Error|Exception): ", text, flags=re.MULTILINE))
    return text[matches[-1].start():].strip()[-3000:] if matches else text[-3000:]


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, address: str | None = None, resume: bool = False,
              storage: str | None = None) -> list[dict]:
    """Run every grid point as a trial; returns the results rows (also written as CSV/PNG).

    Args:
        spec: a validated sweep spec.
        out_dir: the sweep directory (trial run directories, results). On a cluster it
            must be on storage every node mounts.
        address: a Ray cluster address; None starts a local Ray instance.
        resume: keep finished trials and continue the others from their checkpoints
            (sampled ``search`` trials get new samples).
        storage: where Ray keeps trial state and registered checkpoints (a shared path or
            a bucket URI such as ``s3://bucket/dsparse``); default ``out_dir/ray``.

    Raises:
        ValueError: a trial that can never be placed on the cluster, or an existing sweep
            directory without ``resume``.
        SweepFailedError: when trials failed (the first error is in the message).
    """
    from ray import tune

    out_dir = Path(out_dir).resolve()
    trials_dir = out_dir / "trials"
    if not resume and trials_dir.is_dir() and any(trials_dir.iterdir()):
        raise ValueError(f"{out_dir} already holds a sweep; pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    _init_ray(address)
    import ray

    spec.resources.check_fits([node["Resources"] for node in ray.nodes() if node["Alive"]])
    base = spec.base_config()
    tracking = config_from_dict(base).tracking
    uri = resolve_tracking_uri(tracking)
    parent = _parent_run(spec, tracking, out_dir, resume)
    trials = []
    for point in spec.grid_points():
        name = trial_name(point)
        if resume and not spec.search and spec.num_samples == 1 and _is_complete(trials_dir / name):
            log.info("trial %s finished before; not rerun", name)
            continue
        raw = _absolute(apply_overrides(base, spec.trial_overrides(point)), Path.cwd())
        overrides = [f"output_dir={trials_dir / name}", f"tracking.uri={uri}", f"tracking.run_name={name}",
                     f"tracking.parent_run_id={parent.run_id}"]
        trials.append({"trial_name": name, "point": point, "raw": raw, "overrides": overrides})
    if not trials:
        rows = results_table(out_dir)
        parent.finish("FINISHED")
        return rows
    storage = storage or str(out_dir / "ray")
    common = {"resources": vars(spec.resources), "storage": storage, "max_failures": spec.max_failures,
              "trials_dir": str(trials_dir), "repeated": spec.num_samples > 1}
    ranked = spec.metric != "delta_t"  # Delta_T needs the dense trial: computed after the sweep
    # Checkpoint reports before the first validation carry no metric; spec.py checked the name.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    by_name = {trial["trial_name"]: trial for trial in trials}
    trainable = tune.with_parameters(_trial_entry, trials=by_name, common=common)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": DRIVER_CPUS}),
        # Tune's live table shows these keys: the trial name and any sampled values
        param_space={"trial": tune.grid_search(list(by_name)) if len(by_name) > 1 else next(iter(by_name)),
                     "sampled": _search_space(spec.search)},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, num_samples=spec.num_samples,
                                    metric=spec.metric if ranked else None, mode=spec.mode if ranked else None,
                                    scheduler=_scheduler(spec, config_from_dict(trials[0]["raw"]).train.iterations),
                                    search_alg=_search_alg(spec),
                                    trial_name_creator=_tune_trial_name, trial_dirname_creator=_tune_trial_name),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage),
    )
    results = tuner.fit()
    errors = [str(error) for error in results.errors]
    if parent.enabled:
        _close_interrupted_runs(trials_dir, uri)
    rows = results_table(out_dir)
    if parent.enabled:
        parent.log_artifact(out_dir / "results.csv")
        if (out_dir / "results.png").is_file():
            parent.log_artifact(out_dir / "results.png")
        parent.finish("FAILED" if errors else "FINISHED")
    if errors:
        raise SweepFailedError(f"{len(errors)} trial(s) failed; the first error: {_last_exception(errors[0])}\n"
                               f"Finished trials are in {out_dir / 'results.csv'}; after fixing the cause, rerun "
                               "the same command with --resume to run only the unfinished trials")
    return rows
