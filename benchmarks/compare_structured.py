"""Structured compression: channel DiSparse vs channel SNIP, magnitude and random, at a FLOPs
budget, against the dense model: quality, size, training speed, ONNX Runtime latency.

For every seed: one dense run (the Delta_T baseline of that seed), then each method with
``sparsity.granularity=channel sparsity.budget=flops`` at every FLOPs fraction kept. Per
variant: Delta_T (mean and spread over seeds), parameters and FLOPs at the training crop,
the training step (forward, the task losses, backward, Adam; batch 16) of the smaller model
against the dense one, timed in this process with the sides called in turn, and the ONNX
Runtime latency of its ONNX export at batch 1 and 16 against the dense model's export,
timed the same way. Magnitude scores are element magnitudes, so a channel's score is the
L1 norm of the weights removed with it (its filter and its input slices) per FLOP. Usage::

    python benchmarks/compare_structured.py --data data/synthetic --iterations 300 --seeds 0,1

Writes ``benchmarks/results/structured-<host>-<date>.{md,csv,png}``.
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
import torch  # noqa: E402

from compare_methods import run_overrides  # noqa: E402
from results_io import RESULTS_DIR, machine_tag, result_path, today  # noqa: E402
from timing import interleaved_median_times  # noqa: E402

from dsparse.config import load_config  # noqa: E402
from dsparse.data.manifest import load_manifest  # noqa: E402
from dsparse.onnx_export import OnnxRuntimeModel, export_onnx  # noqa: E402
from dsparse.runs.components import build_run_tasks  # noqa: E402
from dsparse.runs.restore import restore_run  # noqa: E402
from dsparse.sparsity.channel.vote import ChannelCost  # noqa: E402
from dsparse.tasks import delta_t  # noqa: E402
from dsparse.train.trainer import train  # noqa: E402

METHODS = ("disparse", "snip", "magnitude", "random")


def run(name: str, overrides: list[str], args, root: Path, seed: int) -> Path:
    out = root / f"seed{seed}" / name
    if not (out / "summary.json").is_file():  # else a finished run of an interrupted comparison
        base = run_overrides(args.data, out, seed, "dsparse-structured", f"{name}-s{seed}", args.iterations)
        logging.info("training %s, seed %d", name, seed)
        train(load_config(args.config, base + overrides + ["tracking.enabled=false"]))
    return out


def measure(run_dir: Path, dense_dir: Path, tasks, args, exports: Path) -> dict:
    """Size, FLOPs, step time and ONNX latency of a run against the dense run."""
    from bench_model import adam_step, fake_batch as bench_batch

    sparse, dense = restore_run(run_dir), restore_run(dense_dir)
    size = sparse.manifest.image_size[0]
    example = torch.zeros(1, 3, size, size)
    flops = [ChannelCost.of(m.model, example, "flops").total({}, []) for m in (dense, sparse)]
    params = [sum(p.numel() for p in m.model.parameters()) for m in (dense, sparse)]
    batch = bench_batch(16, size)
    steps = [adam_step(m.model, tasks, batch) for m in (dense, sparse)]
    step_dense, step_sparse = interleaved_median_times(steps, args.repeats, warmup=2)
    files = []
    for label, directory in (("dense", dense_dir), ("sparse", run_dir)):
        path = exports / f"{directory.parent.name}-{directory.name}.onnx"
        if not path.is_file():
            export_onnx(directory, path)
        files.append(OnnxRuntimeModel(path, threads=args.threads, spinning=False))
    latency = {}
    for batch_size in (1, 16):
        x = torch.randn(batch_size, 3, size, size)
        dense_s, sparse_s = interleaved_median_times([lambda: files[0](x), lambda: files[1](x)], args.repeats,
                                                     warmup=2, min_sample_s=0.05)
        latency[batch_size] = (dense_s, sparse_s)
    return {"params": params[1], "params_dense": params[0], "flops": flops[1], "flops_dense": flops[0],
            "step_speedup": step_dense / step_sparse, "step_ms": 1000 * step_sparse,
            "onnx_b1_speedup": latency[1][0] / latency[1][1], "onnx_b16_speedup": latency[16][0] / latency[16][1],
            "onnx_b1_ms": 1000 * latency[1][1], "onnx_b16_ms": 1000 * latency[16][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic_tiny")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--keep", default="0.75,0.5,0.25", help="fractions of the dense FLOPs kept")
    parser.add_argument("--channel-multiple", type=int, default=8, help="sparsity.channel_multiple of the runs")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--num-batches", type=int, default=20, help="saliency batches of the data-driven methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs", default=None, help="run directory (default runs/structured/<time>); an existing "
                                                     "one continues where it stopped")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    keeps = [float(k) for k in args.keep.split(",")]
    root = Path(args.runs or f"runs/structured/{time.strftime('%Y%m%d-%H%M%S')}")
    exports = root / "onnx"
    exports.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, [f"data.path={args.data}"])
    tasks = build_run_tasks(config, load_manifest(args.data))
    variants = [(method, keep) for keep in keeps for method in METHODS]
    entries: dict[tuple[str, float], list[dict]] = {variant: [] for variant in variants}
    # First every training run, then every measurement: the timings are taken together, in
    # the quiet stretch after training, and an interrupted comparison resumes its runs.
    trained = []
    started, total = time.time(), len(seeds) * (len(variants) + 1)
    for seed in seeds:
        dense_dir = run("dense", [], args, root, seed)
        for method, keep in variants:
            overrides = [f"sparsity.method={method}", f"sparsity.target={1 - keep}", "sparsity.granularity=channel",
                         "sparsity.budget=flops", f"sparsity.num_batches={args.num_batches}",
                         f"sparsity.channel_multiple={args.channel_multiple}"]
            trained.append((method, keep, seed, run(f"{method}-flops{keep}", overrides, args, root, seed), dense_dir))
            done = len(trained) + seeds.index(seed) + 1
            logging.info("trained %d/%d runs, ETA %.0f min", done, total,
                         (time.time() - started) / done * (total - done) / 60)
    for index, (method, keep, seed, run_dir, dense_dir) in enumerate(trained):
        dense = json.loads((dense_dir / "summary.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        row = {"delta_t": delta_t(summary["final_metrics"], dense["final_metrics"], tasks),
               **measure(run_dir, dense_dir, tasks, args, exports)}
        entries[method, keep].append(row)
        logging.info("%s at %.0f%% FLOPs, seed %d: Delta_T %+.2f, step %.2fx, ONNX b1 %.2fx b16 %.2fx (measured "
                     "%d/%d)", method, 100 * keep, seed, row["delta_t"], row["step_speedup"], row["onnx_b1_speedup"],
                     row["onnx_b16_speedup"], index + 1, len(trained))
    rows = []
    for (method, keep), measured in entries.items():
        deltas = [m["delta_t"] for m in measured]
        row = {"method": method, "flops_kept": keep, "seeds": len(measured),
               "delta_t_mean": statistics.mean(deltas), "delta_t_std": statistics.stdev(deltas) if len(deltas) > 1 else 0}
        for key in ("params", "params_dense", "flops", "flops_dense", "step_speedup", "onnx_b1_speedup",
                    "onnx_b16_speedup", "step_ms", "onnx_b1_ms", "onnx_b16_ms"):
            row[key] = statistics.mean(m[key] for m in measured)
        rows.append(row)
    title = (f"Channel pruning at a FLOPs budget, config {args.config}, {args.iterations} iterations, seeds {seeds}, "
             f"channel multiple {args.channel_multiple}, {args.threads} threads, {machine_tag()}, {today()}")
    header = ["method", "FLOPs kept", "Delta_T % (mean ± std)", "params (dense)", "FLOPs (dense)",
              "train step vs dense", "ONNX RT batch 1 vs dense", "ONNX RT batch 16 vs dense"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['flops_kept']:.0%} ({r['flops'] / r['flops_dense']:.1%}) | "
                     f"{r['delta_t_mean']:+.2f} ± {r['delta_t_std']:.2f} | {r['params']:,.0f} ({r['params_dense']:,.0f}) "
                     f"| {r['flops'] / 1e6:.1f} M ({r['flops_dense'] / 1e6:.1f} M) | {r['step_speedup']:.2f}x | "
                     f"{r['onnx_b1_speedup']:.2f}x | {r['onnx_b16_speedup']:.2f}x |")
    name = "structured"
    result_path(name, ".md", args.out).write_text("\n".join(lines) + "\n")
    with open(result_path(name, ".csv", args.out), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    width = 0.8 / len(keeps)
    for keep, colour in zip(keeps, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        chosen = [r for r in rows if r["flops_kept"] == keep]
        positions = [METHODS.index(r["method"]) + width * keeps.index(keep) for r in chosen]
        axes[0].bar(positions, [r["delta_t_mean"] for r in chosen], width=width,
                    yerr=[r["delta_t_std"] for r in chosen], color=colour, capsize=3, label=f"{keep:.0%} FLOPs")
        axes[1].bar(positions, [r["step_speedup"] for r in chosen], width=width, color=colour)
        axes[2].bar(positions, [r["onnx_b16_speedup"] for r in chosen], width=width, color=colour)
    for axis, label in zip(axes, ("Delta_T vs dense (%)", "training step speed-up vs dense",
                                  "ONNX Runtime batch 16 speed-up vs dense")):
        axis.set_xticks([i + width * (len(keeps) - 1) / 2 for i in range(len(METHODS))], METHODS)
        axis.set_ylabel(label)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(result_path(name, ".png", args.out), dpi=120)
    print("\n".join(lines))
    print(f"wrote {result_path(name, '.md', args.out)} (+ .csv, .png)")


if __name__ == "__main__":
    main()
