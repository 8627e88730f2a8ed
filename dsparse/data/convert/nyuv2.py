"""NYU-v2 as preprocessed for multitask learning (the AdaShare/DiSparse release).

Layout relied on (read from that release's loader and its sample files):

* ``<root>/nyu_v2_3task.json``: ``{split: [[img, seg, normal, depth], ...]}`` with paths
  relative to ``<root>``; splits ``train`` and ``test`` (and ``train1``/``train2``).
* ``img/*.png``: 480x640 colour images. The original reads them with OpenCV, so its arrays
  are BGR; the files themselves are ordinary RGB PNGs, read here as RGB.
* ``seg/*.png``: 8-bit, NYU40 classes as ids 0-39, 255 = unlabelled (ignored).
* ``normal_mask/*.png``: 8-bit RGB, ``v = (n + 1) / 2 * 255``; a pixel with a channel at
  255 has no normal (the original keeps pixels whose largest channel is below 255).
  The original feeds the raw 0-254 values to a cosine loss (``F.normalize`` makes the
  offset irrelevant only up to the ``+1``); here they are decoded to unit vectors
  ``v / 255 * 2 - 1`` (file channels R, G, B as x, y, z) with invalid pixels as the zero
  vector, so the loss and the mean-angle metric see true angles. A horizontal flip
  negates x (the original does not change normals on a flip).
* ``depth/*.npy``: float32 metres, valid where > 3e-5 (others stored as invalid, 0).

The split ``test`` is written as ``val``: dsparse validates on ``val``, and the
multitask literature reports NYU-v2 on its test split.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from dsparse.data.convert.base import (WRITTEN_AS, Conversion, Converter, Option, index_samples, load_index,
                                       read_npy, read_png, same_size, sample_key, unit_normals)
from dsparse.data.writer import DatasetInfo

INDEX_FILE = "nyu_v2_3task.json"
DEPTH_VALID_ABOVE = 3e-5
NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor_mat", "clothes",
    "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower_curtain", "box", "whiteboard",
    "person", "night_stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture",
    "otherprop",
)


def load_sample(root: str, files: tuple[str, str, str, str]) -> dict:
    """Worker: read one NYU-v2 sample into the label specs' conventions."""
    img, seg, normal, depth = (str(Path(root) / f) for f in files)
    raw_normal = read_png(normal, bits=8, channels=3)
    valid = (raw_normal < 255).all(axis=-1)
    depth_m = read_npy(depth).astype(np.float32)
    if depth_m.ndim == 3 and depth_m.shape[-1] == 1:
        depth_m = depth_m[..., 0]
    arrays = {
        "rgb": read_png(img, bits=8, channels=3, colour=True),
        "seg": read_png(seg, bits=8, channels=1),
        "normal": unit_normals(raw_normal.astype(np.float32) / 255 * 2 - 1, valid),
        "depth": np.where(depth_m > DEPTH_VALID_ABOVE, depth_m, 0.0).astype(np.float32),
    }
    files = {"rgb": img, "seg": seg, "normal": normal, "depth": depth}
    same_size(arrays, files)
    return {**arrays, "__files__": files}


class NYUv2Converter(Converter):
    name = "nyuv2"
    summary = "NYU-v2 (AdaShare/DiSparse release: nyu_v2_3task.json, img/, seg/, normal_mask/, depth/)"
    default_splits = ("train", "test")
    options = (Option("index", f"index JSON (default: SRC/{INDEX_FILE})"),)

    def plan(self, src: Path, splits: list[str], on_error: str, index: str | None = None) -> Conversion:
        entries = load_index(Path(index) if index else src / INDEX_FILE, splits, INDEX_FILE)
        planned = index_samples(entries, ("img", "seg", "normal", "depth"),
                                lambda split, position, row: sample_key(Path(row[0]).stem))
        info = DatasetInfo(name="nyuv2", tasks=["seg", "normal", "depth"], classes=list(NYU40_CLASSES),
                           source={"converter": self.name, "converter_version": self.version, "src": str(src),
                                   "index": str(index or src / INDEX_FILE),
                                   "splits": {s: WRITTEN_AS.get(s, s) for s in splits}})
        return Conversion(info, planned, partial(load_sample, str(src)))
