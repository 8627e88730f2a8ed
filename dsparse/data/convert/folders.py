"""A researcher's own dataset: image folders plus label folders, described in a small YAML.

Example ``dataset.yaml`` (paths relative to the YAML file)::

    name: kitchens
    classes: [floor, wall, table, chair]       # needed with seg; ids 0-3
    size: [240, 320]                           # optional: resize everything (labels nearest)
    splits:                                    # a glob of images per split; the stem names a sample
      train: images/train/*.jpg
      val: images/val/*.jpg
    tasks:                                     # where each label is: {split} and {stem} are filled in
      seg: {path: labels/seg/{split}/{stem}.png, ignore: [255], shift: 0}
      depth: {path: labels/depth/{split}/{stem}.png, multiply: 0.001, invalid: [0]}   # mm PNG -> metres
      normal: {path: labels/normal/{split}/{stem}.png, invalid: [[0, 0, 0]]}         # (n + 1) / 2 * 255
      edge: {path: labels/edge/{split}/{stem}.npy}                                    # floats in [0, 1]

Reading rules, per task (the label specs then check every value, see
:mod:`dsparse.tasks.labels`):

* ``.npy`` files are read as they are; PNG/JPEG with Pillow at their own bit depth.
* ``multiply`` scales raw values (default 1; for 8/16-bit PNG heat maps the default is
  1/255 or 1/65535, so they land in [0, 1]).
* ``invalid``: raw values that mean "no label" (stored as the task's invalid value);
  for ``seg``, ``ignore`` lists raw ids stored as ignore and ``shift`` is added to the rest.
* ``normal`` PNGs are decoded as ``v / 255 * 2 - 1`` (x right, y down, z forward) and
  renormalised; ``.npy`` normals are taken as vectors.
* a ``depth`` scale other than millimetres goes in ``encodings: {depth: {scale: 512}}``.
"""

from __future__ import annotations

import glob
from functools import partial
from pathlib import Path

import numpy as np
import yaml

from dsparse.data.convert.base import (Conversion, Converter, SourceError, read_npy, read_png, resize, same_size,
                                       sample_key, shuffled, unit_normals)
from dsparse.data.writer import DatasetInfo

_TASK_KEYS = {"path", "multiply", "invalid", "ignore", "shift"}
_TOP_KEYS = {"name", "classes", "size", "splits", "tasks", "encodings"}


def read_description(path: Path) -> dict:
    """The dataset YAML, checked; SourceError naming the file and the key."""
    if not path.is_file():
        raise SourceError(f"missing dataset description {path}; SRC for `folders` is a YAML file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SourceError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise SourceError(f"{path} must be a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown or not isinstance(spec.get("splits"), dict) or not isinstance(spec.get("tasks"), dict):
        raise SourceError(f"{path}: needs 'splits' and 'tasks' mappings" + (f"; unknown key(s) {unknown}" if unknown else ""))
    for task, entry in spec["tasks"].items():
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "path" not in entry or set(entry) - _TASK_KEYS:
            raise SourceError(f"{path}: task {task!r} needs a path and may set {sorted(_TASK_KEYS - {'path'})}")
        spec["tasks"][task] = entry
    size = spec.get("size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0
                                                                                   for v in size)):
        raise SourceError(f"{path}: size must be [height, width], got {size!r}")
    return spec


def _read(path: str, task: str) -> np.ndarray:
    if path.endswith(".npy"):
        return read_npy(path)
    return read_png(path, channels=3 if task in ("rgb", "normal") else 1, colour=task == "rgb")


def _matches(array: np.ndarray, values: list) -> np.ndarray:
    hit = np.zeros(array.shape[:2], bool)
    for value in values or []:
        value = np.asarray(value)
        hit |= (array == value).all(axis=-1) if array.ndim == 3 else array == value
    return hit


def convert_label(task: str, raw: np.ndarray, rule: dict) -> np.ndarray:
    """Raw file values -> the label spec's convention for ``task``, by the YAML's rule."""
    invalid = _matches(raw, rule.get("invalid"))
    if task == "seg":
        ids = raw.astype(np.int64) + int(rule.get("shift", 0))
        return np.where(_matches(raw, rule.get("ignore")) | invalid, 255, ids)
    if task == "normal":
        vectors = raw.astype(np.float32)
        if raw.dtype == np.uint8:
            vectors = vectors / 255 * 2 - 1
        return unit_normals(vectors * float(rule.get("multiply", 1.0)), ~invalid)
    default = {np.dtype(np.uint8): 1 / 255, np.dtype(np.uint16): 1 / 65535}.get(raw.dtype, 1.0) \
        if task in ("keypoint", "edge") else 1.0
    values = raw.astype(np.float64) * float(rule.get("multiply", default))
    marker = -1.0 if task in ("keypoint", "edge") else 0.0
    return np.where(invalid, marker, values).astype(np.float32)


def load_sample(rules: dict, size, job: tuple[str, dict[str, str]]) -> dict:
    """Worker: read an image and its labels by the YAML's rules."""
    image, labels = job
    raw = {"rgb": _read(image, "rgb")}
    files = {"rgb": image, **labels}
    for task, path in labels.items():
        raw[task] = _read(path, task)
        if raw[task].ndim == 3 and raw[task].shape[-1] == 1:
            raw[task] = raw[task][..., 0]
    same_size(raw, files)
    arrays = {"rgb": raw["rgb"]}
    for task in labels:
        arrays[task] = convert_label(task, raw[task], rules[task])
    if size is not None:
        arrays = {name: resize(array, tuple(size), label=name != "rgb") for name, array in arrays.items()}
    return {**arrays, "__files__": files}


class FoldersConverter(Converter):
    name = "folders"
    summary = "your own dataset: image and label folders described by a YAML file (SRC)"
    default_splits = ()

    def plan(self, src: Path, splits: list[str], on_error: str) -> Conversion:
        spec = read_description(src)
        root = src.parent
        wanted = splits or list(spec["splits"])
        unknown = [s for s in wanted if s not in spec["splits"]]
        if unknown:
            raise SourceError(f"{src} has no split(s) {unknown}; it has {sorted(spec['splits'])}")
        tasks = list(spec["tasks"])
        planned = {}
        for split in wanted:
            pattern = str(root / spec["splits"][split])
            images = sorted(glob.glob(pattern))
            if not images:
                raise SourceError(f"split {split!r}: no image matches {pattern}")
            samples = []
            for image in images:
                stem = Path(image).stem
                labels = {task: str(root / spec["tasks"][task]["path"].format(split=split, stem=stem))
                          for task in tasks}
                samples.append((sample_key(stem), (image, labels)))
            planned[split] = shuffled(samples) if split == "train" else samples
        classes = [str(c) for c in spec.get("classes") or []]
        info = DatasetInfo(name=str(spec.get("name", src.stem)), tasks=tasks, classes=classes,
                           encodings=spec.get("encodings") or {},
                           source={"converter": self.name, "converter_version": self.version, "src": str(src),
                                   "description": spec})
        rules = {task: spec["tasks"][task] for task in tasks}
        return Conversion(info, planned, partial(load_sample, rules, spec.get("size")))
