"""Quality check: element masks vs blocks of 16 vs blocks of 32, static and dynamic
DiSparse, same sparsity, steps and seeds.

For every seed: one dense run (the Delta_T baseline of that seed), then DiSparse (static,
at initialization) and DiSparse dynamic at each granularity. Reports per-task metrics
(mean over seeds), Delta_T (mean and standard deviation over seeds) and the measured
training throughput of every variant, as Markdown, CSV and a PNG. Usage::

    python benchmarks/compare_granularity.py --data data/synthetic --sparsity 0.9 --seeds 0,1

Writes ``benchmarks/results/granularity-<sparsity>-<host>-<date>.{md,csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from compare_methods import run_overrides  # noqa: E402
from results_io import RESULTS_DIR, machine_tag, result_path, today  # noqa: E402

from dsparse.config import load_config  # noqa: E402
from dsparse.data.manifest import load_manifest  # noqa: E402
from dsparse.tasks import delta_t  # noqa: E402
from dsparse.runs.components import build_run_tasks  # noqa: E402
from dsparse.train.trainer import train  # noqa: E402

GRANULARITIES = {"element": [], "block16": ["sparsity.granularity=block", "sparsity.block=16"],
                 "block32": ["sparsity.granularity=block", "sparsity.block=32"]}
METHODS = ("disparse", "disparse_dynamic")


def run(name: str, overrides: list[str], args, root: Path, seed: int) -> dict:
    out = root / f"seed{seed}" / name
    if (out / "summary.json").is_file():  # a finished run of an interrupted comparison
        return json.loads((out / "summary.json").read_text())
    base = run_overrides(args.data, out, seed, "dsparse-granularity", f"{name}-s{seed}", args.iterations)
    logging.info("training %s, seed %d", name, seed)
    return train(load_config(args.config, base + overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic_tiny")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--num-batches", type=int, default=50, help="saliency batches of static DiSparse")
    parser.add_argument("--runs", default=None, help="run directory (default runs/granularity/<time>); an existing "
                                                     "one continues where it stopped")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.runs or f"runs/granularity/{time.strftime('%Y%m%d-%H%M%S')}")
    config = load_config(args.config, [f"data.path={args.data}"])
    tasks = build_run_tasks(config, load_manifest(args.data))
    variants = [(method, granularity) for method in METHODS for granularity in GRANULARITIES]
    results: dict[tuple[str, str], list[dict]] = {("dense", "-"): []}
    results.update({variant: [] for variant in variants})
    for seed in seeds:
        dense = run("dense", [], args, root, seed)
        results["dense", "-"].append({"summary": dense, "delta_t": 0.0})
        for method, granularity in variants:
            overrides = [f"sparsity.method={method}", f"sparsity.target={args.sparsity}",
                         f"sparsity.num_batches={args.num_batches}", *GRANULARITIES[granularity]]
            summary = run(f"{method}-{granularity}", overrides, args, root, seed)
            results[method, granularity].append(
                {"summary": summary, "delta_t": delta_t(summary["final_metrics"], dense["final_metrics"], tasks)})
    rows = []
    for (method, granularity), entries in results.items():
        deltas = [e["delta_t"] for e in entries]
        row = {"method": method, "granularity": granularity, "seeds": len(entries),
               "sparsity": statistics.mean((e["summary"].get("sparsity") or {}).get("achieved", 0.0) for e in entries),
               "delta_t_mean": statistics.mean(deltas), "delta_t_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
               "samples_per_s": statistics.mean(e["summary"]["samples_per_s"] for e in entries)}
        for name, task in tasks.items():
            row[f"{name}/{task.key_metric}"] = statistics.mean(e["summary"]["final_metrics"][name][task.key_metric]
                                                               for e in entries)
        rows.append(row)
    keys = [f"{name}/{task.key_metric}" for name, task in tasks.items()]
    title = (f"Granularity at sparsity {args.sparsity}, config {args.config}, seeds {seeds}, "
             f"{results['dense', '-'][0]['summary']['step']} iterations, {machine_tag()}, {today()}")
    header = ["method", "masks", "sparsity", *keys, "Delta_T % (mean ± std)", "samples/s"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], row["granularity"], f"{row['sparsity']:.4f}", *[f"{row[k]:.4f}" for k in keys],
                 f"{row['delta_t_mean']:+.2f} ± {row['delta_t_std']:.2f}", f"{row['samples_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    name = f"granularity-{args.sparsity}"
    result_path(name, ".md", args.out).write_text("\n".join(lines) + "\n")
    with open(result_path(name, ".csv", args.out), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure, axis = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['method']}\n{r['granularity']}" for r in rows[1:]]
    axis.bar(labels, [r["delta_t_mean"] for r in rows[1:]], yerr=[r["delta_t_std"] for r in rows[1:]],
             color=["tab:blue"] * 3 + ["tab:orange"] * 3, capsize=4)
    axis.set_ylabel("Delta_T vs dense (%)")
    axis.set_title(f"Element vs block masks at {args.sparsity:.0%} sparsity ({len(seeds)} seeds)", fontsize=10)
    axis.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    figure.savefig(result_path(name, ".png", args.out), dpi=120)
    print("\n".join(lines))
    print(f"wrote {result_path(name, '.md', args.out)} (+ .csv, .png)")


if __name__ == "__main__":
    main()
