"""Quality check: dense vs DiSparse vs SNIP vs random at one sparsity, same seed and steps.

Trains one run per method from the same config (the ``synthetic_tiny`` preset by
default), then reports every task metric and Delta_T against the dense run as a Markdown
table and a PNG plot. Usage::

    python benchmarks/compare_methods.py --data data/synthetic --sparsity 0.9

Writes ``benchmarks/results/methods-<methods>-<sparsity>-<host>-<date>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from results_io import RESULTS_DIR, machine_tag, result_path, today  # noqa: E402

from dsparse.config import load_config  # noqa: E402
from dsparse.data.manifest import load_manifest  # noqa: E402
from dsparse.tasks import delta_t  # noqa: E402
from dsparse.train.components import build_run_tasks  # noqa: E402
from dsparse.train.trainer import train  # noqa: E402

METHODS = ["dense", "disparse", "snip", "random"]


def run_overrides(data: str, out: Path, seed: int, experiment: str, run_name: str, iterations: int | None) -> list[str]:
    """The ``--set`` overrides every compared run shares: data, run directory, seed,
    MLflow experiment and run name, and (optionally) a shorter schedule."""
    overrides = [f"data.path={data}", f"output_dir={out}", f"seed={seed}", f"tracking.experiment={experiment}",
                 f"tracking.run_name={run_name}"]
    if iterations:
        overrides += [f"train.iterations={iterations}", f"train.eval_interval={iterations}",
                      f"train.checkpoint_interval={iterations}"]
    return overrides


def run_method(method: str, args, root: Path) -> dict:
    if method == "dense" and args.reuse_dense:
        summary = json.loads((Path(args.reuse_dense) / "summary.json").read_text())
        logging.info("reusing the dense baseline of %s", args.reuse_dense)
        return summary
    overrides = run_overrides(args.data, root / method, args.seed, "dsparse-methods", f"{method}-{args.sparsity}",
                              args.iterations)
    if method != "dense":
        overrides += [f"sparsity.method={method}", f"sparsity.target={args.sparsity}",
                      f"sparsity.num_batches={args.num_batches}"]
    return train(load_config(args.config, overrides))


def report(results: dict[str, dict], tasks, args) -> tuple[str, dict[str, float]]:
    dense = results["dense"]["final_metrics"]
    deltas = {m: delta_t(r["final_metrics"], dense, tasks) for m, r in results.items()}
    header = ["method", "sparsity"] + [f"{t} {m}" for t, task in tasks.items() for m in task.metric_lower_is_better]
    lines = ["| " + " | ".join(header + ["Delta_T %"]) + " |", "|" + "---|" * (len(header) + 1)]
    for method, result in results.items():
        achieved = (result.get("sparsity") or {}).get("achieved", 0.0)
        cells = [method, f"{achieved:.4f}"]
        cells += [f"{result['final_metrics'][t][m]:.4f}" for t, task in tasks.items() for m in task.metric_lower_is_better]
        lines.append("| " + " | ".join(cells + [f"{deltas[method]:+.2f}"]) + " |")
    return "\n".join(lines), deltas


def plot(results: dict, tasks, deltas: dict, path: Path, sparsity: float) -> None:
    figure, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.2 * (len(tasks) + 1), 3.2))
    methods = list(results)
    for axis, (name, task) in zip(axes, tasks.items()):
        values = [results[m]["final_metrics"][name][task.key_metric] for m in methods]
        axis.bar(methods, values, color=["grey", "tab:blue", "tab:orange", "tab:green"][: len(methods)])
        better = "lower" if task.metric_lower_is_better[task.key_metric] else "higher"
        axis.set_title(f"{name} {task.key_metric} ({better} better)", fontsize=9)
        axis.tick_params(axis="x", labelrotation=45, labelsize=8)
    axes[-1].bar(methods, [deltas[m] for m in methods], color="tab:purple")
    axes[-1].set_title("Delta_T vs dense (%)", fontsize=9)
    axes[-1].tick_params(axis="x", labelrotation=45, labelsize=8)
    figure.suptitle(f"Methods at {sparsity:.0%} sparsity", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic_tiny")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--num-batches", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list starting with dense; dynamic methods: disparse_dynamic,rigl,set")
    parser.add_argument("--reuse-dense", default=None, metavar="RUN_DIR",
                        help="take the dense baseline from this finished run (same config, seed, steps)")
    parser.add_argument("--runs", default="runs/methods")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    methods = args.methods.split(",")
    if methods[0] != "dense":
        raise SystemExit("the first method must be dense: it is the Delta_T baseline")
    root = Path(args.runs) / time.strftime("%Y%m%d-%H%M%S")
    results = {method: run_method(method, args, root) for method in methods}
    config = load_config(args.config, [f"data.path={args.data}"])
    tasks = build_run_tasks(config, load_manifest(args.data))
    table, deltas = report(results, tasks, args)
    host, date = machine_tag(), today()
    name = f"methods-{'-'.join(methods[1:])}-{args.sparsity}"
    title = (f"Methods at sparsity {args.sparsity}, config {args.config}, seed {args.seed}, "
             f"{results['dense']['step']} iterations, {host}, {date}")
    result_path(name, ".md", args.out).write_text(f"{title}\n\n{table}\n")
    result_path(name, ".json", args.out).write_text(json.dumps({m: {"final_metrics": r["final_metrics"],
                                                         "sparsity": r.get("sparsity"), "delta_t": deltas[m]}
                                                     for m, r in results.items()}, indent=2))
    plot(results, tasks, deltas, result_path(name, ".png", args.out), args.sparsity)
    print(f"{title}\n\n{table}\n\nwrote {result_path(name, '.md', args.out)} (+ .json, .png)")


if __name__ == "__main__":
    main()
