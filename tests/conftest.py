"""Shared fixtures: a tiny synthetic dataset rendered once per test session.

The package is tested as installed (``./setup.sh`` installs it editable), so no path hacks.
"""

import pytest
import yaml

from dsparse.data.shards import write_synthetic_dataset


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
