"""The one dataset writer: samples in, WebDataset tar shards plus ``manifest.json`` out.

The synthetic generator and every converter call :func:`write_dataset`. It encodes each
label with its task's :class:`~dsparse.tasks.labels.LabelSpec`, which refuses values the
encoding would damage, and writes shards in parallel processes. Why it is built this way:

* **Resumable.** Samples are dealt to shards by a plan fixed before anything is written
  (``.dsparse-writing/plan.json``); a shard is published by an atomic rename and then
  recorded with its statistics. A killed write, run again, keeps every recorded shard and
  rewrites the rest, and the result is byte-identical to an uninterrupted write.
* **Nothing half-written.** Shards and the manifest appear under their real names only
  when complete; ``manifest.json`` is written last, so its presence means "complete".
* **Sized for streaming.** ``shard_size`` is a byte target (``"512MB"``) converted to a
  sample count from the encoded size of the first samples, or a plain sample count.
  Small splits get smaller shards so that at least ``min_shards`` readers (ranks x
  workers) each have one.
* **Bad samples are named.** A sample that cannot be loaded or encoded stops the write
  with one line naming its key and the reason (``on_error="stop"``), or is skipped,
  counted and listed in the manifest (``"skip"``).

Layout::

    manifest.json          written last
    train-000000.tar       <key>.rgb.<ext>, <key>.<task>.<ext> for each task; <ext> is the
                           codec's (png, zst, jpg: :mod:`dsparse.data.codecs`)
    ...
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tarfile
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsparse.data.codecs import DatasetCodec
from dsparse.data.manifest import MANIFEST_NAME, NAME_PATTERN, Manifest, ShardInfo, SplitInfo
from dsparse.io import atomic_path, write_text_atomic
from dsparse.locks import holding_lock
from dsparse.progress import ProgressMeter
from dsparse.tasks.labels import IGNORE_INDEX, RGB, ClassLabel, DepthLabel, LabelError, LabelSpec

log = logging.getLogger("dsparse.data")

STATE_DIR = ".dsparse-writing"
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|KIB|MIB|GIB)\s*$", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
_PROBE_SAMPLES = 8
DEFAULT_CODEC = DatasetCodec(labels="zstd")  # bench_data.py: several times PNG's decode speed, similar size
_TAR_BLOCK = 512


class DatasetWriteError(ValueError):
    """A write that cannot go on; the message names the sample or file and the fix."""


@dataclass
class DatasetInfo:
    """What the writer needs to know besides the samples.

    Attributes:
        name: dataset name recorded in the manifest.
        tasks: the tasks every sample has a label for (registered task names).
        classes: segmentation class names in id order (required with ``seg``).
        encodings: per-task label-spec parameters, e.g. ``{"depth": {"scale": 512}}``.
        class_pixel_frequency: known class frequencies; computed from the train split if None.
        class_weights: per-class loss weights the dataset ships (e.g. Taskonomy's prior).
        skipped: sources a converter skipped before writing (e.g. missing buildings), each
            ``{"split", "key", "error"}``; listed in the manifest with the skipped samples.
        source: provenance recorded in the manifest (converter, version, source, options).
    """

    name: str
    tasks: list[str]
    classes: list[str] = field(default_factory=list)
    encodings: dict[str, dict] = field(default_factory=dict)
    class_pixel_frequency: list[float] | None = None
    class_weights: list[float] | None = None
    skipped: list[dict] = field(default_factory=list)
    source: dict = field(default_factory=dict)


def parse_shard_size(value: int | str) -> tuple[str, int]:
    """``"512MB"`` -> ``("bytes", 512000000)``; ``200`` or ``"200"`` -> ``("samples", 200)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"shard size must be >= 1 sample, got {value}")
        return "samples", value
    text = str(value).strip()
    if text.isdigit() and int(text) >= 1:
        return "samples", int(text)
    match = _SIZE_PATTERN.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"shard size {value!r} is neither a sample count (e.g. 200) nor a size "
                         "(e.g. 512MB, 1GB, 256MiB)")
    return "bytes", int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# ------------------------------------------------------------------ one sample
@dataclass
class _Encoder:
    """Turns one sample's arrays into checked shard members (picklable, sent to workers)."""

    tasks: list[str]
    specs: dict[str, LabelSpec]
    num_classes: int | None
    image_size: tuple[int, int] | None
    codec: DatasetCodec = field(default_factory=DatasetCodec)

    def members(self, key: str, arrays: Mapping[str, np.ndarray]) -> tuple[list[tuple[str, bytes]], dict]:
        """``[(member name, bytes)]`` and the sample's statistics; raises LabelError naming the
        entry (and its source file, when the sample carries ``"__files__": {entry: path}``)."""
        if not isinstance(arrays, Mapping):
            raise LabelError(f"a sample must be a dict of arrays, got {type(arrays).__name__}")
        files = arrays.get("__files__") or {}
        arrays = {name: value for name, value in arrays.items() if not name.startswith("__")}
        expected = ["rgb", *self.tasks]
        if sorted(arrays) != sorted(expected):
            missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
            raise LabelError(f"has entries {sorted(arrays)}; expected {expected}"
                             + (f" (missing {missing})" if missing else "") + (f" (extra {extra})" if extra else ""))
        rgb = _entry("rgb", files, RGB.to_stored, arrays["rgb"])
        size = tuple(rgb.shape[:2])
        if self.image_size is not None and size != tuple(self.image_size):
            raise LabelError(f"rgb{_source(files, 'rgb')} is {size[0]}x{size[1]}, the dataset's images are "
                             f"{self.image_size[0]}x{self.image_size[1]}; resize it (nearest for labels)")
        members = [self._member(key, "rgb", rgb)]
        unit = rgb.reshape(-1, 3).astype(np.float64) / 255
        stats = {"rgb_sum": unit.sum(0), "rgb_sq": (unit**2).sum(0), "pixels": unit.shape[0]}
        for task in self.tasks:
            array, spec = np.asarray(arrays[task]), self.specs[task]
            if array.shape[:2] != size:
                raise LabelError(f"label {task!r}{_source(files, task)} is "
                                 f"{'x'.join(str(n) for n in array.shape[:2])}, the image is {size[0]}x{size[1]}")
            members.append(self._member(key, task, _entry(task, files, spec.to_stored, array, self.num_classes)))
            if isinstance(spec, ClassLabel):
                ids = array[array != spec.ignore].astype(np.int64).ravel()
                stats["class_counts"] = np.bincount(ids, minlength=self.num_classes)
            elif isinstance(spec, DepthLabel) and (array > 0).any():
                stats["depth_range"] = (float(array[array > 0].min()), float(array.max()))
        return members, stats


    def _member(self, key: str, entry: str, stored: np.ndarray) -> tuple[str, bytes]:
        codec = self.codec.codec(entry)
        return f"{key}.{entry}.{codec.extension}", codec.pack(stored)


def _source(files: Mapping[str, str], entry: str) -> str:
    return f" ({files[entry]})" if entry in files else ""


def _entry(name: str, files: Mapping[str, str], function: Callable, *args):
    try:
        return function(*args)
    except LabelError as error:
        raise LabelError(f"{name!r}{_source(files, name)}: {error}") from None


# ------------------------------------------------------------------- one shard
@dataclass
class _ShardJob:
    out_dir: str
    split: str
    name: str
    samples: list[tuple[str, Any]]
    encoder: _Encoder
    load: Callable[[Any], dict] | None
    on_error: str


class _ShardStats:
    """Sums over a shard's samples, kept in its record so a resumed write needs no re-read."""

    def __init__(self, num_classes: int | None) -> None:
        self.num_samples, self.skipped = 0, []
        self.rgb_sum, self.rgb_sq, self.pixels = np.zeros(3), np.zeros(3), 0
        self.class_counts = np.zeros(num_classes or 0, dtype=np.int64)
        self.depth_range: list[float] | None = None

    def add(self, stats: dict) -> None:
        self.num_samples += 1
        self.rgb_sum += stats["rgb_sum"]
        self.rgb_sq += stats["rgb_sq"]
        self.pixels += stats["pixels"]
        if "class_counts" in stats:
            self.class_counts += stats["class_counts"][: self.class_counts.size]
        if "depth_range" in stats:
            low, high = stats["depth_range"]
            self.depth_range = [min(low, self.depth_range[0]), max(high, self.depth_range[1])] \
                if self.depth_range else [low, high]

    def record(self, name: str, num_bytes: int) -> dict:
        return {"name": name, "num_samples": self.num_samples, "num_bytes": num_bytes,
                "skipped": self.skipped, "rgb_sum": self.rgb_sum.tolist(), "rgb_sq": self.rgb_sq.tolist(),
                "pixels": self.pixels, "class_counts": self.class_counts.tolist(),
                "depth_range": self.depth_range}


_progress_sink: Callable[[int], None] | None = None  # counts finished samples, in any process


def _init_worker(queue, parent_pid: int) -> None:
    global _progress_sink
    _progress_sink = queue.put
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this worker process when its parent dies (Linux): after a
    ``kill -9`` of the parent, pool workers would otherwise keep encoding shards for nobody,
    and keep multiprocessing's resource tracker alive, for as long as the work lasts."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


class _EmptyShard(Exception):
    """Every sample of a shard was skipped: publish no file."""


def _write_shard(job: _ShardJob) -> dict:
    """Load, check and encode a shard's samples into one tar; return its record.

    Raises DatasetWriteError (one line, naming the sample) for a bad sample under
    ``on_error="stop"``; the partial tar is removed by ``atomic_path``.
    """
    stats = _ShardStats(job.encoder.num_classes)
    path = Path(job.out_dir) / job.name
    try:
        with atomic_path(path) as temporary:
            with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, item in sorted(job.samples, key=lambda pair: pair[0]):
                    members = _sample_members(job, key, item, stats)
                    for member, data in members:
                        _add_member(tar, member, data)
                    if _progress_sink is not None:
                        _progress_sink(1)
            if stats.num_samples == 0:
                raise _EmptyShard
    except _EmptyShard:
        path.unlink(missing_ok=True)  # a same-named tar of an earlier attempt
        return stats.record(job.name, 0)
    except OSError as error:
        raise DatasetWriteError(f"cannot write shard {path} ({error.strerror or error}); check the free space "
                                "and permissions, then rerun to resume") from None
    return stats.record(job.name, path.stat().st_size)


def _sample_members(job: _ShardJob, key: str, item, stats: _ShardStats) -> list[tuple[str, bytes]]:
    """One sample's members, added to ``stats``; ``[]`` for a skipped bad sample."""
    try:
        arrays = job.load(item) if job.load is not None else item
        members, sample_stats = job.encoder.members(key, arrays)
    except Exception as error:  # a converter's read error or a LabelError alike
        reason = (str(error).strip().splitlines() or [""])[0]
        if not isinstance(error, (LabelError, OSError, ValueError)) or not reason:
            reason = f"{type(error).__name__}: {reason}"
        if job.on_error != "skip":
            raise DatasetWriteError(f"{job.split} sample {key!r}: {reason}; fix or remove it, or skip bad "
                                    "samples (on_error='skip'; --on-error skip of dsparse data convert)") from None
        stats.skipped.append({"split": job.split, "key": key, "error": reason})
        return []
    stats.add(sample_stats)
    return members


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed member metadata, so a shard's bytes depend on its content only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


# -------------------------------------------------------------------- progress
class _Progress(ProgressMeter):
    """A ProgressMeter fed with the sample counts worker processes put on a queue."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        super().__init__(label, total, "samples", enabled=enabled)

    def drain(self, queue, stop: threading.Event) -> None:
        while not stop.is_set() or not queue.empty():
            try:
                self.add(queue.get(timeout=0.2))
            except Exception:  # queue.Empty, or a closed queue at shutdown
                continue


# ------------------------------------------------------------------- the plan
def _check_splits(splits: Mapping[str, Sequence]) -> None:
    if not splits:
        raise ValueError("no splits to write")
    for split, samples in splits.items():
        if not NAME_PATTERN.match(split):
            raise ValueError(f"split {split!r} must be letters, digits and '_' (it prefixes shard names)")
        keys = [key for key, _ in samples]
        bad = [k for k in keys if not isinstance(k, str) or not NAME_PATTERN.match(k)]
        if bad:
            raise ValueError(f"{split} sample key {bad[0]!r} must be non-empty letters, digits and '_' "
                             "(no dots or slashes: webdataset splits names at the first dot)")
        if len(set(keys)) != len(keys):
            duplicate = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"{split} sample key {duplicate!r} occurs more than once; keys must be unique")
        if not keys:
            raise ValueError(f"split {split!r} has no samples")


def _fingerprint(info: DatasetInfo, splits: Mapping[str, Sequence], load, settings: list) -> str:
    """What a resumed write must share with the first attempt: the dataset description,
    every key and source item (file paths; in-memory arrays by their bytes), the loader
    function and its arguments, and the shard settings."""
    digest = hashlib.sha256()

    def add(value) -> None:
        data = value if isinstance(value, bytes) else repr(value).encode()
        digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no ambiguous joins

    add(json.dumps([dataclasses.asdict(info), [str(v) for v in settings]], sort_keys=True, default=str))
    add(_describe_function(load))
    for split in sorted(splits):
        add(split)
        for key, item in splits[split]:
            add(key)
            add(_item_bytes(item))
    return digest.hexdigest()


def _describe_function(function) -> str:
    if function is None:
        return "None"
    if isinstance(function, functools.partial):
        return f"{_describe_function(function.func)}{function.args!r}{sorted(function.keywords.items())!r}"
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(function))}"


def _item_bytes(item) -> bytes:
    if isinstance(item, Mapping):
        return b"".join(str(k).encode() + b"\0" + _item_bytes(v) for k, v in sorted(item.items(), key=str))
    if isinstance(item, np.ndarray):
        return str((item.dtype, item.shape)).encode() + np.ascontiguousarray(item).tobytes()
    return repr(item).encode()


def _probe(splits, load, encoder: _Encoder) -> tuple[tuple[int, int], float]:
    """Image size and encoded bytes per sample, from the first samples that encode."""
    sizes, image_size, errors = [], encoder.image_size, []
    for split, samples in splits.items():
        for key, item in samples[:_PROBE_SAMPLES]:
            try:
                arrays = load(item) if load is not None else item
                probe = dataclasses.replace(encoder, image_size=image_size)
                members, _ = probe.members(key, arrays)
            except Exception as error:
                errors.append(f"{split} sample {key!r}: {(str(error).splitlines() or [''])[0]}")
                continue
            if image_size is None:
                image_size = tuple(np.asarray(arrays["rgb"]).shape[:2])
            sizes.append(sum(_TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK for _, data in members))
            if len(sizes) >= _PROBE_SAMPLES:
                return image_size, float(np.mean(sizes))
    if not sizes:
        raise DatasetWriteError(f"none of the first samples can be written: {errors[0]}")
    return image_size, float(np.mean(sizes))


def _samples_per_shard(shard_size, num_samples: int, bytes_per_sample: float, min_shards: int) -> int:
    kind, amount = parse_shard_size(shard_size)
    if kind == "samples":
        return amount
    by_bytes = max(1, int(amount // max(bytes_per_sample, 1)))
    return max(1, min(by_bytes, math.ceil(num_samples / min_shards)))


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".{STATE_DIR}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DatasetWriteError(f"cannot write to {out_dir} ({error.strerror or error}); "
                                "choose a directory you can write to") from None


def _prepare_directory(out_dir: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """Check the (locked) output directory; return a matching unfinished plan, if any."""
    for leftover in out_dir.glob(".*.tmp"):  # from a write that was killed or stopped mid-shard
        leftover.unlink()
    state, manifest_path = out_dir / STATE_DIR, out_dir / MANIFEST_NAME
    if overwrite:
        _discard(out_dir)
    elif manifest_path.exists():
        raise DatasetWriteError(f"{out_dir} already holds a dataset ({MANIFEST_NAME}); choose another "
                                "directory, or overwrite it (--overwrite)")
    elif (state / "plan.json").is_file():
        plan = json.loads((state / "plan.json").read_text())
        if plan.get("fingerprint") != fingerprint:
            raise DatasetWriteError(f"{out_dir} holds an unfinished write of different data or settings; "
                                    "rerun that command to finish it, use another directory, or discard it "
                                    "(--overwrite)")
        return plan
    elif any(not p.name.startswith(".") for p in out_dir.iterdir()):
        raise DatasetWriteError(f"{out_dir} is not empty and holds no dataset; write into an empty or new "
                                "directory, or overwrite it (--overwrite)")
    return None


def _discard(out_dir: Path) -> None:
    """Remove a dataset or unfinished write: the manifest first (the directory must not look
    complete while shards go), then the write state and every shard-named tar."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
    for path in out_dir.iterdir():
        if _SHARD_NAME.match(path.name):
            path.unlink()


# ------------------------------------------------------------------ the write
def write_dataset(
    out_dir: str | Path,
    splits: Mapping[str, Sequence[tuple[str, Any]]],
    info: DatasetInfo,
    *,
    load: Callable[[Any], dict] | None = None,
    shard_size: int | str = "512MB",
    min_shards: int = 64,
    workers: int = 1,
    on_error: str = "stop",
    progress: bool = True,
    overwrite: bool = False,
    codec: DatasetCodec | None = None,
) -> Manifest:
    """Write ``splits`` as a dsparse dataset in ``out_dir``; rerun to resume a killed write.

    Args:
        out_dir: a new or empty directory, or one holding an unfinished write of the same
            samples and settings (which is resumed).
        splits: split name -> ``[(key, item), ...]``. Keys are unique letters, digits
            and ``_``; an item is a sample (``{"rgb": array, task: array, ...}``) or,
            with ``load``, whatever ``load`` turns into one (e.g. file paths).
        info: dataset name, tasks, classes, encodings and provenance.
        load: a picklable function run in the worker processes; its exceptions are the
            sample's errors (name the file in them).
        shard_size: a byte target (``"512MB"``) or samples per shard (``200``).
        min_shards: with a byte target, splits get at least this many shards when they
            have enough samples, so small datasets still feed every reader.
        workers: processes that load and encode shards (1 = this process).
        on_error: ``"stop"`` at the first bad sample, or ``"skip"`` and record it.
        progress: print samples/s and ETA to stderr.
        overwrite: replace a dataset or unfinished write already in ``out_dir``.
        codec: how stored arrays become shard members (default :data:`DEFAULT_CODEC`:
            zstd-compressed raw arrays); recorded in the manifest.

    Returns:
        The manifest, also written to ``out_dir/manifest.json``.

    Raises:
        ValueError: bad arguments. DatasetWriteError: a bad sample (``on_error="stop"``),
            an unwritable or occupied directory; shards finished so far are kept. ValueError:
            another process is writing into ``out_dir`` (a lock on ``out_dir/.lock``).
    """
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    parse_shard_size(shard_size)
    _check_splits(splits)
    specs = _specs(info)
    out_dir = Path(out_dir)
    codec = DEFAULT_CODEC if codec is None else codec
    fingerprint = _fingerprint(info, splits, load, [shard_size, min_shards, on_error, codec.to_manifest()])
    _check_writable(out_dir)
    with holding_lock(out_dir, "dataset directory", "wait for that write to finish (rerun this command then to "
                      "resume or check it), or write into another directory", remove_when_done=True):
        plan = _prepare_directory(out_dir, fingerprint, overwrite)
        encoder = _Encoder(list(info.tasks), specs, len(info.classes) or None, None, codec)
        if plan is None:
            image_size, bytes_per_sample = _probe(splits, load, encoder)
            plan = {"fingerprint": fingerprint, "image_size": list(image_size),
                    "samples_per_shard": {split: _samples_per_shard(shard_size, len(samples), bytes_per_sample,
                                                                    min_shards)
                                          for split, samples in splits.items()}}
            write_text_atomic(out_dir / STATE_DIR / "plan.json", json.dumps(plan, indent=2))
        encoder.image_size = tuple(plan["image_size"])
        jobs = [
            _ShardJob(str(out_dir), split, f"{split}-{index:06d}.tar", list(samples[start:start + per_shard]),
                      encoder, load, on_error)
            for split, samples in splits.items()
            for per_shard in [plan["samples_per_shard"][split]]
            for index, start in enumerate(range(0, len(samples), per_shard))
        ]
        records = _run_jobs(out_dir, jobs, workers, progress, label=info.name)
        manifest = _manifest(info, specs, plan, jobs, records, codec)
        write_text_atomic(out_dir / MANIFEST_NAME, manifest.to_json())
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
        return manifest


def _specs(info: DatasetInfo) -> dict[str, LabelSpec]:
    from dsparse.tasks import TASKS

    unknown = [t for t in info.tasks if t not in TASKS]
    if unknown or not info.tasks:
        raise ValueError(f"tasks {info.tasks} must be registered tasks: {sorted(TASKS)}")
    if "seg" in info.tasks and not info.classes:
        raise ValueError("a dataset with 'seg' labels needs its class names (classes)")
    if len(info.classes) > IGNORE_INDEX:
        raise ValueError(f"{len(info.classes)} classes; at most {IGNORE_INDEX} fit the 8-bit class label "
                         f"({IGNORE_INDEX} = ignore)")
    extra = sorted(set(info.encodings) - set(info.tasks))
    if extra:
        raise ValueError(f"encodings given for task(s) {extra} the dataset does not have")
    try:
        return {task: TASKS[task].label.with_params(info.encodings.get(task, {})) for task in info.tasks}
    except LabelError as error:
        raise ValueError(f"encodings: {error}") from None


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / STATE_DIR / f"{name}.json"


def _run_jobs(out_dir: Path, jobs: list[_ShardJob], workers: int, progress: bool, label: str) -> dict[str, dict]:
    """Write the shards not yet recorded; return every shard's record by name."""
    records, todo = {}, []
    for job in jobs:
        record = _recorded(out_dir, job.name)
        if record is not None:
            records[job.name] = record
        else:
            todo.append(job)
    total = sum(len(job.samples) for job in todo)
    counter = _Progress(total, label, progress and total > 0)
    if progress and records:
        log.info("%s: resuming, %d of %d shards already written", label, len(records), len(jobs))
    if workers == 1 or len(todo) <= 1:
        global _progress_sink
        _progress_sink = counter.add
        try:
            for job in todo:
                records[job.name] = _publish(out_dir, _write_shard(job))
        finally:
            _progress_sink = None
        return records
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    stop = threading.Event()
    drainer = threading.Thread(target=counter.drain, args=(queue, stop), daemon=True)
    drainer.start()
    executor = ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_init_worker,
                                   initargs=(queue, os.getpid()))
    finished = False
    try:
        futures = [executor.submit(_write_shard, job) for job in todo]
        for future in as_completed(futures):
            record = future.result()
            records[record["name"]] = _publish(out_dir, record)
        finished = True
    except BrokenProcessPool:
        raise DatasetWriteError(f"a worker process died while writing {out_dir} (out of memory, or killed); "
                                "finished shards are kept: rerun the same command to resume, with fewer "
                                "workers if memory ran out") from None
    finally:
        if not finished:  # stop the other shards now; their partial files are removed on the rerun
            for process in list(getattr(executor, "_processes", {}).values()):
                process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        stop.set()
        drainer.join()
    return records


def _recorded(out_dir: Path, name: str) -> dict | None:
    """A shard's record, if it was written and its file is still the one recorded."""
    path = _record_path(out_dir, name)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    shard = out_dir / name
    if record["num_samples"] and (not shard.is_file() or shard.stat().st_size != record["num_bytes"]):
        path.unlink()
        return None
    return record


def _publish(out_dir: Path, record: dict) -> dict:
    """Record a written shard (after its tar is in place) and report its skipped samples."""
    write_text_atomic(_record_path(out_dir, record["name"]), json.dumps(record))
    for skipped in record["skipped"]:
        log.warning("skipped %s sample %r: %s", skipped["split"], skipped["key"], skipped["error"])
    return record


def _manifest(info: DatasetInfo, specs: dict[str, LabelSpec], plan: dict, jobs: list[_ShardJob],
              records: dict[str, dict], codec: DatasetCodec) -> Manifest:
    splits: dict[str, SplitInfo] = {}
    for job in jobs:
        record = records[job.name]
        split = splits.setdefault(job.split, SplitInfo([]))
        if record["num_samples"]:
            split.shards.append(ShardInfo(job.name, record["num_samples"], record["num_bytes"]))
    empty = [name for name, split in splits.items() if not split.shards]
    if empty:
        raise DatasetWriteError(f"split(s) {empty} have no usable sample (all were skipped); see the errors above")
    stats_split = "train" if "train" in splits else sorted(splits)[0]
    stats = [records[job.name] for job in jobs if job.split == stats_split]
    pixels = sum(r["pixels"] for r in stats)
    mean = np.sum([r["rgb_sum"] for r in stats], axis=0) / max(pixels, 1)
    variance = np.sum([r["rgb_sq"] for r in stats], axis=0) / max(pixels, 1) - mean**2
    std = np.sqrt(np.maximum(variance, 0))
    frequency = info.class_pixel_frequency
    if frequency is None and info.classes:
        counts = np.sum([r["class_counts"] for r in stats], axis=0)
        frequency = (counts / max(counts.sum(), 1)).tolist()
    ranges = [r["depth_range"] for r in stats if r["depth_range"]]
    extra = {"depth_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)]} if ranges else {}
    manifest = Manifest(
        name=info.name, image_size=tuple(plan["image_size"]), tasks=list(info.tasks),
        encodings={task: spec.manifest_entry() for task, spec in specs.items()}, splits=splits,
        classes=list(info.classes), class_pixel_frequency=frequency, class_weights=info.class_weights,
        rgb_mean=tuple(float(v) for v in mean), rgb_std=tuple(float(max(v, 1e-3)) for v in std),
        source=dict(info.source),
        skipped=list(info.skipped) + [s for job in jobs for s in records[job.name]["skipped"]],
        stats={**extra, "stats_split": stats_split}, codec=codec.to_manifest(),
    )
    manifest.validate()
    return manifest


__all__ = ["DEFAULT_CODEC", "DatasetInfo", "DatasetWriteError", "STATE_DIR", "parse_shard_size", "write_dataset"]
