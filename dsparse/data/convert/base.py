"""What a converter is, and the file reading every converter shares.

A converter turns a dataset's own on-disk layout into the jobs of
:func:`dsparse.data.writer.write_dataset`: per split, ``(key, item)`` pairs where the
item names a sample's source files, and a picklable ``load(item)`` that reads them into
arrays in the label specs' conventions. Reading, checking, parallelism, resume and
progress then happen once, in the writer. A converter raises :class:`SourceError` (one
line naming the file) for anything it cannot read; the writer stops on it or, with
``--on-error skip``, skips the sample and records it in the manifest.
"""

from __future__ import annotations

import abc
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from PIL import Image

from dsparse.data.resize import resize_image, resize_nearest
from dsparse.io import read_json
from dsparse.data.writer import DatasetInfo

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L")
SHUFFLE_SEED = 0  # converters deal train samples to shards in one fixed shuffled order


class SourceError(ValueError):
    """A source file that is missing, unreadable or not what the layout promises."""


@dataclass
class Option:
    """A converter-specific command-line option (``--name``)."""

    name: str
    help: str
    default: Any = None
    type: Callable = str
    choices: tuple | None = None
    nargs: str | None = None


@dataclass
class Conversion:
    """A converter's plan: what to write and how to read one sample."""

    info: DatasetInfo
    splits: dict[str, list[tuple[str, Any]]]
    load: Callable[[Any], dict]


WRITTEN_AS = {"test": "val"}  # dsparse validates on "val"; NYU-v2 and Cityscapes report on "test"


def load_index(path: Path, splits: list[str], default_name: str) -> dict[str, list]:
    """An index JSON's ``{split: [entry, ...]}`` for ``splits``; SourceError naming the file."""
    if not path.is_file():
        raise SourceError(f"missing index file {path}; point SRC at the directory holding {default_name} "
                          "or pass --index")
    index = read_json(path, "index file", SourceError)
    if not isinstance(index, dict):
        raise SourceError(f"{path} must map split names to lists of files")
    missing = [s for s in splits if s not in index]
    if missing:
        raise SourceError(f"{path} has no split(s) {missing}; it has {sorted(index)}")
    return {split: index[split] for split in splits}


def index_samples(entries: dict[str, list], columns: tuple[str, ...],
                  key: Callable[[str, int, tuple], str]) -> dict[str, list[tuple[str, tuple]]]:
    """``{written split: [(key, row)]}`` from an index's rows of ``columns`` file paths:
    rows checked, ``test`` written as ``val`` (WRITTEN_AS), train shuffled for the shards."""
    planned = {}
    for split, rows in entries.items():
        samples = []
        for position, row in enumerate(rows):
            if not (isinstance(row, (list, tuple)) and len(row) == len(columns) and all(isinstance(f, str) for f in row)):
                raise SourceError(f"index entry {row!r} of split {split!r} is not [{', '.join(columns)}]")
            samples.append((key(split, position, tuple(row)), tuple(row)))
        written = WRITTEN_AS.get(split, split)
        planned[written] = shuffled(samples) if written == "train" else sorted(samples)
    return planned


class Converter(abc.ABC):
    """One source layout. Subclasses set ``name``, ``version`` and ``options`` and plan."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    summary: ClassVar[str] = ""
    default_splits: ClassVar[tuple[str, ...]] = ("train", "val")
    options: ClassVar[tuple[Option, ...]] = ()

    @abc.abstractmethod
    def plan(self, src: Path, splits: list[str], on_error: str, **options) -> Conversion:
        """Enumerate the samples of ``splits`` under ``src``; raise SourceError for a bad layout."""


def sample_key(*parts: str) -> str:
    """A shard-safe key from name parts: letters, digits and ``_`` only."""
    return "_".join(re.sub(r"[^A-Za-z0-9]+", "_", str(part)).strip("_") or "x" for part in parts)


def shuffled(samples: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Train samples in a fixed shuffled order, so each shard mixes scenes and sources."""
    samples = sorted(samples, key=lambda pair: pair[0])
    random.Random(SHUFFLE_SEED).shuffle(samples)
    return samples


def read_png(path: str | Path, *, bits: int | None = None, channels: int | None = None,
             colour: bool = False) -> np.ndarray:
    """A PNG (or JPEG) as an array, checked for bit depth and channel count.

    ``colour`` (for input images only) turns palette, alpha and greyscale images into RGB;
    labels are never converted, so a greyscale normal map is refused, not reinterpreted.

    Raises:
        SourceError: naming the file, if it is missing, corrupt, or of another bit depth
            or channel count than the layout promises (e.g. a 16-bit label saved as 8-bit).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"missing file {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if colour and image.mode in ("P", "RGBA", "LA", "L"):
                image = image.convert("RGB")
            mode, array = image.mode, np.asarray(image)
    except Exception as error:
        raise SourceError(f"cannot read {path} ({type(error).__name__}: {error})") from None
    depth = 16 if mode in _SIXTEEN_BIT else 32 if mode in ("I", "F") else 8
    if mode == "I" and array.size and 0 <= array.min() and array.max() <= 65535:
        array, depth = array.astype(np.uint16), 16  # some Pillow versions open 16-bit PNGs as 32-bit "I"
    if bits is not None and depth != bits:
        raise SourceError(f"{path} is {depth}-bit ({mode}), expected {bits}-bit")
    have = 1 if array.ndim == 2 else array.shape[-1]
    if channels is not None and have != channels:
        raise SourceError(f"{path} has {have} channel(s), expected {channels}")
    return array


def read_npy(path: str | Path) -> np.ndarray:
    """A ``.npy`` array; raises SourceError naming the file if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"missing file {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:
        raise SourceError(f"cannot read {path} ({type(error).__name__}: {error})") from None


def resize(array: np.ndarray, size: tuple[int, int] | None, *, label: bool) -> np.ndarray:
    """Resize to ``(height, width)`` (None: keep): nearest for labels, bilinear for images."""
    if size is None:
        return array
    return resize_nearest(array, size) if label else resize_image(array, size)


def same_size(arrays: dict[str, np.ndarray], files: dict[str, str]) -> None:
    """Raise SourceError naming both files when an image and a label differ in size."""
    height, width = arrays["rgb"].shape[:2]
    for name, array in arrays.items():
        if array.shape[:2] != (height, width):
            raise SourceError(f"{files.get(name, name)} is {array.shape[0]}x{array.shape[1]} but the image "
                              f"{files.get('rgb', 'rgb')} is {height}x{width}")


def unit_normals(vectors: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Renormalise ``vectors`` where ``valid`` (and not near zero); zero vector elsewhere."""
    length = np.linalg.norm(vectors, axis=-1, keepdims=True)
    keep = valid[..., None] & (length > 0.5)
    return np.where(keep, vectors / np.maximum(length, 1e-6), 0.0).astype(np.float32)
