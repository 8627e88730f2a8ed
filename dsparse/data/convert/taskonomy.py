"""Taskonomy, from its per-building frame layout.

Layouts relied on (the dataset's README and its download tools):

* ``<root>/<domain>/taskonomy/<building>/point_<i>_view_<j>_domain_<domain>.png``
  (the Omnidata downloader), or the older ``<root>/<building>/<domain>/...``. Semantic
  frames may be named ``..._domain_segmentsemantic.png``; both spellings are read.
* ``rgb``: 512x512 8-bit RGB, resized to ``--size`` (bilinear).
* ``depth_zbuffer``: 16-bit, 1/512 m units; 65535 = no depth, and values >= 64500 are
  treated as invalid as in the original work (interpolation near the maximum). Stored
  with depth scale 512, so valid depths are kept exactly.
* ``normal``: 8-bit RGB, 127-centred, decoded as ``v / 255 * 2 - 1`` and renormalised;
  invalid where the depth is (when depth is converted too). A flip negates channel 0.
* ``keypoints2d``, ``edge_texture``: 16-bit, value / 2^16 in [0, 1).
* ``segment_semantic``: 8-bit, 0 = uncertain (stored as ignore; the original trains it as
  background), 1 = background, 2-17 = 16 COCO classes; shifted down by one to 17 classes.
  ``--class-prior semseg_prior_factor.npy`` records the original's per-class loss
  weights; without it the class pixel frequencies are computed.
* Labels are resized with nearest neighbour, so no class or depth is invented.

Building splits: ``--subset tiny`` is built in (25/5/5 buildings); for medium, full and
full+ pass the official ``train_val_test_<subset>.csv`` (columns ``id,train,val,test``
with 0/1 flags) as ``--split-file``.
"""

from __future__ import annotations

import csv
import io
import re
from functools import partial
from pathlib import Path

import numpy as np

from dsparse.data.convert.base import (Conversion, Converter, Option, SourceError, read_npy, read_png, resize,
                                       same_size, sample_key, shuffled, unit_normals)
from dsparse.data.writer import DatasetInfo

DOMAINS = {"seg": "segment_semantic", "normal": "normal", "depth": "depth_zbuffer", "keypoint": "keypoints2d",
           "edge": "edge_texture"}
DEPTH_UNITS_PER_METRE = 512.0
DEPTH_INVALID_FROM = 64500
CLASSES = ("background", "bottle", "chair", "couch", "potted_plant", "bed", "dining_table", "toilet", "tv",
           "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase")
TINY_SPLIT = {
    "train": ("hanson", "merom", "klickitat", "onaga", "leonardo", "marstons", "newfields", "pinesdale",
              "lakeville", "cosmos", "benevolence", "pomaria", "tolstoy", "shelbyville", "allensville",
              "wainscott", "beechwood", "coffeen", "stockman", "hiteman", "woodbine", "lindenwood", "forkland",
              "mifflinburg", "ranchester"),
    "val": ("wiconisco", "corozal", "collierville", "markleeville", "darden"),
    "test": ("ihlen", "muleshoe", "uvalda", "noxapater", "mcdade"),
}
_FRAME = re.compile(r"^point_(\d+)_view_(\d+)_domain_rgb\.png$")


def read_split_file(path: Path) -> dict[str, list[str]]:
    """The official split CSV (``id,train,val,test``, 0/1 flags; CR line endings accepted)."""
    if not path.is_file():
        raise SourceError(f"missing split file {path}")
    text = path.read_text().replace("\r\n", "\n").replace("\r", "\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"id", "train", "val", "test"} <= set(rows[0]):
        raise SourceError(f"{path} is not a Taskonomy split file (columns id,train,val,test)")
    return {split: [row["id"].strip() for row in rows if row[split].strip() == "1"] for split in ("train", "val", "test")}


def building_dir(root: Path, building: str, domain: str) -> Path | None:
    """The folder of ``building``'s ``domain`` frames in either layout, or None."""
    aliases = (domain, domain.replace("_", "")) if domain == "segment_semantic" else (domain,)
    for name in aliases:
        for candidate in (root / name / "taskonomy" / building, root / building / name):
            if candidate.is_dir():
                return candidate
    return None


def frame_path(folder: Path | None, point: str, view: str, domain: str, default_folder: Path) -> str:
    """The frame's file (the first spelling that exists, else the canonical one in
    ``folder``, or in ``default_folder`` when the building has no folder for the domain)."""
    folder = folder or default_folder
    names = [domain, domain.replace("_", "")] if domain == "segment_semantic" else [domain]
    for name in names:
        path = folder / f"point_{point}_view_{view}_domain_{name}.png"
        if path.is_file():
            return str(path)
    return str(folder / f"point_{point}_view_{view}_domain_{domain}.png")


def read_frame(files: dict[str, str]) -> dict[str, np.ndarray]:
    """The raw frames of one view, checked to share the image's size."""
    raw = {"rgb": read_png(files["rgb"], bits=8, channels=3, colour=True)}
    for task, path in files.items():
        if task != "rgb":
            raw[task] = read_png(path, bits=8 if task in ("seg", "normal") else 16,
                                 channels=3 if task == "normal" else 1)
    same_size(raw, files)
    return raw


def load_sample(size: int, files: dict[str, str]) -> dict:
    """Worker: read one Taskonomy view and its labels into the label specs' conventions."""
    shape = (size, size)
    raw = read_frame(files)
    arrays = {"rgb": resize(raw["rgb"], shape, label=False)}
    depth = None
    if "depth" in raw:
        units = np.where(raw["depth"] >= DEPTH_INVALID_FROM, 0, raw["depth"]).astype(np.uint16)
        depth = resize(units, shape, label=True).astype(np.float32) / np.float32(DEPTH_UNITS_PER_METRE)
        arrays["depth"] = depth
    if "normal" in raw:
        vectors = resize(raw["normal"], shape, label=True).astype(np.float32) / 255 * 2 - 1
        arrays["normal"] = unit_normals(vectors, depth > 0 if depth is not None else np.ones(shape, bool))
    for task in ("keypoint", "edge"):
        if task in raw:
            arrays[task] = resize(raw[task], shape, label=True).astype(np.float32) / 65536
    if "seg" in raw:
        ids = resize(raw["seg"], shape, label=True).astype(np.int64)
        arrays["seg"] = np.where(ids == 0, 255, ids - 1)
    return {**arrays, "__files__": files}


class TaskonomyConverter(Converter):
    name = "taskonomy"
    summary = "Taskonomy (per-building frames: <domain>/taskonomy/<building>/ or <building>/<domain>/)"
    default_splits = ("train", "val")
    options = (
        Option("subset", "building split: tiny (built in); others need --split-file", "tiny", str,
               ("tiny", "medium", "full", "fullplus")),
        Option("split-file", "official train_val_test_<subset>.csv (id,train,val,test)"),
        Option("size", "output frame side in pixels (frames are 512x512)", 256, int),
        Option("tasks", "tasks to convert", list(DOMAINS), str, tuple(DOMAINS), "+"),
        Option("class-prior", "semseg_prior_factor.npy: the original's per-class loss weights"),
    )

    def plan(self, src: Path, splits: list[str], on_error: str, subset: str = "tiny", split_file: str | None = None,
             size: int = 256, tasks: list[str] | None = None, class_prior: str | None = None) -> Conversion:
        tasks = list(tasks or DOMAINS)
        if size < 8:
            raise SourceError(f"--size must be at least 8 pixels, got {size}")
        if split_file:
            buildings = read_split_file(Path(split_file))
        elif subset == "tiny":
            buildings = {split: list(names) for split, names in TINY_SPLIT.items()}
        else:
            raise SourceError(f"the {subset} building split is not built in; pass its official "
                              f"train_val_test_{subset}.csv as --split-file")
        unknown = [s for s in splits if s not in buildings]
        if unknown:
            raise SourceError(f"unknown split(s) {unknown}; Taskonomy has train, val and test")
        planned, absent = {}, []
        for split in splits:
            samples = []
            for building in buildings[split]:
                rgb_dir = building_dir(src, building, "rgb")
                if rgb_dir is None:
                    absent.append(building)
                    continue
                folders = {task: building_dir(src, building, DOMAINS[task]) for task in tasks}
                for frame in sorted(p.name for p in rgb_dir.iterdir()):
                    match = _FRAME.match(frame)
                    if not match:
                        continue
                    point, view = match.groups()
                    files = {"rgb": str(rgb_dir / frame)}
                    files.update({task: frame_path(folders[task], point, view, DOMAINS[task],
                                                   src / DOMAINS[task] / "taskonomy" / building) for task in tasks})
                    samples.append((sample_key(building, f"p{point}", f"v{view}"), files))
            planned[split] = shuffled(samples) if split == "train" else sorted(samples, key=lambda s: s[0])
        absent = sorted(set(absent))
        if absent and on_error != "skip":
            raise SourceError(f"the split list names building(s) not under {src}: {sorted(absent)[:10]}"
                              f"{' ...' if len(absent) > 10 else ''} ({len(absent)} in all); download them, or "
                              "convert without them (--on-error skip)")
        weights = None
        if class_prior:
            weights = read_npy(class_prior).astype(np.float64).ravel().tolist()
            if len(weights) != len(CLASSES) or not all(np.isfinite(weights)) or min(weights) < 0:
                raise SourceError(f"{class_prior} must hold {len(CLASSES)} finite weights >= 0, got {len(weights)}")
        info = DatasetInfo(
            name="taskonomy", tasks=tasks, classes=list(CLASSES) if "seg" in tasks else [],
            encodings={"depth": {"scale": DEPTH_UNITS_PER_METRE}} if "depth" in tasks else {},
            class_weights=weights if "seg" in tasks else None,
            skipped=[{"split": split, "key": building, "error": f"building {building} not found under {src}"}
                     for split in splits for building in buildings[split] if building in absent],
            source={"converter": self.name, "converter_version": self.version, "src": str(src),
                    "subset": None if split_file else subset, "split_file": split_file, "size": size,
                    "missing_buildings": sorted(absent)})
        return Conversion(info, planned, partial(load_sample, size))
