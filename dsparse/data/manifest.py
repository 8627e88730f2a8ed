"""The dataset manifest: what a directory of shards holds, validated when it is read.

``manifest.json`` is written last by :func:`dsparse.data.writer.write_dataset`, so its
presence means the dataset is complete. Everything the trainer needs to know about a
dataset comes from it: tasks and how each label is encoded, class names and pixel
frequencies, the RGB statistics used to normalise inputs, and every shard with its
sample count. A manifest that would fail later (a class frequency list of the wrong
length, a task dsparse does not know, a shard without samples) fails here, on load,
with the file named.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsparse.data.codecs import DatasetCodec
from dsparse.io import read_json
from dsparse.tasks.labels import LabelError, LabelSpec

MANIFEST_NAME = "manifest.json"
FORMAT = "dsparse-webdataset"
VERSION = 2
RGB_DEFAULT_MEAN = (0.5, 0.5, 0.5)  # for manifests written without image statistics
RGB_DEFAULT_STD = (0.25, 0.25, 0.25)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")  # webdataset splits member names at the first dot


def dataset_hint(data_dir, rewrite: bool = False) -> str:
    again = " --overwrite" if rewrite else ""
    return (f"{'rewrite it' if rewrite else 'write one'} with `dsparse data synth --out {data_dir}{again}` (synthetic) "
            f"or `dsparse data convert {{nyuv2,cityscapes,taskonomy,folders}} SRC {data_dir}{again}`")


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    num_bytes: int = 0


@dataclass
class SplitInfo:
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)


@dataclass
class Manifest:
    """A dataset's description; see the module docstring.

    Attributes:
        name: dataset name (``synthetic``, ``nyuv2``, ...).
        image_size: ``(height, width)`` of every sample.
        tasks: the tasks with a label in every sample, in a fixed order.
        encodings: per task, the label spec's description and parameters
            (:meth:`LabelSpec.manifest_entry`), restored by :meth:`label_specs`.
        codec: how stored arrays are packed into shard members
            (:meth:`DatasetCodec.to_manifest`); absent (None) in datasets written before
            codecs existed, which are PNG throughout.
        splits: split name -> shards with sample counts.
        classes: segmentation class names, id order (empty without ``seg``).
        class_pixel_frequency: per class, its share of labelled train pixels.
        class_weights: per-class loss weights the dataset ships (Taskonomy's prior), used
            by ``data.class_weights`` in place of median-frequency balancing.
        rgb_mean, rgb_std: per-channel statistics of the train images in [0, 1].
        source: what wrote the dataset (converter, its version, source path, options).
        skipped: samples a conversion skipped (``--on-error skip``), each with its reason.
        stats: other facts worth keeping (depth range, ...), not read by training.
    """

    name: str
    image_size: tuple[int, int]
    tasks: list[str]
    encodings: dict[str, dict]
    splits: dict[str, SplitInfo]
    classes: list[str] = field(default_factory=list)
    class_pixel_frequency: list[float] | None = None
    class_weights: list[float] | None = None
    rgb_mean: tuple[float, float, float] = RGB_DEFAULT_MEAN
    rgb_std: tuple[float, float, float] = RGB_DEFAULT_STD
    source: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    codec: dict | None = None
    format: str = FORMAT
    version: int = VERSION

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def identity(self) -> dict:
        """What makes two datasets the same for comparing runs (recorded in summary.json). The
        lossless codecs give the same batches, so they are left out; a JPEG image is named."""
        codec = self.dataset_codec()
        return {"name": self.name, "image_size": list(self.image_size), "classes": list(self.classes),
                "splits": {split: info.num_samples for split, info in self.splits.items()},
                **({"lossy_rgb": codec.describe()} if not codec.codec("rgb").lossless else {})}

    def dataset_codec(self) -> DatasetCodec:
        return DatasetCodec.from_manifest(self.codec)

    def label_specs(self) -> dict[str, LabelSpec]:
        """Each task's label spec with this dataset's parameters (e.g. its depth scale)."""
        from dsparse.tasks import TASKS

        specs = {}
        for task in self.tasks:
            params = {k: v for k, v in self.encodings[task].items() if k != "description"}
            specs[task] = TASKS[task].label.with_params(params)
        return specs

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        from dsparse.tasks import TASKS

        if self.format != FORMAT:
            raise ValueError(f"format is {self.format!r}, not {FORMAT!r}")
        if self.version != VERSION:
            raise ValueError(f"version is {self.version!r}, this dsparse reads version {VERSION}; "
                             "rewrite the dataset with this version")
        height, width = self.image_size
        if not (_positive_int(height) and _positive_int(width)):
            raise ValueError(f"image_size must be two positive integers, got {list(self.image_size)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks {self.tasks} must be distinct registered tasks ({sorted(TASKS)})")
        missing = [t for t in self.tasks if not isinstance(self.encodings.get(t), dict)]
        if missing:
            raise ValueError(f"no encoding for task(s) {missing}")
        try:
            self.label_specs()
        except LabelError as error:
            raise ValueError(f"encodings: {error}") from None
        try:
            self.dataset_codec()
        except (TypeError, ValueError) as error:
            raise ValueError(f"codec: {error}") from None
        if "seg" in self.tasks and not self.classes:
            raise ValueError("task 'seg' needs the class names in 'classes'")
        if self.classes and len(self.classes) > 255:
            raise ValueError(f"{len(self.classes)} classes; at most 255 fit the 8-bit label (255 = ignore)")
        for name in ("class_pixel_frequency", "class_weights"):
            values = getattr(self, name)
            if values is not None and (len(values) != len(self.classes) or not all(
                    isinstance(f, (int, float)) and math.isfinite(f) and f >= 0 for f in values)):
                raise ValueError(f"{name} must hold {len(self.classes)} finite values >= 0 (one per class)")
        for name, values in (("rgb_mean", self.rgb_mean), ("rgb_std", self.rgb_std)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"{name} must hold 3 finite numbers, got {values}")
        if not all(v > 0 for v in self.rgb_std):
            raise ValueError(f"rgb_std must be positive, got {self.rgb_std}")
        if not self.splits:
            raise ValueError("no splits")
        for split, info in self.splits.items():
            if not NAME_PATTERN.match(split):
                raise ValueError(f"split name {split!r} must be letters, digits and '_'")
            for shard in info.shards:
                if not isinstance(shard.name, str) or not re.fullmatch(rf"{split}-\d{{6,}}\.tar", shard.name):
                    raise ValueError(f"split {split!r}: shard name {shard.name!r} must be {split}-NNNNNN.tar (as "
                                     "dsparse writes them); this manifest was not written by dsparse or was edited")
                if not _positive_int(shard.num_samples):
                    raise ValueError(f"split {split!r}: shard {shard.name} has num_samples "
                                     f"{shard.num_samples!r}; it must be a positive integer")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Build from parsed JSON; raises ``ValueError`` for missing or unknown fields."""
        if not isinstance(data, dict):
            raise ValueError("the top level is not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"version is {data.get('version')!r}, this dsparse reads version {VERSION}; "
                             "rewrite the dataset with this version")
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        try:
            splits = {split: SplitInfo([ShardInfo(**shard) for shard in info["shards"]])
                      for split, info in data["splits"].items()}
            manifest = cls(**{**data, "splits": splits,
                              "image_size": tuple(data["image_size"]),
                              "rgb_mean": tuple(data.get("rgb_mean", RGB_DEFAULT_MEAN)),
                              "rgb_std": tuple(data.get("rgb_std", RGB_DEFAULT_STD))})
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed ({type(error).__name__}: {error})") from None
        return manifest


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def load_manifest(data_dir: str | Path) -> Manifest:
    """Read and validate ``data_dir/manifest.json``.

    Raises:
        ValueError: in one line naming the file, if it is missing (no dataset, or a write
            that did not finish), not JSON, or inconsistent.
    """
    if Path(data_dir).is_file():
        raise ValueError(f"{data_dir} is a file; pass the dataset directory, the one that holds {MANIFEST_NAME}")
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"no {MANIFEST_NAME} in {data_dir}: not a dsparse dataset, or its writing did not "
                         f"finish; {dataset_hint(data_dir)}")
    try:
        data = read_json(path, "dataset manifest")
    except ValueError as error:
        raise ValueError(f"{error}; {dataset_hint(data_dir, rewrite=True)}") from None
    try:
        manifest = Manifest.from_dict(data)
        manifest.validate()
    except ValueError as error:
        raise ValueError(f"{path} is not a usable dsparse manifest: {error}; "
                         f"{dataset_hint(data_dir, rewrite=True)}") from None
    return manifest


__all__ = ["MANIFEST_NAME", "Manifest", "ShardInfo", "SplitInfo", "dataset_hint", "load_manifest"]
