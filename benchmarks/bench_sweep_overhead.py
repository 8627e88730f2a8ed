"""Sweep overhead: a 2-trial ``dsparse sweep`` vs the same two runs with ``dsparse train``.

Both sides run the same two configs (seeds 0 and 1 of the synthetic demo model), each with
2 processes: the baseline launches ``torchrun --nproc_per_node 2 -m dsparse train`` twice,
back to back; the sweep runs both as Ray Train trials of 2 workers, one at a time, on a
fresh local Ray instance. Wall times include every start-up (processes, DeepSpeed, Ray),
which is what a user waits for. The training time inside each run comes from its
``summary.json``, so the table also splits the overhead from the training.

Usage (after ``dsparse data synth --out data/synthetic``)::

    python benchmarks/bench_sweep_overhead.py --data data/synthetic --iterations 200

Writes ``benchmarks/results/sweep-overhead-<host>-<date>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from results_io import machine_tag, publish, today

SEEDS = (0, 1)


def run_overrides(data: Path, iterations: int) -> dict:
    return {"data.path": str(data.resolve()), "data.num_workers": 0, "train.iterations": iterations,
            "train.eval_interval": iterations, "train.checkpoint_interval": iterations,
            "train.log_interval": max(iterations // 4, 1)}


def timed(command: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def train_back_to_back(work: Path, overrides: dict, env: dict) -> tuple[float, list[float]]:
    total, inside = 0.0, []
    for seed in SEEDS:
        run_dir = work / "train" / f"seed={seed}"
        sets = [f"--set={key}={value}" for key, value in {**overrides, "seed": seed, "output_dir": run_dir}.items()]
        total += timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "dsparse", "train", "synthetic_tiny", *sets], env, work)
        inside.append(json.loads((run_dir / "summary.json").read_text())["wall_time_s"])
    return total, inside


def sweep(work: Path, overrides: dict, env: dict) -> tuple[float, list[float]]:
    spec = work / "overhead.yaml"
    spec.write_text(yaml.safe_dump({"base": "synthetic_tiny", "overrides": overrides, "grid": {"seed": list(SEEDS)},
                                    "resources": {"workers": 2, "cpus_per_worker": 1}, "max_concurrent": 1}))
    dsparse = str(Path(sys.executable).with_name("dsparse"))
    total = timed([dsparse, "sweep", str(spec), "--out", str(work / "sweep")], env, work)
    inside = [json.loads((work / "sweep" / "trials" / f"seed={seed}" / "summary.json").read_text())["wall_time_s"]
              for seed in SEEDS]
    return total, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
        overrides = run_overrides(Path(args.data), args.iterations)
        print(f"2 x dsparse train (torchrun, 2 processes), {args.iterations} iterations each ...", flush=True)
        train_wall, train_inside = train_back_to_back(work, overrides, env)
        print(f"  {train_wall:.1f} s; dsparse sweep with the same 2 trials ...", flush=True)
        sweep_wall, sweep_inside = sweep(work, overrides, env)
        print(f"  {sweep_wall:.1f} s", flush=True)
    rows = [("2 x `dsparse train` back to back (baseline)", train_wall, sum(train_inside)),
            ("`dsparse sweep`, 2 trials, local Ray", sweep_wall, sum(sweep_inside))]
    lines = [f"# Sweep overhead ({machine_tag()}, {today()})", "",
             f"Two runs of the synthetic demo model (seeds {list(SEEDS)}), {args.iterations} iterations each, "
             "2 processes per run, one run at a time. Command: "
             f"`python benchmarks/bench_sweep_overhead.py --data {args.data} --iterations {args.iterations}`", "",
             "| how | wall time (s) | in the training loops (s) | everything else (s) | wall vs baseline |",
             "|---|---|---|---|---|"]
    for name, wall, inside in rows:
        lines.append(f"| {name} | {wall:.1f} | {inside:.1f} | {wall - inside:.1f} | {wall / train_wall:.2f}x |")
    lines += ["", f"Sweep overhead: {sweep_wall - train_wall:+.1f} s for 2 trials "
              f"({(sweep_wall - train_wall) / len(SEEDS):+.1f} s a trial); the training loops (steps, validation, "
              f"checkpoints and, in the sweep, checkpoint registration) differ by "
              f"{sum(sweep_inside) - sum(train_inside):+.1f} s. \"Everything else\" is process, DeepSpeed and model "
              "start-up and, for the sweep, Ray start-up and trial scheduling."]
    publish("sweep-overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
