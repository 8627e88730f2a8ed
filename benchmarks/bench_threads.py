"""Trainer threads beside the loader workers: ``train.threads: auto`` vs torch's default.

Runs the same short ``dsparse train`` (the demo's tiny model, loader included) in fresh
processes, alternating the settings, and reads samples/s from each run's
``summary.json``:

- baseline: ``train.threads`` unset, torch's default (every core), while the loader
  workers decode on the same cores;
- auto: the cores left after the loader workers (``train.threads: auto``).

Usage (after ``dsparse data synth --out data/synthetic``)::

    python benchmarks/bench_threads.py --data data/synthetic [--iterations 300 --rounds 2]

Writes ``benchmarks/results/threads-<host>-<date>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import RESULTS_DIR, machine_tag, publish, today

from dsparse.distributed import trainer_threads


def run(data: str, iterations: int, threads: str | None, workers: int, out: Path) -> float:
    """samples/s of one ``dsparse train synthetic_tiny`` run."""
    overrides = [f"data.path={data}", f"output_dir={out}", f"train.iterations={iterations}",
                 f"train.eval_interval={iterations}", f"train.checkpoint_interval={iterations}",
                 f"data.num_workers={workers}", "tracking.enabled=false"]
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    command = [sys.executable, "-m", "dsparse.cli", "train", "synthetic_tiny"]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((out / "summary.json").read_text())["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {f"unset: torch's default ({cores} threads)": None,
                f"auto ({trainer_threads('auto', args.workers)} thread(s))": "auto"}
    rates: dict[str, list[float]] = {label: [] for label in settings}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for index, (label, threads) in enumerate(settings.items()):
                rate = run(args.data, args.iterations, threads, args.workers,
                           Path(scratch) / f"run-{round_index}-{index}")
                rates[label].append(rate)
                print(f"{label}: {rate:.0f} samples/s", flush=True)
    baseline = statistics.median(next(iter(rates.values())))
    lines = [f"Trainer threads beside {args.workers} loader workers, synthetic_tiny, {args.iterations} steps, "
             f"{cores} cores, median of {args.rounds} alternating runs each, {machine_tag()}, {today()}", "",
             "| train.threads | samples/s (loader included) | vs unset |", "|---|---|---|"]
    for label, values in rates.items():
        median = statistics.median(values)
        lines.append(f"| {label} | {median:.0f} | {median / baseline:.2f}x |")
    publish("threads", "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
