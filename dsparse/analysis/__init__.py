"""Mask analysis: how much tasks agree on the weights they keep, layer by layer, where that
agreement breaks (the watershed), and a branched architecture that stops sharing there.

Library entry point behind ``dsparse analyze``::

    result = analyze("runs/disparse90", branch=True, num_groups=2)
    result.source.final.watershed      # e.g. "trunk.layer4.0.conv1.weight"
    result.paths                       # CSV, PNGs, analysis.json (and branched.yaml)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dsparse.analysis.branching import BranchPlan, branched_config, group_tasks, plan_branches, stage_of
from dsparse.analysis.masks import MaskAnalysis, analyze_masks, find_watershed
from dsparse.analysis.output import log_analysis_to_mlflow, write_analysis
from dsparse.analysis.sources import AnalysisSource, load_analysis_source
from dsparse.io import check_output_dir

__all__ = ["AnalysisResult", "AnalysisSource", "BranchPlan", "MaskAnalysis", "analyze", "analyze_masks",
           "branched_config", "find_watershed", "group_tasks", "load_analysis_source", "plan_branches", "stage_of"]


@dataclass
class AnalysisResult:
    source: AnalysisSource
    out_dir: Path
    paths: list[Path] = field(default_factory=list)
    plan: BranchPlan | None = None
    branched_config: Path | None = None
    mlflow_run_id: str | None = None


def analyze(path: str | Path, out_dir: str | Path | None = None, *, branch: bool = False,
            num_groups: int | None = None, same_params: bool = False, config: str | Path | None = None,
            log_to_mlflow: bool = True, overwrite: bool = False) -> AnalysisResult:
    """Analyse a mask file or run, write the files, and optionally a branched run config.

    Args:
        path: a mask file (``dsparse prune --out``), run directory or checkpoint.
        out_dir: where files go (default: ``RUN/analysis``, or ``<mask file>-analysis``).
        branch: also write ``branched.yaml``: the run's config with the trunk branched at
            the watershed stage, one branch per task group.
        num_groups: task groups (branches) for ``branch``; default one per task.
        same_params: lower the branched model's width to the shared model's size.
        config: the run config the masks were made for (needed with ``branch`` for a mask
            file; a run's own ``config.yaml`` is used otherwise).
        log_to_mlflow: attach the files to the run's MLflow run when it was tracked.
        overwrite: replace the files of an earlier analysis in ``out_dir`` (a non-empty
            ``out_dir`` is refused otherwise, before anything is computed).

    Raises:
        ValueError: in one line, for inputs that cannot be analysed or branched.
    """
    source = load_analysis_source(path)
    run_config = _run_config(source, config) if branch else None
    if out_dir is None:
        out_dir = source.run_dir / "analysis" if source.run_dir else source.path.with_name(source.path.name +
                                                                                         "-analysis")
    out_dir = check_output_dir(out_dir, overwrite)
    result = AnalysisResult(source, out_dir)
    extra = {}
    if branch:
        result.plan = plan_branches(source.final, num_groups)
        channels = _task_channels(run_config) if same_params else None
        branched = branched_config(run_config, result.plan, same_params=same_params, task_channels=channels)
        from dsparse.config import dump_config

        result.branched_config = out_dir / "branched.yaml"
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(branched, result.branched_config)
        extra["branch"] = {"branch_from": result.plan.branch_from, "groups": result.plan.groups,
                           "group_iou": result.plan.group_iou, "base_width": branched.model.base_width,
                           "config": str(result.branched_config)}
    result.paths = write_analysis(source, out_dir, extra)
    if result.branched_config is not None:
        result.paths.append(result.branched_config)
    if log_to_mlflow:
        result.mlflow_run_id = log_analysis_to_mlflow(source, result.paths)
    return result


def _run_config(source: AnalysisSource, config: str | Path | None):
    from dsparse.config import load_config

    if config is not None:
        return load_config(config)
    if source.run_dir is not None:
        from dsparse.runs.layout import RunLayout

        return RunLayout(source.run_dir).read_config()
    raise ValueError(f"--branch on mask file {source.path} needs --config CONFIG, the run config the masks were "
                     "made for (the branched config is that config with a branched model)")


def _task_channels(config) -> dict[str, int]:
    from dsparse.data.manifest import load_manifest
    from dsparse.runs.components import build_run_tasks

    return {name: task.num_channels for name, task in build_run_tasks(config, load_manifest(config.data.path)).items()}
