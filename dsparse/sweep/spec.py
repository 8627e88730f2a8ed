"""Sweep specs: a base run config plus a search space over any config key.

A spec is YAML (``sweeps/*.yaml``)::

    base: synthetic_tiny                 # preset name or config path
    overrides: {train.iterations: 600}   # applied to every trial
    grid:                                # every combination is a trial
      sparsity.method: [disparse, snip, random]
      sparsity.target: [0.5, 0.7, 0.9]
      # a mapping value sets several keys together (variants that are no product):
      # sparsity: [{method: disparse, score_init: xavier}, {method: random}]
    search:                              # sampled per trial (num_samples times per grid point)
      optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
    search_alg: random                   # or optuna (TPE; one grid point, a validation metric)
    num_samples: 1
    resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}
    max_concurrent: 1
    metric: delta_t                      # or any logged metric, e.g. val/seg/miou
    mode: max
    max_failures: 2
    scheduler: null                      # or {asha: {grace_period: 200, reduction_factor: 3}}
    max_trials: 10000                    # a larger grid is refused on load, naming its count

Every grid point is validated as a full run config when the spec is loaded, so a typo in a
key fails before any cluster time is spent. The ranking ``metric`` is ``delta_t`` (computed
after the sweep, against the dense trial) or a validation metric ``val/<task>/<name>``; the
ASHA scheduler stops trials early on a validation metric, measured in training steps
(``grace_period`` and ``max_t`` are steps; ``max_t`` defaults to ``train.iterations``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsparse.config import config_from_dict, resolve_config_path

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint")
SEARCH_ALGS = ("random", "optuna")
ASHA_OPTIONS = ("grace_period", "max_t", "reduction_factor")
DRIVER_CPUS = 0.01
"""CPU reserved by each trial's driver, which only waits on its workers."""


@dataclass
class Resources:
    """Per trial: ``workers`` training processes, each with these CPUs and GPUs."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"resources.workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("resources.cpus_per_worker must be > 0 and resources.gpus_per_worker >= 0, got "
                             f"{self.cpus_per_worker} and {self.gpus_per_worker}")

    def check_fits(self, nodes: list[dict[str, float]]) -> None:
        """Raise if one trial can never be placed on a cluster of ``nodes`` (their resources).

        A worker must fit on one node, and all workers plus the trial driver on the cluster.
        """
        per_worker = {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}
        for kind, amount in per_worker.items():
            largest = max((node.get(kind, 0.0) for node in nodes), default=0.0)
            if amount > largest:
                raise ValueError(f"one worker needs {amount:g} {kind} but the largest node has {largest:g}; "
                                 f"lower resources.{kind.lower()}s_per_worker or add bigger nodes")
        need = {"CPU": self.workers * self.cpus_per_worker + DRIVER_CPUS, "GPU": self.workers * self.gpus_per_worker}
        for kind, amount in need.items():
            total = sum(node.get(kind, 0.0) for node in nodes)
            if amount > total:
                raise ValueError(
                    f"one trial needs {amount:g} {kind} ({self.workers} workers x {per_worker[kind]:g}"
                    f"{' + the trial driver' if kind == 'CPU' else ''}) but the cluster has {total:g}; "
                    "lower resources.workers or the per-worker amount, or add nodes")


@dataclass
class SweepSpec:
    base: str
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    search: dict[str, dict] = field(default_factory=dict)
    search_alg: str = "random"
    num_samples: int = 1
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 1
    metric: str = "delta_t"
    mode: str = "max"
    max_failures: int = 1
    scheduler: dict | None = None
    name: str = "sweep"
    max_trials: int = 10_000
    """A larger grid is refused when the spec loads (a typo such as ``seed: [0..999]`` x
    another long list would otherwise expand for minutes); raise it for a real giant sweep."""

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {self.mode!r}")
        if self.num_samples < 1 or self.max_concurrent < 1 or self.max_failures < 0:
            raise ValueError("num_samples and max_concurrent must be >= 1 and max_failures >= 0")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{key} must be a non-empty list of values, got {values!r}")
        trials = math.prod(len(values) for values in self.grid.values()) * self.num_samples
        if trials > self.max_trials:
            sizes = " x ".join(f"{key} ({len(values)})" for key, values in self.grid.items())
            raise ValueError(f"the grid makes {trials:,} trials ({sizes}"
                             f"{f' x num_samples ({self.num_samples})' if self.num_samples > 1 else ''}), above "
                             f"max_trials ({self.max_trials:,}); shorten the lists, or raise max_trials in the spec")
        for key, distribution in self.search.items():
            if not isinstance(distribution, dict) or len(distribution) != 1 or \
                    next(iter(distribution)) not in DISTRIBUTIONS:
                raise ValueError(f"search.{key} must be one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}, "
                                 f"got {distribution!r}")
        if self.scheduler is not None:
            self._check_scheduler()
        self._check_search_alg()

    def _check_search_alg(self) -> None:
        if self.search_alg not in SEARCH_ALGS:
            raise ValueError(f"search_alg must be one of {list(SEARCH_ALGS)}, got {self.search_alg!r}")
        if self.search_alg == "optuna":
            if not self.search:
                raise ValueError("search_alg: optuna needs a 'search' space to sample")
            if self.metric == "delta_t":
                raise ValueError("search_alg: optuna learns from a metric reported during training; delta_t exists "
                                 "only after the sweep. Set metric to a validation metric, e.g. val/seg/miou")
            if any(len(values) > 1 for values in self.grid.values()):
                raise ValueError("search_alg: optuna searches one grid point (Ray's Optuna searcher cannot combine "
                                 "with a grid); give every grid key one value, or write one spec per point")

    def _check_scheduler(self) -> None:
        if not isinstance(self.scheduler, dict) or set(self.scheduler) != {"asha"} or \
                not isinstance(self.scheduler["asha"] or {}, dict):
            raise ValueError(f"scheduler must be null or {{asha: {{{', '.join(ASHA_OPTIONS)}}}}}, "
                             f"got {self.scheduler!r}")
        options = self.scheduler["asha"] = self.scheduler["asha"] or {}
        unknown = sorted(set(options) - set(ASHA_OPTIONS))
        if unknown:
            raise ValueError(f"unknown scheduler.asha option(s) {unknown}; known: {list(ASHA_OPTIONS)}")
        if self.metric == "delta_t":
            raise ValueError("the ASHA scheduler stops trials on a metric reported during training; delta_t "
                             "exists only after the sweep. Set metric to a validation metric, e.g. val/seg/miou")

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid, as ``{dotted key: value}`` (one empty point without a grid).

        A dense point (``sparsity.method`` null) ignores the other ``sparsity.*`` keys, so
        ``method: [null, disparse]`` x ``target: [0.5, 0.9]`` gives one dense trial, not two.
        """
        base_method = self._base_method(self.base_config())
        points, seen = [], set()
        for point in self._combinations():
            if point.get("sparsity.method", base_method) is None:
                point = {k: v for k, v in point.items() if not k.startswith("sparsity.") or k == "sparsity.method"}
            key = json.dumps(point, sort_keys=True, default=str)  # values may be lists: not hashable themselves
            if key not in seen:
                seen.add(key)
                points.append(point)
        return points

    def _base_method(self, base: dict) -> str | None:
        """The method of a trial whose grid point sets none: the overrides', else the base config's."""
        return self.overrides.get("sparsity.method", (base.get("sparsity") or {}).get("method"))

    def _combinations(self) -> list[dict[str, Any]]:
        """The grid's product; a mapping value sets each of its keys under the grid key, so
        ``sparsity: [{method: disparse, score_init: xavier}, {method: random}]`` lists
        variants that are not a product of independent keys."""
        keys = list(self.grid)
        points = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            point = {}
            for key, value in zip(keys, values):
                entries = {f"{key}.{sub}": v for sub, v in value.items()} if isinstance(value, dict) else {key: value}
                twice = sorted(set(entries) & set(point))
                if twice:
                    raise ValueError(f"grid sets {twice} twice (in {key!r} and another grid key); set each key once")
                point.update(entries)
            points.append(point)
        return points

    def trial_overrides(self, point: dict[str, Any]) -> list[str]:
        """``--set``-style overrides of one trial: the spec's overrides, then the grid point."""
        return [format_override(key, value) for key, value in {**self.overrides, **point}.items()]

    def base_config(self) -> dict:
        return yaml.safe_load(resolve_config_path(self.base).read_text()) or {}

    def validate_trials(self) -> None:
        """Build the run config of every grid point (with a sample of the search space)."""
        sample = {key: _representative(distribution) for key, distribution in self.search.items()}
        base = self.base_config()
        method = self._base_method(base)
        combinations = self._combinations()
        sparse = any(point.get("sparsity.method", method) is not None for point in combinations)
        for point in combinations:
            values = {**point, **sample}
            if sparse and values.get("sparsity.method", method) is None:
                # a dense trial drops the grid's sparsity keys (grid_points); the sparse trials check them
                values = {k: v for k, v in values.items() if not k.startswith("sparsity.") or k == "sparsity.method"}
            try:
                config = config_from_dict(base, self.trial_overrides(values))
            except ValueError as error:
                raise ValueError(f"sweep {self.name!r}: trial {point or '(base)'} is not a valid run config: "
                                 f"{error}") from error
            _check_metric(self.metric, config.tasks, point)


def format_override(key: str, value: Any) -> str:
    """``key=value`` with the value as YAML, as ``--set`` reads it back."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _check_metric(metric: str, tasks: list[str], point: dict) -> None:
    """``delta_t`` or ``val/<task>/<name>`` naming a task of the trial and one of its metrics."""
    from dsparse.tasks import TASKS

    if metric == "delta_t":
        return
    parts = metric.split("/")
    if len(parts) != 3 or parts[0] != "val":
        raise ValueError(f"metric must be delta_t or val/<task>/<metric> (e.g. val/seg/miou), got {metric!r}")
    _, task, name = parts
    if task not in tasks:
        raise ValueError(f"metric {metric!r} names task {task!r}, which trial {point or '(base)'} does not train "
                         f"(its tasks: {tasks})")
    names = sorted(TASKS[task].metric_lower_is_better)
    if name not in names:
        raise ValueError(f"metric {metric!r}: task {task!r} reports {names}")


def _representative(distribution: dict) -> Any:
    _, arguments = next(iter(distribution.items()))
    return arguments[0]


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec (every trial's config is checked too).

    Raises:
        ValueError: missing file, unknown keys, bad values, or a trial that is not a valid run config.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep spec {path} does not exist; examples live in sweeps/")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown sweep spec key(s) {unknown} in {path}; known keys: {sorted(known)}")
    if "base" not in raw:
        raise ValueError(f"sweep spec {path} needs 'base': a preset name or run config path")
    resources = raw.pop("resources", {}) or {}
    unknown = sorted(set(resources) - {f.name for f in dataclasses.fields(Resources)})
    if unknown:
        raise ValueError(f"unknown resources key(s) {unknown}; known: workers, cpus_per_worker, gpus_per_worker")
    if "grid" in raw and not raw["grid"] and not raw.get("search"):
        raise ValueError(f"grid: {{}} lists no keys in {path}, so the sweep would run the base config once; list "
                         "values per key (e.g. seed: [0, 1]), or remove 'grid' to run that one trial on purpose")
    raw.setdefault("name", path.stem)
    spec = SweepSpec(resources=Resources(**resources), **raw)
    spec.validate_trials()
    return spec
