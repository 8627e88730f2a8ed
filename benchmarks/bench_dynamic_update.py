"""Cost of one dynamic mask update relative to one training step, and its peak memory.

Measured in one run on the same model, batch and DeepSpeed engine, for element masks and
block masks: the median time of a plain training step (forward, backward, optimizer
step; the baseline) and of a training step that ends with a mask update, as the trainer
runs it (``Sparsifier.begin_step`` takes the per-task gradients the joint one cannot
give, the step's own backward supplies the rest, then drop, vote-union grow, zeroing of
weights and optimizer state). The update's cost is the difference of the two. For
reference it also times the standalone update (its own forward and a backward per task,
what the Sparsifier does when used outside a training loop), and the peak resident
memory (VmHWM) of plain and updating steps. Usage::

    python benchmarks/bench_dynamic_update.py [--width 16 --batch 16 --method disparse_dynamic]

Writes ``benchmarks/results/dynamic-update-<method>-<host>-<date>.md``.
"""

from __future__ import annotations

import argparse

import torch
from dsparse.config import config_from_dict
from dsparse.distributed import init_distributed
from dsparse.sparsity import MaskInputs, build_sparsifier
from dsparse.train.engine import build_engine

from bench_model import (
    TASKS,
    add_model_args,
    bench_model,
    bench_tasks,
    fake_batch,
    train_step,
)
from peak_memory import peak_rss_mib, reset_peak_rss
from results_io import RESULTS_DIR, machine_tag, publish, today
from timing import median_time


def measure(args, tasks, granularity: str) -> dict[str, float]:
    """Median times (s) of plain steps, updating steps and standalone updates; peak RSS (MiB)."""
    model = bench_model(args, tasks)
    config = config_from_dict({"tasks": TASKS, "data": {"batch_size": args.batch},
                               "sparsity": {"method": args.method, "target": 0.9, "interval": 2, "end": 1.0,
                                            "alpha0": 0.5, "granularity": granularity,
                                            **({"block": args.block} if granularity == "block" else {})}})
    sparsifier = build_sparsifier(config.sparsity, MaskInputs(tasks, config.sparsity, seed=0, total_steps=10**6))
    model = sparsifier.prepare(model)
    engine = build_engine(config, model, torch.device("cpu"))
    sparsifier.bind(engine.optimizer)
    batch = fake_batch(args.batch, args.size)
    counter = iter(range(1, 10**6))

    def training_step(update: bool):
        step = next(counter)
        if (step % 2 == 0) != update:  # interval 2: even steps update
            step = next(counter)
        sparsifier.begin_step(step, batch)
        train_step(engine, tasks, batch)
        sparsifier.step(step, batch)

    for _ in range(3):  # warm-up every path
        training_step(False)
        training_step(True)
    reset_peak_rss()
    plain = median_time(lambda: training_step(False), args.repeats, warmup=0)
    plain_peak = peak_rss_mib()
    reset_peak_rss()
    updating = median_time(lambda: training_step(True), args.repeats, warmup=0)
    update_peak = peak_rss_mib()
    standalone = median_time(lambda: sparsifier.step(2 * next(counter), batch), args.repeats, warmup=0)
    return {"plain": plain, "updating": updating, "standalone": standalone, "plain_peak": plain_peak,
            "update_peak": update_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--method", default="disparse_dynamic")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_distributed()
    tasks = bench_tasks()
    results = {"element": measure(args, tasks, "element"), f"block {args.block}": measure(args, tasks, "block")}
    host, date = machine_tag(), today()
    lines = [f"Dynamic mask update ({args.method}) vs training step, {args.arch} width {args.width}, batch "
             f"{args.batch} at {args.size}x{args.size}, T={len(TASKS)} tasks, 90% sparsity, DeepSpeed ZeRO-0, "
             f"{args.threads} threads, {host}, {date}", "",
             "| masks | plain step (ms) | step with update (ms) | update cost (ms) | update / step | "
             "standalone update (ms) | standalone / step | peak RSS update / plain |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        cost = r["updating"] - r["plain"]
        lines.append(f"| {label} | {1000 * r['plain']:.1f} | {1000 * r['updating']:.1f} | {1000 * cost:.1f} | "
                     f"{cost / r['plain']:.2f}x | {1000 * r['standalone']:.1f} | {r['standalone'] / r['plain']:.2f}x | "
                     f"{r['update_peak'] / r['plain_peak']:.3f}x |")
    lines += ["", "update cost = step with update - plain step (target: under 1.5x a step at T = 5); the "
              "standalone update runs its own forward and a backward per task."]
    publish(f"dynamic-update-{args.method}", "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
