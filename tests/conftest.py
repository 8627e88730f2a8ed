"""Shared fixtures: a tiny synthetic dataset rendered once per test session.

The package is tested as installed (``./setup.sh`` installs it editable), so no path hacks.
"""

import pytest

from dsparse.data.shards import write_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """48 train samples in 8 shards of 6, 16 val samples in 3 shards (6, 6, 4); 32x32 images."""
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(out, num_train=48, num_val=16, size=32, seed=0, shard_size=6, num_procs=2,
                            progress=False)
    return out
