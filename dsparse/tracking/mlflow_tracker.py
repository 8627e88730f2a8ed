"""MLflow tracking of one run, from rank 0 only.

Embedded default: a SQLite store ``mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts``
under the working directory, so no server is needed and ``mlflow ui`` shows the runs
(see :func:`ui_command`). A tracking URI in the config or ``$MLFLOW_TRACKING_URI`` points
at a server instead (the cluster setting). Uses ``MlflowClient`` rather than the fluent
API so several runs (tests, Ray trials) in one process never share an "active run".
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dsparse.config import RunConfig, TrackingConfig
from dsparse.distributed import broadcast_object, is_main, on_rank_0

if TYPE_CHECKING:
    from dsparse.train.rundir import OpenRun

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlruns"
_PARAM_BATCH = 100
_MAX_PARAM_LENGTH = 6000


def default_tracking_uri(root: str | Path = ".") -> str:
    store = Path(root).resolve() / DEFAULT_STORE
    return f"sqlite:///{store / 'mlflow.db'}"


def resolve_tracking_uri(config: TrackingConfig) -> str:
    return config.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on a store."""
    if uri.startswith("sqlite:///"):
        store = Path(uri[len("sqlite:///"):]).parent
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {store / 'artifacts'}"
    return f"open {uri} in a browser (tracking server)"


def check_run_owner(tracking: TrackingConfig, run_uid: str) -> None:
    """Refuse to start a run in an MLflow run another run directory owns (e.g. a config
    copied from a sweep trial still naming the trial's ``tracking.run_id``)."""
    if not tracking.enabled:
        return
    from mlflow.tracking import MlflowClient

    owner = MlflowClient(resolve_tracking_uri(tracking)).get_run(tracking.run_id).data.tags.get("dsparse.run_uid")
    if owner is not None and owner != run_uid:
        raise ValueError(f"tracking.run_id {tracking.run_id} is the MLflow run of another run directory; a new run "
                         "must not log into it: remove tracking.run_id (and parent_run_id) from the config")


class RunTracker:
    """Logs params, metrics and artifacts of one training run; inert when disabled."""

    @classmethod
    def for_run(cls, config: RunConfig, run: OpenRun, resumed_run_id: str | None, step: int) -> RunTracker:
        """The MLflow run a training run logs to (call on every rank; rank 0 logs).

        A resume continues the checkpoint's MLflow run (``resumed_run_id``); a copied run
        directory gets one of its own; a fresh start may log into ``tracking.run_id`` (the
        run a sweep made for its trial) only if no other run directory owns it. The run is
        tagged with the directory's identity, what the resume changed and what it was
        copied from.

        Raises:
            ValueError: ``tracking.run_id`` belongs to another run directory.
        """
        tracking = config.tracking
        if run.resume_from is None and tracking.run_id:  # a fresh start told to log into an existing run
            on_rank_0(lambda: check_run_owner(tracking, run.run_uid))
        if run.copied_from:  # a copied run directory continues in an MLflow run of its own
            resumed_run_id = None
        tracker = cls(tracking, tracking.run_name or run.layout.path.name, run_id=resumed_run_id or tracking.run_id,
                      parent_run_id=tracking.parent_run_id, enabled=is_main())
        tracker.run_id = broadcast_object(tracker.run_id)
        tags = {"dsparse.run_uid": run.run_uid}
        if run.changes:
            tags[f"resume.step_{step}.changes"] = json.dumps(run.changes)
        if run.copied_from:
            tags["copied_from"] = run.copied_from
        tracker.set_tags(tags)
        return tracker

    def __init__(self, config: TrackingConfig, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, enabled: bool = True):
        self.enabled = enabled and config.enabled
        self.run_id = run_id
        self.uri = resolve_tracking_uri(config)
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        if self.run_id is None:
            experiment_id = self._experiment_id(config.experiment)
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        else:  # resumed run: keep logging into the same MLflow run
            self.client.update_run(self.run_id, status="RUNNING")

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):
            artifacts = (Path(self.uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        existing = set(self.client.get_run(self.run_id).data.params)
        items = [p for p in items if p.key not in existing]  # params are immutable on resume
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
