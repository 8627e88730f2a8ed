"""Loader vs training throughput for the demo config; is the loader the bottleneck?

Measures, in one run on this machine:
  * loader samples/s with 1 and 2 dataloader workers (decode + augment + collate, no model);
  * training samples/s of a plain PyTorch loop (the baseline) and of the DeepSpeed engine,
    on batches already in memory (pure compute);
  * a real ``dsparse train`` run (loader + DeepSpeed together) and its data-wait fraction.

Usage (after ``dsparse data synth --out data/synthetic``)::

    python benchmarks/bench_throughput.py --data data/synthetic

Writes ``benchmarks/results/throughput-<host>-<date>.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tempfile
import time

import torch

from results_io import RESULTS_DIR, machine_tag, result_path, today

from dsparse.config import load_config
from dsparse.data.loader import TrainBatches, stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.runs.components import build_run_model, build_run_tasks
from dsparse.distributed import init_distributed
from dsparse.train.optim import build_optimizer
from dsparse.train.engine import build_engine
from dsparse.train.trainer import train


def loader_rate(config, manifest, num_workers: int, num_batches: int) -> float:
    config.data.num_workers = num_workers
    spec = stream_spec(config.data, manifest, "train", config.tasks, seed=0, rank=0, world_size=1, train=True)
    batches = TrainBatches(spec)
    for _ in range(5):  # warm-up: worker start-up, first shard open
        next(batches)
    start = time.perf_counter()
    samples = sum(len(next(batches)["__key__"]) for _ in range(num_batches))
    return samples / (time.perf_counter() - start)


def _step_rate(step, batches, num_steps: int) -> float:
    for batch in batches[:3]:  # warm-up
        step(batch)
    start = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(batches), num_steps):
        step(batch)
    return num_steps * batches[0]["rgb"].shape[0] / (time.perf_counter() - start)


def compute_rates(config, manifest, num_steps: int) -> tuple[float, float]:
    """Samples/s of plain PyTorch and of the DeepSpeed engine on in-memory batches."""
    tasks = build_run_tasks(config, manifest)
    spec = stream_spec(config.data, manifest, "train", config.tasks, seed=0, rank=0, world_size=1, train=True)
    source = TrainBatches(spec)
    batches = [next(source) for _ in range(8)]

    def joint_loss(outputs, batch):
        return sum(config.weight_of(n) * t.loss(outputs[n], batch[n]) for n, t in tasks.items())

    torch.manual_seed(0)
    model = build_run_model(config, tasks)
    optimizer = build_optimizer(model.parameters(), config.optimizer)

    def plain_step(batch):
        optimizer.zero_grad(set_to_none=True)
        joint_loss(model(batch["rgb"]), batch).backward()
        optimizer.step()

    plain = _step_rate(plain_step, batches, num_steps)
    torch.manual_seed(0)
    engine = build_engine(config, build_run_model(config, tasks), torch.device("cpu"))

    def engine_step(batch):
        engine.backward(joint_loss(engine(batch["rgb"]), batch))
        engine.step()

    return plain, _step_rate(engine_step, batches, num_steps)


def end_to_end(config, num_steps: int) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        config.output_dir = run_dir
        config.tracking.enabled = False
        config.train.iterations = num_steps
        config.train.eval_interval = config.train.checkpoint_interval = num_steps
        config.train.eval_batches = 1
        return train(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--config", default="synthetic_tiny")
    parser.add_argument("--loader-batches", type=int, default=150)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    init_distributed()
    config = load_config(args.config, [f"data.path={args.data}"])
    manifest = load_manifest(args.data)
    rows = []
    for workers in (1, 2):
        rows.append(("loader", f"{workers} worker(s)", loader_rate(config, manifest, workers, args.loader_batches)))
    plain, engine = compute_rates(load_config(args.config, [f"data.path={args.data}"]), manifest, args.train_steps)
    rows += [("train compute", "plain PyTorch (baseline)", plain), ("train compute", "DeepSpeed ZeRO-0", engine)]
    e2e_config = load_config(args.config, [f"data.path={args.data}"])
    summary = end_to_end(e2e_config, 4 * args.train_steps)
    rows.append(("train end-to-end", f"dsparse train, {e2e_config.data.num_workers} worker(s)",
                 summary["samples_per_s"]))
    host, date = machine_tag(), today()
    lines = [f"Throughput, config `{args.config}`, {host}, {date}, torch {torch.__version__}", "",
             "| what | setting | samples/s |", "|---|---|---|"]
    lines += [f"| {what} | {setting} | {rate:.1f} |" for what, setting, rate in rows]
    lines += ["", f"- DeepSpeed / plain PyTorch step rate: {engine / plain:.2f}x",
              f"- loader (1 worker) / DeepSpeed training rate: {rows[0][2] / engine:.2f}x "
              "(> 1: the loader is not the bottleneck)",
              f"- data-wait fraction in the end-to-end run: {100 * summary['data_wait_fraction']:.1f}%"]
    report = "\n".join(lines)
    print(report)
    name = "throughput"
    result_path(name, ".md", args.out).write_text(report + "\n")
    with result_path(name, ".csv", args.out).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["what", "setting", "samples_per_s"])
        writer.writerows(rows)
    print(f"wrote {result_path(name, '.md', args.out)} and .csv")


if __name__ == "__main__":
    main()
