"""Cityscapes as preprocessed for multitask learning (the MTAN-style ``.npy`` release
used by AdaShare/DiSparse).

Layout relied on (from that release's loader and its maintainers' answers):

* an index JSON (default ``<root>/cityscape.json``): ``{split: [[img, depth, label2,
  label7, label19], ...]}``, ``.npy`` paths relative to ``<root>``; splits ``train`` and
  ``test``. ``label2`` is not used.
* ``img``: float RGB in [0, 1], [H, W, 3] (256x512, or 128x256 for the small release);
  stored with the writer's documented rescaling ``round(x * 255)``.
* ``label19`` / ``label7``: class ids as numbers, -1 = unlabelled (stored as 255).
* ``depth``: inverse depth (disparity, as released: about 0-0.5), [H, W] or [H, W, 1];
  valid where > 3e-5 (others stored as invalid, 0). Stored at ``--depth-scale`` units
  per value (default 100000: resolution 1e-5, range up to 0.655); a value outside is
  refused, not clipped.

The split ``test`` is written as ``val`` (dsparse validates on ``val``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from dsparse.data.convert.base import (WRITTEN_AS, Conversion, Converter, Option, SourceError, index_samples,
                                       load_index, read_npy, same_size, sample_key)
from dsparse.data.writer import DatasetInfo

INDEX_FILE = "cityscape.json"
DEPTH_VALID_ABOVE = 3e-5
CLASSES_19 = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
              "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
              "bicycle")
CLASSES_7 = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
_LABEL_COLUMN = {19: 4, 7: 3}


def class_ids(values: np.ndarray, path: str) -> np.ndarray:
    """Float class ids with -1 = unlabelled -> uint-safe int ids with 255 = ignore."""
    values = np.squeeze(values)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise SourceError(f"{path} holds class ids that are not whole numbers")
    ids = values.astype(np.int64)
    return np.where(ids == -1, 255, ids)


def load_sample(root: str, num_classes: int, files: tuple[str, ...]) -> dict:
    """Worker: read one Cityscapes sample into the label specs' conventions."""
    img, depth, label = (str(Path(root) / files[i]) for i in (0, 1, _LABEL_COLUMN[num_classes]))
    rgb = read_npy(img)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise SourceError(f"{img} has shape {rgb.shape}, expected [H, W, 3] RGB in [0, 1]")
    disparity = read_npy(depth)
    if disparity.ndim == 3 and disparity.shape[-1] == 1:
        disparity = disparity[..., 0]
    arrays = {
        "rgb": rgb.astype(np.float32),
        "seg": class_ids(read_npy(label), label),
        "depth": np.where(disparity > DEPTH_VALID_ABOVE, disparity, 0.0).astype(np.float32),
    }
    files = {"rgb": img, "seg": label, "depth": depth}
    same_size(arrays, files)
    return {**arrays, "__files__": files}


class CityscapesConverter(Converter):
    name = "cityscapes"
    summary = "Cityscapes (MTAN/AdaShare .npy release: cityscape.json with img, depth, label2/7/19)"
    default_splits = ("train", "test")
    options = (
        Option("index", f"index JSON (default: SRC/{INDEX_FILE})"),
        Option("classes", "segmentation classes: 19 (default) or the 7 categories", 19, int, (19, 7)),
        Option("depth-scale", "stored units per disparity unit (16-bit range: 65535 / scale)", 100000.0, float),
    )

    def plan(self, src: Path, splits: list[str], on_error: str, index: str | None = None, classes: int = 19,
             depth_scale: float = 100000.0) -> Conversion:
        entries = load_index(Path(index) if index else src / INDEX_FILE, splits, INDEX_FILE)
        planned = index_samples(entries, ("img", "depth", "label2", "label7", "label19"),
                                lambda split, position, row: sample_key(split, f"{position:06d}", Path(row[0]).stem))
        names = CLASSES_19 if classes == 19 else CLASSES_7
        info = DatasetInfo(name="cityscapes", tasks=["seg", "depth"], classes=list(names),
                           encodings={"depth": {"scale": depth_scale}},
                           source={"converter": self.name, "converter_version": self.version, "src": str(src),
                                   "index": str(index or src / INDEX_FILE), "classes": classes,
                                   "depth": "inverse depth (disparity) as released",
                                   "splits": {s: WRITTEN_AS.get(s, s) for s in splits}})
        return Conversion(info, planned, partial(load_sample, str(src), classes))
