"""The paper-style comparison: one row per method (and setting), a column per task metric,
sparsity and Delta_T; seeds aggregated; the best value per column marked; differences
within seed noise flagged.

Rules, all stated in the rendered table's notes:
- Runs whose configs differ only in ``IGNORED_KEYS`` (the seed, where output goes, logging
  and checkpoint cadence, threads, loader workers, eval batch size) form one row: each
  value is the mean over them, with the sample standard deviation and the seed count.
- Delta_T of a run is against the dense run of the same configuration (its config with
  the ``sparsity`` section removed) and the same seed; when that seed has no dense run,
  against the mean metrics of the configuration's dense runs (noted in the row). Given
  explicit ``baselines`` (e.g. to compare architectures against one reference), every row
  is compared with the baseline run of its seed instead.
- Best: among the sparse rows of one block (the same non-method settings and requested
  sparsity), per column, in the metric's better direction.
- Seed noise: a sparse row of the block is flagged when a two-sided Welch t-test of its
  per-seed values against the best row's gives p >= 0.05 (needs 2+ seeds in both rows;
  rows with fewer seeds cannot be tested and are not flagged).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from dsparse.config import flatten
from dsparse.report.runs import RunRecord

IGNORED_KEYS = ("seed", "output_dir", "tracking.", "train.log_interval", "train.checkpoint_interval",
                "train.keep_checkpoints", "train.threads", "data.num_workers", "data.eval_batch_size", "data.path",
                "data.shard_url", "sparsity.masks", "sparsity.from_checkpoint")
"""Keys that do not make runs different configurations: where things are (datasets are
compared by identity, ``check_comparable``; mask files and trained weights differ per seed),
logging, cadence and resources."""
P_THRESHOLD = 0.05
KIND_ORDER = {"constant": 0, "dense": 1, "sparse": 2}


@dataclass
class Column:
    key: str
    """``task/metric``, ``sparsity``, ``sparsity/trained`` (AdapMTL before its projection),
    ``sparsity/<component>`` (trunk, each head) or ``delta_t``."""
    title: str
    higher_is_better: bool | None
    """None: no better direction (sparsity)."""


@dataclass
class Cell:
    values: list[float]
    best: bool = False
    within_noise: bool = False

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Row:
    label: str
    kind: str
    """constant | dense | sparse"""
    settings: dict
    """Values of the non-method settings that vary between rows (e.g. train.iterations)."""
    target: float | None
    init: str
    """scratch | pretrained"""
    runs: list[RunRecord] = field(default_factory=list)
    cells: dict[str, Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(run.seed for run in self.runs)


@dataclass
class Report:
    tasks: list[str]
    columns: list[Column]
    rows: list[Row]
    setting_keys: list[str]
    notes: list[str]
    baselines: list[str] = field(default_factory=list)
    """Names of explicit baseline runs (``--baseline``), if any."""


def setting_of(config_dict: dict, ignore=()) -> dict:
    """The flattened config minus the keys that do not change results (``IGNORED_KEYS`` and
    ``ignore``); a dense run's ``sparsity.*`` keys have no effect and are left out too."""
    flat = flatten(config_dict)
    dense = flat.get("sparsity.method") is None and flat.get("sparsity.masks") is None
    skipped = (*IGNORED_KEYS, *ignore, *(("sparsity.",) if dense else ()))
    return {k: v for k, v in flat.items()
            if not any(k == key or (key.endswith(".") and k.startswith(key)) for key in skipped)}


def _frozen(setting: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in setting.items()))


def _without_sparsity(setting: dict) -> dict:
    return {k: v for k, v in setting.items() if not k.startswith("sparsity.")}


def baseline_key(config_dict: dict, ignore=()) -> tuple:
    """Equal for a run and the dense run of its configuration (any seed); ``ignore`` adds
    keys to leave out (a sweep's sampled keys: its dense trials sample other values)."""
    return _frozen(_without_sparsity(setting_of(config_dict, ignore)))


def pick_baseline(config_dict: dict, seed: int, dense: list[tuple[dict, int, dict]], ignore=()):
    """The metrics ``Delta_T`` of a run is taken against, from ``dense`` runs given as
    ``(config dict, seed, final metrics)``: the dense run of the same configuration and seed,
    else the mean of that configuration's dense runs. Returns ``(metrics, same_seed)``, or
    None when the configuration has no dense run."""
    key = baseline_key(config_dict, ignore)
    matching = [(s, metrics) for config, s, metrics in dense if baseline_key(config, ignore) == key]
    if not matching:
        return None
    same_seed = [metrics for s, metrics in matching if s == seed]
    return (same_seed[0], True) if same_seed else (_mean_metrics([m for _, m in matching]), False)


def check_comparable(records: list[RunRecord]) -> None:
    """Refuse runs on other tasks or other data than the first, or the same run twice.

    Raises:
        ValueError: naming the runs that differ and how.
    """
    first = records[0]
    for record in records[1:]:
        if sorted(record.config.tasks) != sorted(first.config.tasks):
            raise ValueError(f"runs {first.name} and {record.name} train different tasks ({first.config.tasks} vs "
                             f"{record.config.tasks}); report runs of one task set at a time")
        if record.dataset != first.dataset:
            raise ValueError(f"runs {first.name} and {record.name} used different datasets ({first.dataset} vs "
                             f"{record.dataset}); report runs on one dataset at a time")
    seen = {}
    for record in records:
        key = (_frozen(setting_of(record.config.to_dict())), record.seed)
        if key in seen:
            raise ValueError(f"runs {seen[key]} and {record.name} have the same config and seed; pass one of them")
        seen[key] = record.name


DELTA_T_KINDS = {"standard": "mean", "per-task-sum": "sum"}
"""``dsparse report --delta-t``: how a task's metric changes combine (docs/design.md, "Metrics and Delta_T")."""


def build_table(records: list[RunRecord], constant: dict | None = None,
                baselines: list[RunRecord] | None = None, ignore=(), delta_t: str = "standard") -> Report:
    """Group ``records`` into rows, compute every cell, mark the best and the ties.

    Args:
        records: finished runs on the same tasks and data.
        constant: metrics of the best constant predictor (a reference row), or None.
        baselines: dense runs every row's Delta_T is taken against (by seed), instead of
            the dense run of each row's own configuration; they are rows too.
        ignore: config keys left out when finding a row's dense configuration (a sweep's
            sampled keys).
        delta_t: ``standard`` (mean of a task's metric changes) or ``per-task-sum``
            (AdapMTL's sum; ``dsparse.tasks.summary``).

    Raises:
        ValueError: mismatched runs (``check_comparable``), or a sparse configuration
            without a dense run of the same configuration.
    """
    from dsparse.tasks import TASKS

    if not records:
        raise ValueError("no runs to report")
    if baselines:
        sparse = [b.name for b in baselines if not b.is_dense]
        if sparse:
            raise ValueError(f"baseline runs must be dense; {sparse} are sparse")
        known = {(b.name, b.seed) for b in baselines}
        records = list(baselines) + [r for r in records if (r.name, r.seed) not in known]
    if delta_t not in DELTA_T_KINDS:
        raise ValueError(f"delta_t must be one of {', '.join(DELTA_T_KINDS)}, got {delta_t!r}")
    check_comparable(records)
    tasks = list(records[0].config.tasks)
    task_classes = {t: TASKS[t] for t in tasks}
    columns = [Column(f"{t}/{m}", f"{t} {m}", not lower) for t in tasks
               for m, lower in task_classes[t].metric_lower_is_better.items()]
    num_metrics = len(columns)
    columns += [Column("sparsity", "sparsity", None)]
    if any(r.trained_sparsity is not None for r in records):
        columns.append(Column("sparsity/trained", "sparsity trained", None))
    parts = list(dict.fromkeys(c for r in records for c in (r.component_sparsity or {})))
    columns += [Column(f"sparsity/{c}", f"{c} sparsity", None) for c in parts]
    if any(r.empty_layers for r in records):
        columns.append(Column("empty_layers", "empty layers", None))
    columns += [Column("delta_t", "Delta_T %" + (" (per-task sum)" if delta_t == "per-task-sum" else ""), True)]
    within = DELTA_T_KINDS[delta_t]

    groups: dict[tuple, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(_frozen(setting_of(record.config.to_dict())), []).append(record)
    settings = {key: setting_of(members[0].config.to_dict()) for key, members in groups.items()}
    setting_keys = _varying([_without_sparsity(s) for s in settings.values()])
    rows = [_row(members, settings[key], setting_keys, settings) for key, members in groups.items()]
    dense_runs = list(baselines) if baselines else [r for r in records if r.is_dense]
    for row in rows:
        _fill(row, columns, num_metrics, task_classes, dense_runs, ignore, any_config=bool(baselines), within=within)
    notes = []
    if constant is not None:
        reference = [r for r in dense_runs if baseline_key(r.config.to_dict()) ==
                     baseline_key(dense_runs[0].config.to_dict())] if dense_runs else None
        row = Row("constant predictor", "constant", {k: "" for k in setting_keys}, None, "-")
        row.cells = {c.key: Cell([constant[c.key.split("/")[0]][c.key.split("/")[1]]]) for c in columns[:num_metrics]}
        row.cells.update({c.key: Cell([]) for c in columns[num_metrics:-1]})
        row.cells["delta_t"] = Cell([_delta(constant, _mean_metrics(reference), task_classes, within)]
                                    if reference else [])
        rows.append(row)
        notes.append("constant predictor: the best constant output per task, fitted on the training labels; its "
                     "Delta_T is against the mean of the first dense configuration's runs")
    if parts:
        notes.append("<component> sparsity: of the weights of the trunk (shared by every task), of a task's own head, "
                     "or of a branch (its tasks joined by -); sparsity: of all prunable weights")
    if any(c.key == "empty_layers" for c in columns):
        notes.append("empty layers: masked layers that kept no weight (summary.json sparsity.empty_layers); what "
                     "follows such a layer on a task's only path is a constant")
    if any(c.key == "sparsity/trained" for c in columns):
        notes.append("sparsity trained: what AdapMTL's learned thresholds reached before its projection to exactly "
                     "the requested sparsity (the sparsity column)")
    if baselines:
        notes.append("Delta_T of every row against the baseline runs " + ", ".join(b.name for b in baselines)
                     + " (by seed)")
    rows.sort(key=lambda r: (tuple(str(r.settings.get(k, "")) for k in setting_keys), KIND_ORDER[r.kind],
                             r.target or 0.0, r.label))
    _mark_best(rows, columns)
    return Report(tasks, columns, rows, setting_keys, notes, [b.name for b in baselines or ()])


def _varying(settings: list[dict]) -> list[str]:
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]


def _row(members: list[RunRecord], setting: dict, setting_keys: list[str], all_settings: dict) -> Row:
    config = members[0].config
    sparsity = config.sparsity
    if not sparsity.enabled:
        label, kind, target = "dense", "dense", None
    else:
        label, kind, target = sparsity.method or f"masks {sparsity.masks}", "sparse", sparsity.target
        same_method = [s for s in all_settings.values() if s.get("sparsity.method") == sparsity.method]
        differing = [k for k in _varying(same_method)
                     if k.startswith("sparsity.") and k not in ("sparsity.target", "sparsity.method")]
        if sparsity.granularity != "block":  # the block size means nothing to element or channel masks
            differing = [k for k in differing if k != "sparsity.block"]
        if differing:
            label += " (" + ", ".join(f"{k.removeprefix('sparsity.')}={setting.get(k)}" for k in differing) + ")"
    init = "pretrained" if sparsity.from_checkpoint else "scratch"
    return Row(label, kind, {k: setting.get(k) for k in setting_keys}, target, init, list(members))


def _mean_metrics(runs: list) -> dict:
    """Mean metrics of runs (``RunRecord``s or their ``metrics`` dicts)."""
    metrics = [r.metrics if isinstance(r, RunRecord) else r for r in runs]
    return {t: {m: statistics.fmean(one[t][m] for one in metrics) for m in values} for t, values in metrics[0].items()}


def _delta(metrics: dict, baseline: dict, task_classes: dict, within: str) -> float:
    from dsparse.tasks import delta_t

    return delta_t(metrics, baseline, task_classes, within_task=within)


def _fill(row: Row, columns: list[Column], num_metrics: int, task_classes: dict, dense_runs: list[RunRecord], ignore,
          any_config: bool, within: str) -> None:
    for column in columns[:num_metrics]:
        task, metric = column.key.split("/")
        row.cells[column.key] = Cell([run.metrics[task][metric] for run in row.runs])
    row.cells["sparsity"] = Cell([run.achieved_sparsity for run in row.runs])
    for column in columns[num_metrics + 1:-1]:  # as trained, per component, empty layers: where the runs have them
        part = column.key.removeprefix("sparsity/")
        if column.key == "empty_layers":
            values = [run.empty_layers for run in row.runs]
        else:
            values = [run.trained_sparsity if part == "trained" else (run.component_sparsity or {}).get(part)
                      for run in row.runs]
        row.cells[column.key] = Cell([v for v in values if v is not None] if all(v is not None for v in values)
                                     else [])
    deltas, fallback = [], False
    for run in row.runs:
        config = run.config.to_dict()
        candidates = [(config if any_config else d.config.to_dict(), d.seed, d.metrics) for d in dense_runs]
        picked = pick_baseline(config, run.seed, candidates, ignore)
        if picked is None:
            raise ValueError(f"no dense run with the configuration of {run.name} (its config without the sparsity "
                             "section); add the dense run of that configuration, or compare with --baseline RUN")
        deltas.append(_delta(run.metrics, picked[0], task_classes, within))
        fallback |= not picked[1]
    row.cells["delta_t"] = Cell(deltas)
    if fallback:
        row.notes.append("Delta_T partly against the mean of the dense runs (no dense run of that seed)")


def _mark_best(rows: list[Row], columns: list[Column]) -> None:
    blocks: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.kind == "sparse":
            blocks.setdefault((tuple(sorted(map(repr, row.settings.items()))), row.target), []).append(row)
    for members in blocks.values():
        for column in columns:
            if column.higher_is_better is None or len(members) < 2:
                continue
            sign = 1.0 if column.higher_is_better else -1.0
            best = max(members, key=lambda r: sign * r.cells[column.key].mean)
            best.cells[column.key].best = True
            for other in members:
                if other is not best:
                    other.cells[column.key].within_noise = within_noise(best.cells[column.key].values,
                                                                        other.cells[column.key].values)


def within_noise(a: list[float], b: list[float]) -> bool:
    """Two-sided Welch t-test: True when p >= P_THRESHOLD (no evidence the means differ).
    False when either side has fewer than 2 values (untestable)."""
    if len(a) < 2 or len(b) < 2:
        return False
    from scipy import stats

    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return statistics.fmean(a) == statistics.fmean(b)
    return bool(stats.ttest_ind(a, b, equal_var=False).pvalue >= P_THRESHOLD)
