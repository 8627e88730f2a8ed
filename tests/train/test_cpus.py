"""The cores a training process may use: affinity, cgroup quota, Ray, other processes."""

from __future__ import annotations

import os
import sys
import types

import pytest

from dsparse import cpus
from dsparse.cpus import CpuBudget, cgroup_quota, cpu_budget, probe_busy_cores, set_openmp_wait_policy


def budget(**fields) -> CpuBudget:
    return CpuBudget(**{"affinity": 8, "quota": None, "ray": None, "local_processes": 1, "busy": 0.0, **fields})


def test_the_tightest_limit_wins_and_node_processes_share_it():
    assert budget().threads == 8
    assert budget(quota=2.0).threads == 2  # a Kubernetes pod on an 8-core node
    assert budget(quota=2.5).threads == 2  # half a core is a stall at every barrier, not a thread
    assert budget(local_processes=4).threads == 2
    assert budget(quota=4.0, local_processes=2).threads == 2
    assert budget(ray=3.0, local_processes=2).threads == 3  # Ray assigns per worker: not shared again
    assert budget(affinity=2, busy=1.0).threads == 1  # another program holds one of two cores
    assert budget(affinity=2, busy=0.3).threads == 2  # background noise is not a core
    assert budget(affinity=2, busy=5.0).threads == 1  # never below one
    assert budget(loader_workers=2).threads == 6  # the loader decodes on the same cores
    assert budget(affinity=2, loader_workers=1).threads == 1
    assert budget(quota=1.0, loader_workers=1).threads == 1


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_along_the_path(tmp_path):
    write(tmp_path / "proc", "0::/kubepods/pod1/container\n")
    write(tmp_path / "sys/fs/cgroup/kubepods/cpu.max", "max 100000\n")
    write(tmp_path / "sys/fs/cgroup/kubepods/pod1/cpu.max", "150000 100000\n")
    write(tmp_path / "sys/fs/cgroup/kubepods/pod1/container/cpu.max", "400000 100000\n")
    assert cgroup_quota(tmp_path, tmp_path / "proc") == 1.5


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    write(tmp_path / "proc", "4:memory:/job\n2:cpu,cpuacct:/slurm/job7\n")
    job = tmp_path / "sys/fs/cgroup/cpu,cpuacct/slurm/job7"
    write(job / "cpu.cfs_quota_us", "300000\n")
    write(job / "cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(tmp_path, tmp_path / "proc") == 3.0
    write(job / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_quota(tmp_path, tmp_path / "proc") is None
    assert cgroup_quota(tmp_path, tmp_path / "missing") is None


def test_the_probe_counts_what_other_processes_keep_busy(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    allowed = sorted(os.sched_getaffinity(0))[:2]
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(allowed))
    samples = iter([
        # user nice system idle iowait irq softirq steal, per CPU: one busy, one idle
        [(100, 0, 0, 100, 0, 0, 0, 0), (0, 0, 0, 200, 0, 0, 0, 0)],
        [(200, 0, 0, 100, 0, 0, 0, 0), (0, 0, 0, 300, 0, 0, 0, 0)],
    ])

    def sleep(_):
        write_sample(next(samples))

    def write_sample(rows):
        lines = ["cpu 0 0 0 0 0 0 0 0"] + [f"cpu{c} " + " ".join(map(str, r)) for c, r in zip(allowed, rows)]
        stat.write_text("\n".join(lines) + "\n")

    write_sample(next(samples))
    monkeypatch.setattr(cpus.time, "sleep", sleep)
    assert probe_busy_cores(0.1, stat) == pytest.approx(1.0)


def test_a_ray_worker_is_held_to_its_assigned_cpus(monkeypatch):
    context = types.SimpleNamespace(get_assigned_resources=lambda: {"CPU": 2.0})
    fake = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    chosen = cpu_budget(busy=0.0)  # no loader workers
    assert (chosen.ray, chosen.local_processes, chosen.threads) == (2.0, 2, 2)


def test_the_wait_policy_is_passive_unless_the_user_chose_one():
    environ = {}
    assert set_openmp_wait_policy(environ) == "PASSIVE" and environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert set_openmp_wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    mine = {"GOMP_SPINCOUNT": "10000"}
    assert set_openmp_wait_policy(mine) is None and "OMP_WAIT_POLICY" not in mine
