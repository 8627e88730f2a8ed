"""Streaming multitask batches from WebDataset shards, split across ranks and workers.

Why not a plain ``wds.WebDataset``: data-parallel training deadlocks when one rank runs
out of batches while the others wait in an all-reduce, and WebDataset splits by shard,
so readers get unequal sample counts. Here every epoch gives every reader (one
dataloader worker of one rank) the *same* number of batches, computed from the manifest's
per-shard sample counts, and a run is a fixed number of steps over repeated epochs. The
stream is a pure function of ``(seed, epoch, reader)``, which makes two things exact:

* the position in the data is ``(epoch, batches consumed in the epoch)``, the same on all
  ranks, so ``--resume`` continues with the very next batch; and
* the split across readers is disjoint, with every shard read once per epoch.

Two shard modes (``DataConfig.resampled``):

* ``False`` (default): each epoch shuffles the shard list with ``(seed, epoch)`` and deals
  it round-robin to ``world_size * num_workers`` readers. Fewer shards than readers is a
  clear error at start-up (never a hang).
* ``True``: each reader draws shards with replacement from its own RNG and yields
  ``epoch_length / readers`` samples per epoch; works with any number of shards.
"""

from __future__ import annotations

import itertools
import logging
import random
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsparse.data.codecs import DatasetCodec
from dsparse.data.manifest import Manifest
from dsparse.data.records import SampleError, decode_sample, read_shard
from dsparse.data.resize import resize_image, resize_nearest
from dsparse.tasks.labels import RGB, LabelSpec

log = logging.getLogger(__name__)


@dataclass
class StreamSpec:
    """What one split's stream reads and how (everything a worker needs, picklable)."""

    data_dir: str
    split: str
    shards: list[dict]
    labels: dict[str, LabelSpec]
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    train: bool = True
    crop_size: int | None = None
    scale_range: tuple[float, float] | None = None
    flip: bool = True
    shuffle_buffer: int = 256
    resampled: bool = False
    epoch_length: int | None = None
    skip_bad: bool = False
    image_size: tuple[int, int] = (64, 64)
    num_classes: int | None = None
    rgb_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rgb_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    shard_url: str | None = None
    codec: DatasetCodec = field(default_factory=DatasetCodec)
    decode_device: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_readers(self) -> int:
        return self.world_size * max(1, self.num_workers)

    @property
    def tasks(self) -> list[str]:
        return list(self.labels)

    def url(self, shard: dict) -> str:
        """Where shard ``shard`` is read from: ``shard_url`` with ``{name}`` filled in, else
        the file in ``data_dir``. A ``pipe:`` command gets the name shell-quoted (the
        manifest already allows only ``split-NNNNNN.tar``; this holds if that ever widens)."""
        if self.shard_url:
            name = shlex.quote(shard["name"]) if self.shard_url.startswith("pipe:") else shard["name"]
            return self.shard_url.format(name=name)
        return str(Path(self.data_dir) / shard["name"])


def shards_of_reader(spec: StreamSpec, epoch: int, reader: int) -> list[dict]:
    """The shards reader ``reader`` reads in ``epoch`` (split mode)."""
    order = list(spec.shards)
    if spec.train:
        random.Random(f"{spec.seed}:{epoch}:shards").shuffle(order)
    return order[reader :: spec.num_readers]


def batches_per_reader(spec: StreamSpec) -> int:
    """Batches every reader yields per training epoch (identical for all readers)."""
    if spec.resampled:
        return max(1, spec.epoch_length // (spec.num_readers * spec.batch_size))
    return max(1, _fewest_samples_per_reader(spec) // spec.batch_size)


def _fewest_samples_per_reader(spec: StreamSpec) -> int:
    """Samples the worst-served reader gets in an epoch (split mode). Shard assignment
    changes per epoch, so this bounds every dealing: the reader with the fewest shards
    gets the smallest ones."""
    counts = sorted(s["num_samples"] for s in spec.shards)
    return sum(counts[: len(counts) // spec.num_readers])


def shuffle_buffer_bytes(spec: StreamSpec) -> int:
    """Memory one reader's shuffle buffer holds: it keeps samples undecoded, so about
    ``shuffle_buffer`` times the mean encoded sample size of the split's shards."""
    samples = sum(s["num_samples"] for s in spec.shards)
    per_sample = sum(s.get("num_bytes", 0) for s in spec.shards) / max(samples, 1)
    return int(spec.shuffle_buffer * per_sample) if spec.train and spec.shuffle_buffer > 1 else 0


def check_enough_shards(spec: StreamSpec) -> None:
    """Fail fast (instead of hanging) when split mode cannot feed every reader."""
    if spec.resampled or not spec.train:
        return
    if len(spec.shards) < spec.num_readers:
        raise ValueError(
            f"{spec.split} split has {len(spec.shards)} shard(s) but {spec.world_size} rank(s) x "
            f"{max(1, spec.num_workers)} worker(s) = {spec.num_readers} readers, and each reader needs "
            "at least one shard. Rewrite the dataset with smaller shards (--shard-size of dsparse data "
            "convert or synth), lower "
            "data.num_workers, or set data.resampled: true with data.epoch_length."
        )
    per_reader = _fewest_samples_per_reader(spec)
    if per_reader < spec.batch_size:
        raise ValueError(
            f"{spec.split} split: a reader may get only {per_reader} samples per epoch, fewer than "
            f"data.batch_size={spec.batch_size}; use smaller batches, fewer workers or more data"
        )


class ShardStream(IterableDataset):
    """Batches of one rank; each dataloader worker is one reader.

    Call :meth:`set_position` before iterating to choose the epoch and how many batches of
    it were already consumed (for resume).
    """

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self.epoch = 0
        self.consumed = 0

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        physical = info.id if info else 0
        # The DataLoader always asks worker 0 first; rotate roles so the first batch after a
        # resume comes from the reader that was next in line.
        logical = (physical + self.consumed) % num_workers
        reader = spec.rank * num_workers + logical
        skip_batches = 0
        if spec.train:
            skip_batches = self.consumed // num_workers + (1 if logical < self.consumed % num_workers else 0)
        if info is not None:
            torch.set_num_threads(1)  # workers decode; leave the cores to the trainer
        yield from self._batches(reader, skip_batches)

    def _batches(self, reader: int, skip_batches: int) -> Iterator[dict]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, self.epoch, reader])
        limit = batches_per_reader(spec) if spec.train else None
        batch, produced, skipped, num_bad = [], 0, 0, 0
        for raw in self._raw_samples(reader, rng):
            if skipped < skip_batches * spec.batch_size:  # resume: skip without decoding
                skipped += 1
                continue
            try:
                batch.append(decode_sample(raw, spec.labels, spec.codec, spec.image_size, spec.num_classes))
            except SampleError as error:
                if not spec.skip_bad:
                    raise
                lost = raw.get("__lost__", 1)  # a broken shard counts every sample it lost
                log.warning("skipping %d bad sample(s): %s", lost, error)
                num_bad += lost
                continue
            if len(batch) == spec.batch_size:
                yield self._collate(batch, reader, skip_batches + produced, num_bad)
                batch, produced, num_bad = [], produced + 1, 0
                if limit is not None and produced + skip_batches >= limit:
                    return
        if batch and not spec.train:
            yield self._collate(batch, reader, produced, num_bad)

    def _raw_samples(self, reader: int, rng: np.random.Generator) -> Iterator[dict]:
        """Undecoded samples, shuffled within one pass over the reader's shards.

        Training repeats passes until the batch limit ends the epoch; a second pass only
        happens when bad samples were skipped (the limit is computed from the manifest).
        """
        spec = self.spec
        shuffle = spec.train and spec.shuffle_buffer > 1
        while True:
            samples = self._one_pass(reader, rng)
            if shuffle:
                samples = _buffer_shuffle(samples, spec.shuffle_buffer, rng)
            count = 0
            for sample in samples:
                count += "__bad__" not in sample  # only readable samples make progress
                yield sample
            if not spec.train:
                return
            if count == 0:
                raise SampleError(f"reader {reader} of the {spec.split} split found no readable samples in "
                                  f"its shards; check them with `dsparse data check {spec.data_dir}` or rewrite "
                                  "the dataset")

    def _one_pass(self, reader: int, rng: np.random.Generator) -> Iterator[dict]:
        spec = self.spec
        if spec.resampled:  # endless draws with replacement; the batch limit ends the epoch
            misses = 0
            while True:
                shard = spec.shards[rng.integers(len(spec.shards))]
                good = 0
                for sample in read_shard(spec.url(shard), spec.skip_bad, shard["num_samples"]):
                    good += "__bad__" not in sample
                    yield sample
                misses = 0 if good else misses + 1
                if misses > 4 * len(spec.shards):  # with skip_bad, never spin on unreadable data
                    raise SampleError(f"{misses} shard draws in a row gave no readable sample; the "
                                      f"{spec.split} shards look unreadable")
        for shard in shards_of_reader(spec, self.epoch, reader):
            yield from read_shard(spec.url(shard), spec.skip_bad, shard["num_samples"])

    def _collate(self, samples: list[dict], reader: int, index: int, num_bad: int) -> dict:
        spec = self.spec
        if spec.train:
            # Augmentation draws from a per-batch RNG so skipped batches (resume) need no replay.
            rng = np.random.default_rng([spec.seed, self.epoch, reader, index, 1])
            fill = tuple(int(round(255 * m)) for m in spec.rgb_mean)
            samples = [augment(s, spec.labels, spec.crop_size, spec.flip, rng, spec.scale_range, fill)
                       for s in samples]
        batch = collate(samples, spec.labels)
        if spec.decode_device is None:
            batch = decode_batch(batch, spec.labels, spec.rgb_mean, spec.rgb_std)
        batch["__num_bad__"] = num_bad  # bad samples skipped while filling this batch
        return batch


def _buffer_shuffle(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = int(rng.integers(size))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def augment(sample: dict, labels: dict[str, LabelSpec], crop_size: int | None, flip: bool,
            rng: np.random.Generator, scale_range: tuple[float, float] | None = None,
            rgb_fill: tuple[int, int, int] = (128, 128, 128)) -> dict:
    """Random rescale, crop and horizontal flip of stored arrays, identical for the image
    and every label.

    Rescaling resizes the image bilinearly and labels by nearest neighbour (no invented
    classes or depths; label values are not changed). A crop larger than the rescaled
    image pads it: the image with ``rgb_fill`` (the dataset mean, 0 after normalisation),
    each label with its stored invalid value. Each label flips by its own rule (normals
    negate x).
    """
    height, width = sample["rgb"].shape[:2]
    arrays = {name: array for name, array in sample.items() if name != "__key__"}
    scaled = scale_range is not None
    if scaled:
        factor = float(rng.uniform(*scale_range))
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        arrays = {name: resize_image(array, size) if name == "rgb" else resize_nearest(array, size)
                  for name, array in arrays.items()}
        height, width = size
    if crop_size is not None and (scaled or crop_size < min(height, width)):
        if scaled and crop_size > min(height, width):
            fills = {name: rgb_fill if name == "rgb" else labels[name].stored_fill for name in arrays}
            arrays = {name: _pad(array, crop_size, fills[name]) for name, array in arrays.items()}
            height, width = arrays["rgb"].shape[:2]
        top = int(rng.integers(height - crop_size + 1))
        left = int(rng.integers(width - crop_size + 1))
        arrays = {name: array[top : top + crop_size, left : left + crop_size] for name, array in arrays.items()}
    if flip and bool(rng.integers(2)):
        arrays = {name: labels[name].flip_stored(array) if name in labels else array[:, ::-1]
                  for name, array in arrays.items()}
    return {"__key__": sample["__key__"], **arrays}


def _pad(array: np.ndarray, crop_size: int, fill) -> np.ndarray:
    height, width = array.shape[:2]
    out = np.empty((max(height, crop_size), max(width, crop_size), *array.shape[2:]), dtype=array.dtype)
    out[...] = np.asarray(fill, dtype=array.dtype)
    out[:height, :width] = array
    return out


def collate(samples: list[dict], labels: dict[str, LabelSpec]) -> dict:
    """Stack the samples' stored arrays (after augmentation: crops are views) into one
    array per entry, copied once, straight into the batch; decoded by :func:`decode_batch`.
    Stored batches are also what crosses from a loader worker to the trainer: 3-4x fewer
    bytes than float targets."""
    batch = {"__key__": [s["__key__"] for s in samples], "__stored__": True}
    for entry in ("rgb", *labels):
        batch[entry] = torch.from_numpy(np.stack([s[entry] for s in samples]))
    return batch


def decode_batch(batch: dict, labels: dict[str, LabelSpec], rgb_mean, rgb_std, device=None) -> dict:
    """A stored batch -> the inputs and targets the tasks expect, on ``device`` (default:
    where the batch is). One vectorised step per label (:meth:`LabelSpec.from_stored`);
    on a GPU the host sends the small integer arrays and the GPU converts them.

    The image is normalised with the dataset's per-channel statistics from the manifest
    and made contiguous NCHW: the permuted view is channels-last, which would carry through
    the network, and oneDNN's conv weight gradient corrupts the heap on some channels-last
    shapes (tests/data/test_loader.py)."""
    if not batch.get("__stored__"):
        return batch
    decoded = {name: value for name, value in batch.items() if name.startswith("__")}
    decoded["__stored__"] = False
    rgb = RGB.from_stored(_to_device(batch["rgb"], device))
    mean = torch.tensor(rgb_mean, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(rgb_std, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    decoded["rgb"] = rgb.sub_(mean).div_(std)
    for task, spec in labels.items():
        decoded[task] = spec.from_stored(_to_device(batch[task], device))
    return decoded


def _to_device(stored: torch.Tensor, device) -> torch.Tensor:
    """``stored`` on ``device``. uint16 has almost no kernels on the GPU: its bits travel as
    int16 and are widened to int32 there (exact)."""
    if device is None:
        return stored
    if stored.dtype == torch.uint16:
        return stored.view(torch.int16).to(device, non_blocking=True).to(torch.int32) & 0xFFFF
    return stored.to(device, non_blocking=True)


def make_loader(spec: StreamSpec) -> tuple[ShardStream, DataLoader]:
    """A ShardStream and the DataLoader over it (batching happens inside the workers)."""
    check_enough_shards(spec)
    stream = ShardStream(spec)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=spec.num_workers,
        prefetch_factor=4 if spec.num_workers else None,
        persistent_workers=False,
    )
    return stream, loader


class TrainBatches:
    """Endless training batches with an exact, checkpointable position.

    ``position()`` is ``{"epoch": e, "consumed": k}``; ``TrainBatches(..., position)``
    continues with batch ``k`` of epoch ``e``. Tracks samples/s and the time the trainer
    spent waiting for data.
    """

    def __init__(self, spec: StreamSpec, position: dict | None = None):
        self.spec = spec
        self.stream, self.loader = make_loader(spec)
        self.batches_per_epoch = batches_per_reader(spec) * max(1, spec.num_workers)
        position = position or {"epoch": 0, "consumed": 0, "num_readers": spec.num_readers}
        self.epoch, self.consumed = int(position["epoch"]), int(position["consumed"])
        saved_readers = position.get("num_readers", spec.num_readers)
        if saved_readers != spec.num_readers:
            log.warning("data position was saved with %d readers (ranks x workers), resuming with %d: the run "
                        "continues in epoch %d but not with the exact next batch", saved_readers,
                        spec.num_readers, self.epoch)
        buffer = shuffle_buffer_bytes(spec)
        if buffer:
            readers = max(1, spec.num_workers)
            log.info("shuffle buffer: %d samples = %.0f MB per reader, %.0f MB for this rank's %d reader(s)",
                     spec.shuffle_buffer, buffer / 1e6, buffer * readers / 1e6, readers)
        self._iterator = None
        self.wait_seconds = 0.0
        self.num_samples = 0
        self.num_bad = 0

    def position(self) -> dict:
        """Exact while the number of readers is unchanged (and no bad samples are skipped:
        a resume skips raw samples, bad ones included, by count)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "num_readers": self.spec.num_readers}

    def __next__(self) -> dict:
        start = time.perf_counter()
        while True:
            if self._iterator is None:
                if self.consumed >= self.batches_per_epoch:
                    self.epoch, self.consumed = self.epoch + 1, 0
                self.stream.set_position(self.epoch, self.consumed)
                self._iterator = iter(self.loader)
            try:
                batch = self._decode(_next_batch(self._iterator))
                break
            except StopIteration:
                self._iterator = None
                if self.consumed < self.batches_per_epoch:
                    raise RuntimeError(
                        f"data stream ended after {self.consumed} of {self.batches_per_epoch} batches in "
                        f"epoch {self.epoch}; a shard yielded fewer samples than manifest.json says"
                    ) from None
                self.consumed = self.batches_per_epoch
        self.consumed += 1
        self.wait_seconds += time.perf_counter() - start
        self.num_samples += len(batch["__key__"])
        self.num_bad += batch["__num_bad__"]
        return batch

    def __iter__(self):
        return self

    def _decode(self, batch: dict) -> dict:
        spec = self.spec
        return decode_batch(batch, spec.labels, spec.rgb_mean, spec.rgb_std, spec.decode_device)

    def close(self) -> None:
        self._iterator = None


def eval_batches(spec: StreamSpec, max_batches: int | None = None) -> Iterator[dict]:
    """One pass over a split; each rank sees a disjoint part, all ranks together see it all."""
    _, loader = make_loader(spec)
    iterator = iter(loader)
    for index in itertools.count():
        if max_batches is not None and index >= max_batches:
            return
        try:
            yield decode_batch(_next_batch(iterator), spec.labels, spec.rgb_mean, spec.rgb_std, spec.decode_device)
        except StopIteration:
            return


def _next_batch(iterator) -> dict:
    """The next batch; a data error raised in a loader worker comes back as one line.

    The DataLoader re-raises a worker's exception with the worker's traceback inside its
    message; the line that names shard, key and fix is the last one. The full text stays
    on the exception as ``worker_traceback`` (``dsparse --debug`` prints it).
    """
    try:
        return next(iterator)
    except SampleError as error:
        text = str(error)
        if "Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        one_line = SampleError(last.split("SampleError: ", 1)[-1])
        one_line.worker_traceback = text
        raise one_line from None


def stream_spec(data_cfg, manifest: Manifest, split: str, tasks: list[str], *, seed: int, rank: int,
                world_size: int, train: bool, device=None) -> StreamSpec:
    """Build the StreamSpec of one split from a DataConfig and the dataset manifest;
    ``device`` is where the batches are used (``data.decode_on`` decides who decodes)."""
    if split not in manifest.splits:
        raise ValueError(f"dataset at {data_cfg.path} has no {split!r} split; it has {sorted(manifest.splits)}")
    missing = [t for t in tasks if t not in manifest.tasks]
    if missing:
        raise ValueError(f"dataset at {data_cfg.path} has no labels for task(s) {missing}; it has {manifest.tasks}")
    specs = manifest.label_specs()
    return StreamSpec(
        data_dir=str(data_cfg.path),
        split=split,
        shards=[{"name": s.name, "num_samples": s.num_samples, "num_bytes": s.num_bytes}
                for s in manifest.splits[split].shards],
        labels={task: specs[task] for task in tasks},
        batch_size=data_cfg.batch_size if train else data_cfg.eval_batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=data_cfg.num_workers,
        train=train,
        crop_size=data_cfg.crop_size if train else None,
        scale_range=tuple(data_cfg.scale_range) if train and data_cfg.scale_range else None,
        flip=data_cfg.flip,
        shuffle_buffer=data_cfg.shuffle_buffer,
        resampled=data_cfg.resampled and train,
        epoch_length=data_cfg.epoch_length,
        skip_bad=data_cfg.skip_bad,
        image_size=tuple(manifest.image_size),
        num_classes=manifest.num_classes,
        rgb_mean=tuple(manifest.rgb_mean),
        rgb_std=tuple(manifest.rgb_std),
        shard_url=data_cfg.shard_url,
        codec=manifest.dataset_codec(),
        decode_device=decode_device(data_cfg.decode_on, device),
    )


def decode_device(decode_on: str, device) -> str | None:
    """Where stored batches become float tensors: None = in the loader workers; else the
    device, in the trainer's process (``auto``: on a GPU, else in the workers)."""
    if decode_on == "worker" or (decode_on == "auto" and (device is None or torch.device(device).type != "cuda")):
        return None
    return str(device if device is not None else "cpu")


__all__ = [
    "StreamSpec", "ShardStream", "TrainBatches", "make_loader", "eval_batches", "stream_spec",
    "batches_per_reader", "check_enough_shards", "shuffle_buffer_bytes", "shards_of_reader", "augment", "collate",
]
