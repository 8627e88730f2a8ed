"""How many cores a training process may really use, and the thread settings that follow.

torch starts one intra-op thread per core of the *machine*, and its OpenMP threads spin at
every barrier waiting for the slowest one. Where the process does not own that many cores
(a CPU affinity mask, a cgroup quota in a container or a Slurm job, a Ray worker's CPUs,
other training processes or other programs on the same cores), a thread that the kernel
deschedules holds up all the others while they spin on its core: measured on 2 cores
beside another process, 5-7x slower than one thread. dsparse therefore decides the
threads from what the process may use:

* **cores** = its CPU affinity less the cores other programs kept busy while it measured
  (``/proc/stat`` over a short probe, every rank probing at the same moment so ranks do
  not count each other), within its cgroup CPU quota (v2 ``cpu.max`` or v1
  ``cpu.cfs_quota_us``, the tightest along the cgroup's path), shared among the node's
  training processes (``LOCAL_WORLD_SIZE``), within the CPUs Ray assigned to it;
* **threads** = those cores less the process's data loader workers (they decode on the
  same cores), rounded, at least 1: on 2 quiet cores with one worker, 2 passive threads
  trained 0.71x as fast as 1 (``benchmarks/bench_threads.py``);
* **OpenMP waits passively** (``OMP_WAIT_POLICY=PASSIVE``) unless the user set a wait
  policy: a waiting thread sleeps instead of spinning, which costs little when the cores
  are free and saves the run when they are not. OpenMP reads it once, when it starts, so
  ``set_openmp_wait_policy`` runs before torch is imported (the CLI's first step; Ray
  workers get it through the sweep's runtime environment).

``train.threads`` (a number) overrides the choice; the choice and its inputs are logged and
written to ``summary.json``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["CpuBudget", "cgroup_quota", "cpu_budget", "probe_busy_cores", "set_openmp_wait_policy"]

WAIT_POLICY = "PASSIVE"
_USER_SET = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def set_openmp_wait_policy(environ: dict | None = None) -> str | None:
    """Make OpenMP threads wait passively unless the user chose a policy; returns the
    policy in force (None: the user's spin settings, left alone). Call before torch is
    imported: OpenMP reads the variable when it starts."""
    environ = os.environ if environ is None else environ
    if any(key in environ for key in _USER_SET):
        return environ.get("OMP_WAIT_POLICY")
    environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return WAIT_POLICY


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cgroup_quota(root: str | Path = "/", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (quota / period), the tightest
    along its path (v2 ``cpu.max``; v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``),
    or None where there is none or it cannot be read."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base = root / "sys/fs/cgroup"
            for directory in _ancestors(base, path):
                limits.append(_v2_limit(directory / "cpu.max"))
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu,cpuacct", "cpu"):
                base = root / "sys/fs/cgroup" / name
                if base.is_dir():
                    for directory in _ancestors(base, path):
                        limits.append(_v1_limit(directory))
                    break
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """``base/path`` and each parent up to ``base`` (a container sees its own cgroup as ``/``)."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def ray_cpus() -> float | None:
    """The CPUs Ray assigned to this worker, where this process is one (ray imported and
    initialised); None otherwise."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # the driver, or an older Ray: no assignment to read
        return None
    return float(cpus) if cpus else None


def _cpu_times(cpus: set[int], stat: str | Path = "/proc/stat") -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus``."""
    busy = total = 0.0
    try:
        lines = Path(stat).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        numbers = [float(v) for v in values[:8]]
        idle = numbers[3] + numbers[4]  # idle + iowait
        busy += sum(numbers) - idle
        total += sum(numbers)
    return busy, total


def probe_busy_cores(seconds: float = 0.25, stat: str | Path = "/proc/stat") -> float:
    """Cores that *other* processes kept busy over ``seconds`` (this process sleeps), on the
    CPUs this process may run on; 0 where ``/proc/stat`` cannot be read."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus, stat)
    time.sleep(seconds)
    after = _cpu_times(cpus, stat)
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    busy, total = after[0] - before[0], after[1] - before[1]
    return max(0.0, len(cpus) * busy / total)


@dataclass(frozen=True)
class CpuBudget:
    """What one training process may use, and the intra-op threads that follow."""

    affinity: int
    """CPUs in the process's affinity mask."""
    quota: float | None
    """Its cgroup's CPU quota in cores, if any."""
    ray: float | None
    """CPUs Ray assigned to it, if it is a Ray worker."""
    local_processes: int
    """Training processes on this node sharing those CPUs (``LOCAL_WORLD_SIZE``)."""
    busy: float
    """Cores other programs kept busy during the probe."""
    loader_workers: int = 0
    """Its data loader worker processes, which share its cores."""

    @property
    def cores(self) -> float:
        """Cores this process may use: the node's free CPUs (affinity less what others keep
        busy, within the cgroup quota) shared among its training processes, within what
        Ray assigned to this one; at least one."""
        node = min(self.affinity - self.busy, self.quota if self.quota is not None else math.inf)
        share = node / max(1, self.local_processes)
        return max(1.0, min(share, self.ray if self.ray is not None else math.inf))

    @property
    def threads(self) -> int:
        """Intra-op threads: the cores less the loader workers, rounded half down (a core
        half taken by another program is one thread's stall at every barrier), at least 1."""
        return max(1, math.ceil(self.cores - self.loader_workers - 0.5))

    def as_dict(self) -> dict:
        return {**asdict(self), "cores": round(self.cores, 2), "threads": self.threads}


def cpu_budget(loader_workers: int = 0, busy: float | None = None) -> CpuBudget:
    """This process's budget now, beside ``loader_workers``; ``busy`` from a probe taken
    elsewhere, else a probe now."""
    return CpuBudget(affinity=_affinity(), quota=cgroup_quota(), ray=ray_cpus(),
                     local_processes=max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))),
                     busy=probe_busy_cores() if busy is None else busy, loader_workers=loader_workers)
