"""Cost of one dynamic mask update relative to one training step, and its peak memory.

Measured in one run on the same model, batch and DeepSpeed engine: the median time of a
training step (forward, backward, optimizer step; the baseline) and of a DiSparse-dynamic
mask update (per-task dense gradients on one forward, all-reduce, drop, vote-union grow,
zeroing of weights and optimizer state), plus the peak resident memory (VmHWM) reached
during training steps and during updates. Usage::

    python benchmarks/bench_dynamic_update.py [--width 16 --batch 16 --method disparse_dynamic]

Writes ``benchmarks/results/dynamic-update-<host>-<date>.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dsparse.config import config_from_dict
from dsparse.distributed import init_distributed
from dsparse.sparsity import MaskInputs, build_sparsifier
from dsparse.train.trainer import _build_engine

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--method", default="disparse_dynamic")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    init_distributed()
    tasks = bench_tasks()
    model = bench_model(args, tasks)
    config = config_from_dict({"tasks": TASKS, "data": {"batch_size": args.batch},
                               "sparsity": {"method": args.method, "target": 0.9, "interval": 1, "end": 1.0,
                                            "alpha0": 0.5}})
    sparsifier = build_sparsifier(config.sparsity, MaskInputs(tasks, config.sparsity, seed=0, total_steps=10**6))
    model = sparsifier.prepare(model)
    engine = _build_engine(config, model, torch.device("cpu"))
    sparsifier.bind(engine.optimizer)
    batch = fake_batch(args.batch, args.size)

    def one_step():
        train_step(engine, tasks, batch)

    def timed(function, repeats):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for _ in range(3):  # warm-up both paths
        one_step()
        sparsifier.step(1, batch)
    reset_peak_rss()
    step_time = timed(one_step, args.repeats)
    train_peak = peak_rss_mib()
    reset_peak_rss()
    counter = iter(range(2, 10**6))
    update_time = timed(lambda: sparsifier.step(next(counter), batch), args.repeats)
    update_peak = peak_rss_mib()
    host, date = machine_tag(), today()
    lines = [f"Dynamic mask update ({args.method}) vs training step, {args.arch} width {args.width}, batch "
             f"{args.batch} at {args.size}x{args.size}, T={len(TASKS)} tasks, 90% sparsity, {host}, {date}", "",
             "| what | median time (ms) | peak RSS (MiB) |", "|---|---|---|",
             f"| training step (baseline) | {1000 * step_time:.1f} | {train_peak:.0f} |",
             f"| mask update | {1000 * update_time:.1f} | {update_peak:.0f} |", "",
             f"- update / step time: {update_time / step_time:.2f}x (target under 2x)",
             f"- update / training peak memory: {update_peak / train_peak:.3f}x (target under 1.1x)"]
    report = "\n".join(lines)
    publish(f"dynamic-update-{args.method}", report, args.out)


if __name__ == "__main__":
    main()
