"""The synthetic dataset: procedural scenes written through the one dataset writer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dsparse.data.manifest import Manifest
from dsparse.data.synth.render import TASK_ENTRIES, render_scene
from dsparse.data.synth.scene import CLASSES
from dsparse.data.codecs import DatasetCodec
from dsparse.data.writer import DatasetInfo, write_dataset

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def scene_seed(seed: int, split: str, index: int) -> int:
    """Seed of sample ``index`` of ``split``: distinct for every (seed, split, index).

    Packing the three into disjoint bit ranges (not hashing them) guarantees that train
    and val never share a scene, for any ``index < 2**32``.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_CODES)}")
    if not 0 <= index < 2**32 or seed < 0:
        raise ValueError(f"need seed >= 0 and 0 <= index < 2**32, got seed={seed}, index={index}")
    return ((seed * len(SPLIT_CODES) + SPLIT_CODES[split]) << 32) | index


def render_sample(job: tuple[int, int]) -> dict[str, np.ndarray]:
    """Worker: render one scene and keep the entries a dataset stores."""
    seed, size = job
    arrays = render_scene(seed, size)
    return {entry: arrays[entry] for entry in ("rgb", *TASK_ENTRIES)}


def write_synthetic_dataset(out_dir: str | Path, num_train: int = 4000, num_val: int = 500,
                            size: int = 64, seed: int = 0, shard_size: int | str = 250,
                            num_procs: int | None = None, progress: bool = True,
                            overwrite: bool = False, codec: DatasetCodec | None = None) -> Manifest:
    """Render procedural scenes (``synth.render_scene``) into a sharded dataset.

    Rendering runs in ``num_procs`` processes (default: all CPUs), one shard each; the
    output does not depend on the number of processes. ``codec`` packs the shard members
    (default: :data:`dsparse.data.writer.DEFAULT_CODEC`).

    Raises:
        ValueError: for non-positive counts, sizes or process numbers, or a negative seed.
    """
    if num_procs is None:
        num_procs = os.cpu_count() or 1
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 0), ("size", size, 8),
                             ("seed", seed, 0), ("num_procs", num_procs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    splits = {split: [(f"{split}_{i:08d}", (scene_seed(seed, split, i), size)) for i in range(count)]
              for split, count in (("train", num_train), ("val", num_val)) if count}
    info = DatasetInfo(
        name="synthetic", tasks=list(TASK_ENTRIES), classes=list(CLASSES),
        source={"converter": "synthetic", "seed": seed, "size": size,
                "scene_seed": "((seed * 3 + {train: 0, val: 1, test: 2}[split]) << 32) | index"})
    return write_dataset(out_dir, splits, info, load=render_sample, shard_size=shard_size,
                         workers=num_procs, progress=progress, overwrite=overwrite, codec=codec)
