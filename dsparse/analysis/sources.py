"""Where mask analyses come from: a mask file, or a run's checkpoints.

A static run keeps the same masks in every checkpoint, so its newest intact checkpoint is
analysed. A dynamic run (DiSparse dynamic) stores, with each checkpoint's masks, every
task's nominations at the latest update before it; analysing each checkpoint in step order
gives the tasks' agreement over training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dsparse.analysis.masks import MaskAnalysis, analyze_masks
from dsparse.sparsity.masks import MaskSet
from dsparse.runs.checkpoints import (STATE_FILE, checkpoint_problem, checkpoint_step, published_checkpoints,
                                      resolve_checkpoint)
from dsparse.runs.layout import RunLayout
from dsparse.runs.restore import masks_of


@dataclass
class AnalysisSource:
    """Analyses of one mask file or run, oldest first (one unless a dynamic run).

    Attributes:
        path: what was analysed.
        steps: training step of each analysis (None for a mask file).
        analyses: the analyses, in step order; the last one is the final state.
        run_dir: the run directory, when a run was given.
        mlflow_run_id: the run's MLflow run, when it was tracked.
        dynamic: whether the masks changed during training (per-task masks are then the
            tasks' nominations at the latest update).
    """

    path: Path
    steps: list[int | None]
    analyses: list[MaskAnalysis]
    run_dir: Path | None = None
    mlflow_run_id: str | None = None
    dynamic: bool = False
    mlflow_tracking_uri: str | None = None

    @property
    def final(self) -> MaskAnalysis:
        return self.analyses[-1]


def load_analysis_source(path: str | Path) -> AnalysisSource:
    """Analyse a mask file (``dsparse prune --out``), a run directory or a checkpoint.

    Raises:
        ValueError: in one line, for a missing path, a dense run, masks without per-task
            masks, or a dynamic run with no mask update yet.
    """
    path = Path(path)
    if path.is_file():
        return AnalysisSource(path, [None], [analyze_masks(MaskSet.load(path))])
    if not path.exists():
        raise ValueError(f"{path} does not exist; pass a mask file (dsparse prune --out) or a run directory")
    latest = resolve_checkpoint(path)
    run = RunLayout.of_checkpoint(latest)
    masks = masks_of(latest)
    if masks is None:
        raise ValueError(f"{path} is a dense run: it has no masks to analyse")
    dynamic = "num_updates" in masks.meta
    candidates = [p for p in published_checkpoints(latest.parent)
                  if p.name <= latest.name and checkpoint_problem(p) is None] if dynamic else [latest]
    steps, analyses = [], []
    for checkpoint in candidates:
        masks = masks_of(checkpoint)
        if dynamic and not masks.task_masks:
            continue  # before the first update: random ERK masks, no task has chosen yet
        analyses.append(analyze_masks(masks))
        steps.append(checkpoint_step(checkpoint))
    if not analyses:
        method = masks.meta.get("method")
        if method != "disparse_dynamic":
            raise ValueError(f"run {path} ({method}) grows weights by one joint score or at random, so it has no "
                             "per-task masks to compare; analyse a disparse or disparse_dynamic run")
        raise ValueError(f"run {path} has no checkpoint after a mask update yet (dynamic runs record the tasks' "
                         "choices at each update); analyse a later checkpoint")
    state = json.loads((latest / STATE_FILE).read_text())
    source = AnalysisSource(path, steps, analyses, run.path if run else None, state.get("mlflow_run_id"), dynamic)
    summary = run.read_summary() if run else None
    if summary is not None:  # the store the run logged to, wherever we run from
        source.mlflow_tracking_uri = summary.get("mlflow_tracking_uri")
    return source
