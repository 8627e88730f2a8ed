"""Overhead of masked (sparse) training vs dense training, per DeepSpeed step.

Same model, same in-memory batches, same engine settings; the masked run adds the
gradient hooks of ``ElementApplier`` (90% random masks). Dense is the baseline measured in
the same run. Usage::

    python benchmarks/bench_masked_training.py [--arch resnet18 --width 16 --batch 16]

Writes ``benchmarks/results/masked-training-<host>-<date>.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dsparse.config import config_from_dict
from dsparse.sparsity.appliers import ElementApplier
from dsparse.sparsity.prune import prune
from dsparse.distributed import init_distributed
from dsparse.train.engine import build_engine

from bench_model import add_model_args, bench_model, bench_tasks, fake_batch, train_step
from results_io import RESULTS_DIR, machine_tag, publish, today


def time_steps(engine, tasks, batch, num_steps: int) -> list[float]:
    times = []
    for step in range(num_steps + 3):
        start = time.perf_counter()
        train_step(engine, tasks, batch)
        if step >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    init_distributed()
    tasks = bench_tasks()
    config = config_from_dict({"data": {"batch_size": args.batch}, "deepspeed": {"zero_stage": args.zero_stage}})
    batch = fake_batch(args.batch, args.size)
    medians = {}
    for label in ("dense", "masked 90%"):
        model = bench_model(args, tasks)
        if label != "dense":
            ElementApplier(model, prune(model, tasks, None, method="random", sparsity=0.9))
        engine = build_engine(config, model, torch.device("cpu"))
        medians[label] = statistics.median(time_steps(engine, tasks, batch, args.steps))
    overhead = medians["masked 90%"] / medians["dense"] - 1
    host, date = machine_tag(), today()
    lines = [f"Masked vs dense training step, {args.arch} width {args.width}, batch {args.batch} at "
             f"{args.size}x{args.size}, 5 tasks, ZeRO-{args.zero_stage}, {host}, {date}", "",
             "| run | median step (ms) |", "|---|---|"]
    lines += [f"| {label} | {1000 * value:.1f} |" for label, value in medians.items()]
    lines += ["", f"- masked / dense: {1 + overhead:.3f}x (overhead {100 * overhead:+.1f}%)"]
    report = "\n".join(lines)
    publish(f"masked-training-{args.arch}-w{args.width}", report, args.out)


if __name__ == "__main__":
    main()
