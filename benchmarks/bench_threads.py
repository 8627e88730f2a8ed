"""Training throughput by thread setting, on a quiet machine, beside a competing load and
under a cgroup CPU quota: does dsparse's default hold up where it does not own the cores?

Runs the same short ``dsparse train synthetic_tiny`` (the demo's tiny model, loader
included) in fresh processes, the settings alternated within each condition, and reads
samples/s from each run's ``summary.json``. Settings:

- default: ``train.threads: auto`` and the passive OpenMP wait policy the CLI sets
  (``dsparse.cpus``);
- torch's default: one thread per core of the machine and OpenMP's own spin-then-sleep
  wait (``GOMP_SPINCOUNT`` set to libgomp's default of 300000, so the CLI leaves it alone):
  what dsparse did before;
- 1, 2, ... threads, passive.

Conditions: quiet; ``--burners`` CPU-burning processes started by the benchmark for the
duration of each run (bounded: they stop with the run); and, where this process may create
a cgroup (root with a writable cgroup v1 ``cpu`` or v2 hierarchy), the run inside a cgroup
limited to ``--quota`` cores. Usage (after ``dsparse data synth --out data/synthetic``)::

    python benchmarks/bench_threads.py --data data/synthetic [--iterations 150 --rounds 2]

Writes ``benchmarks/results/threads-<host>-<date>.md``: samples/s per setting and
condition, the default against the best setting, and the default's samples/s per available
core against the quiet machine's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import RESULTS_DIR, machine_tag, publish, today

BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def run(data: str, iterations: int, threads: str, env: dict, out: Path, cgroup: Path | None) -> dict:
    """The summary of one ``dsparse train synthetic_tiny`` run."""
    overrides = [f"data.path={data}", f"output_dir={out}", f"train.iterations={iterations}",
                 f"train.eval_interval={iterations}", f"train.checkpoint_interval={iterations}",
                 "tracking.enabled=false", f"train.threads={threads}"]
    command = [sys.executable, "-m", "dsparse.cli", "train", "synthetic_tiny"]
    for override in overrides:
        command += ["--set", override]
    if cgroup is not None:  # enter the cgroup, then become the training process
        command = ["sh", "-c", f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"', "sh", *command]
    subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads((out / "summary.json").read_text())


@contextlib.contextmanager
def burners(count: int, seconds: float):
    """``count`` processes that each keep one core busy for at most ``seconds``."""
    processes = [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)]) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


@contextlib.contextmanager
def quota_cgroup(cores: float):
    """A cgroup limited to ``cores`` (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None
    where none can be made here."""
    candidates = [(Path("/sys/fs/cgroup"), "v2"), (Path("/sys/fs/cgroup/cpu"), "v1"),
                  (Path("/sys/fs/cgroup/cpu,cpuacct"), "v1")]
    for base, version in candidates:
        marker = base / ("cgroup.controllers" if version == "v2" else "cpu.cfs_quota_us")
        if not marker.is_file() or (version == "v2" and "cpu" not in marker.read_text().split()):
            continue
        group = base / f"dsparse-bench-{os.getpid()}"
        try:
            group.mkdir()
            period = 100_000
            if version == "v2":
                (group / "cpu.max").write_text(f"{int(cores * period)} {period}\n")
            else:
                (group / "cpu.cfs_period_us").write_text(f"{period}\n")
                (group / "cpu.cfs_quota_us").write_text(f"{int(cores * period)}\n")
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
            continue
        try:
            yield group
        finally:
            with contextlib.suppress(OSError):
                group.rmdir()
        return
    yield None


def environment(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    if setting == "torch":
        env["GOMP_SPINCOUNT"] = "300000"  # libgomp's own default; the CLI then sets no policy
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--burners", type=int, default=1, help="competing CPU-bound processes")
    parser.add_argument("--quota", type=float, default=1.0, help="cores of the quota-limited condition")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {"default (auto, passive)": "auto", "torch's default (spin)": "torch"}
    settings.update({f"{n} thread{'s' if n > 1 else ''} (passive)": str(n) for n in range(1, cores + 1)})
    conditions = [("quiet", cores, None), (f"{args.burners} competing process(es)", max(1, cores - args.burners),
                                           "burn"), (f"cgroup quota {args.quota:g} cores", args.quota, "quota")]
    rates: dict[str, dict[str, list[float]]] = {c: {s: [] for s in settings} for c, _, _ in conditions}
    chosen: dict[str, list[int]] = {c: [] for c, _, _ in conditions}
    skipped = []
    with tempfile.TemporaryDirectory() as scratch:
        for condition, _, kind in conditions:
            with quota_cgroup(args.quota) if kind == "quota" else contextlib.nullcontext() as group:
                if kind == "quota" and group is None:
                    skipped.append(condition)
                    continue
                for round_index in range(args.rounds):
                    for label, threads in settings.items():
                        out = Path(scratch) / f"{len(os.listdir(scratch))}"
                        load = burners(args.burners, 600) if kind == "burn" else contextlib.nullcontext()
                        with load:
                            summary = run(args.data, args.iterations, threads, environment(threads), out, group)
                        rates[condition][label].append(summary["samples_per_s"])
                        if threads == "auto":
                            chosen[condition].append(summary["threads"])
                        print(f"{condition}, {label}: {summary['samples_per_s']:.1f} samples/s "
                              f"({summary['threads']} threads)", flush=True)
    quiet = statistics.median(rates["quiet"]["default (auto, passive)"])
    lines = [f"Training throughput by thread setting, synthetic_tiny, {args.iterations} steps, 1 loader worker, "
             f"{cores} cores, median of {args.rounds} alternating runs, {machine_tag()}, {today()}", "",
             "| condition | " + " | ".join(settings) + " | default vs best | default per available core vs quiet |",
             "|---|" + "---|" * (len(settings) + 2)]
    for condition, available, _ in conditions:
        if condition in skipped:
            continue
        medians = {label: statistics.median(values) for label, values in rates[condition].items()}
        default = medians["default (auto, passive)"]
        cells = [f"{medians[s]:.1f}" for s in settings]
        cells[0] += f" ({'/'.join(map(str, sorted(set(chosen[condition]))))} thr.)"
        per_core = (default / available) / (quiet / cores)
        lines.append(f"| {condition} | " + " | ".join(cells) + f" | {default / max(medians.values()):.2f} | "
                     f"{per_core:.2f} |")
    lines += ["", "Samples/s of the whole run (loader included). Per available core: the condition's default "
                  "samples/s divided by the cores left to it (cores less competing processes, or the quota), "
                  "against the quiet default's per core."]
    lines += [f"Not measured: {c} (no writable cgroup here)." for c in skipped]
    publish("threads", "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
