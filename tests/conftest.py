"""Shared fixtures: a tiny synthetic dataset rendered once per test session.

The package is tested as installed (``./setup.sh`` installs it editable), so no path hacks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

if not torch.cuda.is_available():  # Triton kernels run in Triton's CPU interpreter (set before Triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU (benchmarks/gpu_check.sh), dense references in full fp32: cuDNN and cuBLAS
# would otherwise use TF32, whose error exceeds the fp32 tolerances of the kernel tests.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

from dsparse.data.synth.dataset import write_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_png_dataset(tmp_path_factory):
    """The tiny dataset's val split (16 samples, 3 shards) in the PNG codec of the first datasets."""
    from dsparse.data.codecs import DatasetCodec

    out = tmp_path_factory.mktemp("synthetic-png")
    write_synthetic_dataset(out, num_train=48, num_val=16, size=32, seed=0, shard_size=6, num_procs=2,
                            progress=False, codec=DatasetCodec(labels="png"))
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """48 train samples in 8 shards of 6, 16 val samples in 3 shards (6, 6, 4); 32x32 images."""
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(out, num_train=48, num_val=16, size=32, seed=0, shard_size=6, num_procs=2,
                            progress=False)
    return out


@pytest.fixture
def tiny_spec(tiny_dataset, tmp_path):
    """Writes a sweep spec over the tiny dataset and model; ``overrides`` and other spec
    fields replace the defaults (1 worker, 4 steps, validation and checkpoint every 2)."""

    def write(name: str = "spec", overrides: dict | None = None, **fields):
        defaults = {"data.path": str(tiny_dataset), "data.batch_size": 4, "data.num_workers": 0,
                    "model.base_width": 4, "model.head_dilations": [1, 2], "train.iterations": 4,
                    "train.eval_interval": 2, "train.checkpoint_interval": 2, "train.log_interval": 2}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"base": "synthetic_tiny", "overrides": {**defaults, **(overrides or {})},
                                        "resources": {"workers": 1, "cpus_per_worker": 1}, **fields}))
        return path

    return write


@pytest.fixture
def torchrun_train(tmp_path):
    """Runs ``dsparse train`` on a config dict (absolute ``output_dir``) in ``nproc``
    processes under torchrun, a real multi-process launch; returns its summary.json."""

    def run(config: dict, nproc: int = 2, args: tuple = (), with_log: bool = False):
        path = tmp_path / "torchrun_config.yaml"
        path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "dsparse", "train", str(path), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("RANK", None)  # torchrun sets the ranks
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-4000:]
        summary_path = Path(config["output_dir"]) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        return (summary, completed.stderr) if with_log else summary

    return run
