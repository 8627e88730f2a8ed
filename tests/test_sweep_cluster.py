"""A two-node Ray cluster on this machine (``ray start`` head + a second node): one trial's
two workers must land on different nodes and train together."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head and a worker node with 2 CPUs each, in their own temp dir; torn down by killing
    exactly the processes of that temp dir (``ray stop`` would kill every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                        f"--temp-dir={temp_dir}"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address={address}", "--num-cpus=2"], env=env, check=True,
                       capture_output=True, timeout=120)
        yield address
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if temp_dir in " ".join(process.info["cmdline"] or []):
                process.kill()
        time.sleep(1)


def test_a_trial_spans_both_nodes(two_node_cluster, tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    # 1.5 CPUs a worker: a 2-CPU node holds one, so the two workers need both nodes
    spec_path = tiny_spec(grid={"seed": [0]}, resources={"workers": 2, "cpus_per_worker": 1.5})
    # The CLI in its own process, as a user runs it (and apart from this process's Ray state)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run([str(Path(sys.executable).with_name("dsparse")), "sweep", str(spec_path),
                             "--address", two_node_cluster, "--out", str(tmp_path / "sweep")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "complete" in result.stdout
    (placement_file,) = (tmp_path / "sweep" / "trials").glob("*/workers.json")
    placement = json.loads(placement_file.read_text())
    assert [worker["rank"] for worker in placement] == [0, 1]
    assert placement[0]["node_id"] != placement[1]["node_id"], "both workers ran on one node"
    summary = json.loads(next((tmp_path / "sweep" / "trials").glob("*/summary.json")).read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
