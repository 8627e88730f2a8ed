"""Write datasets as WebDataset tar shards plus a ``manifest.json``, and read the manifest.

Why shards: training streams samples from a few large sequential files that split evenly
across nodes and dataloader workers, and the same layout serves the synthetic generator
and the converters for real datasets (``write_shards`` is the shared half).

Layout of a dataset directory::

    manifest.json          written last: its presence means the dataset is complete
    train-000000.tar       <key>.rgb.png, <key>.seg.png, ... (see ``codec.FILE_OF``)
    ...
    val-000000.tar

Every file is written to ``<name>.tmp`` and renamed into place, so a killed run leaves
either finished files or ``.tmp`` leftovers, never a truncated shard under a real name,
and never a manifest that describes shards that do not exist. Tars are byte-identical
across runs (sorted keys, fixed member order, zero timestamps and owners).
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dsparse.data import codec
from dsparse.io import atomic_path, write_bytes_atomic
from dsparse.data.synth import CLASSES, TASK_ENTRIES, render_scene

MANIFEST_NAME = "manifest.json"
FORMAT = "dsparse-webdataset"
VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_REQUIRED_KEYS = ("format", "version", "image_size", "tasks", "classes", "ignore_index", "splits")
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")  # webdataset splits keys at the first dot


def _hint(data_dir) -> str:
    return (f"run `dsparse data synth --out {data_dir}` to write a synthetic dataset there, "
            "or point to a directory written by a dsparse converter")


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


# ------------------------------------------------------------------------- writing
def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _encode_sample(key: str, arrays: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} must be non-empty letters, digits and '_' "
                         "(no dots or slashes: webdataset splits names at the first dot)")
    unknown = sorted(set(arrays) - set(codec.FILE_OF))
    if unknown or "rgb" not in arrays:
        raise ValueError(f"sample {key!r} has entries {sorted(arrays)}; it needs 'rgb' and may "
                         f"only hold {list(codec.FILE_OF)} (drop extras such as {unknown})")
    return [(f"{key}.{codec.FILE_OF[entry]}", codec.encode(entry, arrays[entry]))
            for entry in codec.FILE_OF if entry in arrays]


def write_shards(out_dir: str | Path, split: str,
                 samples: Iterable[tuple[str, dict[str, np.ndarray]]], shard_size: int) -> list[dict]:
    """Write ``(key, arrays)`` samples, in order, into ``<split>-NNNNNN.tar`` shards.

    Args:
        out_dir: dataset directory (created if missing).
        split: split name used as the shard prefix, e.g. ``"train"``.
        samples: keys must increase (shards are sorted) and may hold only letters, digits
            and ``_``; arrays are keyed by ``codec.FILE_OF`` entries and must include
            ``rgb``. Entries a dataset lacks are simply absent.
        shard_size: samples per shard; the last shard may be smaller.

    Returns:
        ``[{"name": "train-000000.tar", "num_samples": n}, ...]``, one per shard written.

    Raises:
        ValueError: for a bad split name, shard size, key, key order or entry.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not _KEY_PATTERN.match(split):
        raise ValueError(f"split {split!r} must be letters, digits and '_' (it prefixes shard names)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    previous_key = None
    samples = iter(samples)
    while (first := next(samples, None)) is not None:
        name, num_samples = f"{split}-{len(shards):06d}.tar", 0
        # streams sample by sample; an error mid-shard leaves no partial file behind
        with atomic_path(out_dir / name) as temporary, tarfile.open(temporary, "w",
                                                                    format=tarfile.USTAR_FORMAT) as tar:
            for key, arrays in itertools.chain([first], itertools.islice(samples, shard_size - 1)):
                if previous_key is not None and key <= previous_key:
                    raise ValueError(f"sample keys must increase: {key!r} after {previous_key!r}")
                previous_key = key
                for member, data in _encode_sample(key, arrays):
                    _add_member(tar, member, data)
                num_samples += 1
        shards.append({"name": name, "num_samples": num_samples})
    return shards


# ------------------------------------------------------------ synthetic generation
class _LabelStats:
    """Running class pixel counts and depth range over the samples that stream past."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(CLASSES), dtype=np.int64)
        self.depth_min, self.depth_max = np.inf, -np.inf

    def watch(self, samples: Iterable[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
        for key, arrays in samples:
            seg = arrays["seg"]
            self.counts += np.bincount(seg[seg != codec.IGNORE_INDEX].ravel(),
                                       minlength=len(CLASSES))[: len(CLASSES)]
            valid = arrays["depth"][arrays["depth"] > 0]
            if valid.size:
                self.depth_min = min(self.depth_min, float(valid.min()))
                self.depth_max = max(self.depth_max, float(valid.max()))
            yield key, arrays


class _Progress:
    """A line on stderr every few seconds with images/s and the time left."""

    def __init__(self, total: int, enabled: bool, every: float = 5.0) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def watch(self, samples: Iterable, label: str) -> Iterator:
        for sample in samples:
            yield sample
            self.done += 1
            now = time.perf_counter()
            if self.enabled and (now - self.last >= self.every or self.done == self.total):
                self.last = now
                rate = self.done / max(now - self.start, 1e-9)
                print(f"[dsparse synth] {label}: {self.done}/{self.total} images, "
                      f"{rate:.0f} img/s, ETA {(self.total - self.done) / rate:.0f} s",
                      file=sys.stderr, flush=True)


def _render_sample(job: tuple[int, int]) -> dict[str, np.ndarray]:
    """Pool worker: render one scene and keep only the entries stored in shards."""
    seed, size = job
    arrays = render_scene(seed, size)
    return {entry: arrays[entry] for entry in codec.FILE_OF}


def write_synthetic_dataset(out_dir: str | Path, num_train: int = 4000, num_val: int = 500,
                            size: int = 64, seed: int = 0, shard_size: int = 250,
                            num_procs: int | None = None, progress: bool = True) -> dict:
    """Render procedural scenes (``synth.render_scene``) into a sharded dataset.

    Rendering runs in ``num_procs`` processes (default: all CPUs); results are consumed
    in order, so the output does not depend on the number of processes.

    Returns:
        The manifest dict, also written to ``out_dir/manifest.json``.

    Raises:
        ValueError: for non-positive counts, sizes or process numbers, or a negative seed.
    """
    if num_procs is None:
        num_procs = os.cpu_count() or 1
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 0), ("size", size, 8),
                             ("seed", seed, 0), ("shard_size", shard_size, 1), ("num_procs", num_procs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Remove an old manifest first: while shards are rewritten the directory must not
    # look complete.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    stats, progress_bar = _LabelStats(), _Progress(num_train + num_val, progress)
    pool = multiprocessing.get_context("spawn").Pool(num_procs) if num_procs > 1 else None
    try:
        splits = {}
        for split, count in (("train", num_train), ("val", num_val)):
            jobs = [(scene_seed(seed, split, i), size) for i in range(count)]
            rendered = pool.imap(_render_sample, jobs, chunksize=4) if pool else map(_render_sample, jobs)
            samples = progress_bar.watch(
                ((f"{split}_{i:08d}", arrays) for i, arrays in enumerate(rendered)), split)
            if split == "train":
                samples = stats.watch(samples)
            splits[split] = {"num_samples": count,
                             "shards": write_shards(out_dir, split, samples, shard_size)}
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    manifest = {
        "format": FORMAT, "version": VERSION, "name": "synthetic",
        "image_size": [size, size], "tasks": list(TASK_ENTRIES), "classes": list(CLASSES),
        "ignore_index": codec.IGNORE_INDEX, "encodings": dict(codec.ENCODING_DOC),
        "splits": splits,
        "class_pixel_frequency": (stats.counts / max(stats.counts.sum(), 1)).tolist(),
        "depth_range": [stats.depth_min, stats.depth_max],
        "generator": {"kind": "synthetic", "seed": seed, "size": size,
                      "scene_seed": "((seed * 3 + {train: 0, val: 1, test: 2}[split]) << 32) | index"},
    }
    write_bytes_atomic(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


# ------------------------------------------------------------------------- reading
def load_manifest(data_dir: str | Path) -> dict:
    """Read and sanity-check ``data_dir/manifest.json``.

    Raises:
        ValueError: if the manifest is missing (no dataset, or a write that did not
            finish), is not valid JSON, or lacks the fields of a dsparse dataset.
    """
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"no {MANIFEST_NAME} in {data_dir}: not a dsparse dataset, or its "
                         f"writing did not finish; {_hint(data_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {_hint(data_dir)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest; {_hint(data_dir)}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')!r}, this dsparse reads "
                         f"version {VERSION}; rewrite the dataset ({_hint(data_dir)})")
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    splits = manifest.get("splits")
    if missing or not isinstance(splits, dict) or not all(
            isinstance(s, dict) and isinstance(s.get("shards"), list) for s in splits.values()):
        raise ValueError(f"{path} is malformed (missing {missing or 'split shard lists'}); "
                         f"{_hint(data_dir)}")
    return manifest
