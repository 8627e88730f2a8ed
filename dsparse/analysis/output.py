"""Mask analyses as files people read: a CSV per layer, PNGs, a JSON summary, and the same
files logged to the run's MLflow run."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

from dsparse.analysis.masks import MaskAnalysis
from dsparse.analysis.sources import AnalysisSource
from dsparse.io import write_text_atomic
from dsparse.plots import pyplot, save_png

log = logging.getLogger("dsparse.analysis")


def write_analysis(source: AnalysisSource, out_dir: str | Path, extra: dict | None = None) -> list[Path]:
    """Write ``mask_iou.csv`` (a row per layer, and per checkpoint of a dynamic run),
    ``mask_iou.png`` (IoU per layer, a line per task pair, the watershed marked),
    ``mask_density.png``, ``mask_iou_over_training.png`` (dynamic runs) and
    ``analysis.json``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = source.final
    rows = [{"step": step, **row} for step, analysis in zip(source.steps, source.analyses) for row in analysis.rows()]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths = [out_dir / "mask_iou.csv"]
    write_text_atomic(paths[0], buffer.getvalue())
    paths.append(plot_layer_iou(final, out_dir / "mask_iou.png", title=_title(source)))
    paths.append(plot_density(final, out_dir / "mask_density.png", title=_title(source)))
    if source.dynamic:
        paths.append(plot_iou_over_training(source, out_dir / "mask_iou_over_training.png"))
    summary = summarize(source)
    summary.update(extra or {})
    paths.append(out_dir / "analysis.json")
    write_text_atomic(paths[-1], json.dumps(summary, indent=2) + "\n")
    return paths


def summarize(source: AnalysisSource) -> dict:
    """The analysis in numbers: watershed, pair IoU before and after it, per-layer values."""
    final = source.final
    shared = final.shared_layers
    cut = shared.index(final.watershed) if final.watershed else len(shared)
    return {
        "source": str(source.path), "step": source.steps[-1], "dynamic": source.dynamic, "tasks": final.tasks,
        "masks": final.meta,
        "watershed": {"layer": final.watershed, "drop": final.watershed_drop,
                      "rule": "least-squares change point of the mean pairwise IoU over the layers at least two "
                              "tasks use, in forward order: the first layer of the later part; drop = mean before "
                              "minus mean from it on"},
        "pair_iou_before_watershed": _pairs(final.pair_iou_matrix(shared[:cut])),
        "pair_iou_from_watershed": _pairs(final.pair_iou_matrix(shared[cut:])),
        "density": final.density,
        "iou_over_training": [{"step": step, **_pairs(a.pair_iou_matrix())}
                              for step, a in zip(source.steps, source.analyses)] if source.dynamic else None,
    }


def _pairs(matrix: dict) -> dict:
    return {f"{a}-{b}": None if math.isnan(value) else value for (a, b), value in matrix.items()}


def _title(source: AnalysisSource) -> str:
    meta = source.final.meta
    what = f"{meta.get('method')}, sparsity {meta.get('sparsity_achieved') or 0:.2f}"
    return what + (f", step {source.steps[-1]}" if source.steps[-1] is not None else "")


def _short(layer: str) -> str:
    return layer.removeprefix("trunk.").removesuffix(".weight")


def plot_layer_iou(analysis: MaskAnalysis, path: Path, title: str = "") -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6.0, 0.28 * len(analysis.layers)), 4))
    index = {layer: i for i, layer in enumerate(analysis.layers)}
    for pair in analysis.pairs:
        points = [(index[layer], values[pair]) for layer, values in analysis.iou.items() if pair in values]
        if points:
            axis.plot(*zip(*points), marker=".", linewidth=1, label=f"{pair[0]} / {pair[1]}")
    if analysis.watershed:
        axis.axvline(index[analysis.watershed], color="black", linestyle="--", linewidth=1,
                     label=f"watershed: {_short(analysis.watershed)}")
    axis.set_xticks(range(len(analysis.layers)), [_short(layer) for layer in analysis.layers], rotation=90,
                    fontsize=6)
    axis.set_ylabel("IoU of per-task keep masks")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return save_png(figure, path)


def plot_density(analysis: MaskAnalysis, path: Path, title: str = "") -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6.0, 0.28 * len(analysis.layers)), 3.5))
    axis.bar(range(len(analysis.layers)), [analysis.density[layer] for layer in analysis.layers])
    axis.set_xticks(range(len(analysis.layers)), [_short(layer) for layer in analysis.layers], rotation=90,
                    fontsize=6)
    axis.set_ylabel("kept fraction (final mask)")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return save_png(figure, path)


def plot_iou_over_training(source: AnalysisSource, path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    matrices = [a.pair_iou_matrix() for a in source.analyses]
    for pair in source.final.pairs:
        values = [matrix.get(pair, math.nan) for matrix in matrices]
        axis.plot(source.steps, values, marker="o", label=f"{pair[0]} / {pair[1]}")
    axis.set_xlabel("training step (checkpoint)")
    axis.set_ylabel("mean IoU of nominations")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return save_png(figure, path)


def log_analysis_to_mlflow(source: AnalysisSource, paths: list[Path]) -> str | None:
    """Attach the files to the run's MLflow run (under ``analysis/``) and tag the watershed;
    returns the run id, or None when the run was not tracked."""
    if source.run_dir is None or source.mlflow_run_id is None:
        return None
    from mlflow.tracking import MlflowClient

    from dsparse.runs.layout import RunLayout
    from dsparse.tracking.mlflow_tracker import resolve_tracking_uri

    run = RunLayout(source.run_dir)
    config = run.read_config()
    if not config.tracking.enabled:
        return None
    original = run.original()
    if original is not None:  # as training does: a copy never writes into the original's run
        log.warning("%s is a copy of the run directory %s: the analysis is not logged to that run's MLflow run %s "
                    "(the files are in %s)", source.run_dir, original, source.mlflow_run_id, paths[0].parent)
        return None
    uri = source.mlflow_tracking_uri or resolve_tracking_uri(config.tracking)
    try:
        client = MlflowClient(tracking_uri=uri)
        owner = client.get_run(source.mlflow_run_id).data.tags.get("dsparse.run_uid")
        if owner is not None and owner != run.run_uid():
            log.warning("MLflow run %s belongs to another run directory: the analysis of %s is not logged to it "
                        "(the files are in %s)", source.mlflow_run_id, source.run_dir, paths[0].parent)
            return None
        for path in paths:
            client.log_artifact(source.mlflow_run_id, str(path), "analysis")
        client.set_tag(source.mlflow_run_id, "analysis.watershed", watershed_tag(source.final.watershed))
    except Exception as error:  # the files are written; a store out of reach must not lose them
        log.warning("analysis not logged to MLflow run %s at %s (%s); the files are in %s", source.mlflow_run_id,
                    uri, (str(error).splitlines() or [""])[0], paths[0].parent)
        return None
    return source.mlflow_run_id


def watershed_tag(watershed: str | None) -> str:
    """The MLflow tag value of a watershed: the layer, or ``none`` where agreement does not
    fall along the shared layers (not Python's ``None`` spelled out)."""
    return watershed if watershed is not None else "none"
