"""Reading raw samples out of one tar shard and decoding them, with errors that say where.

A corrupt shard at Taskonomy scale is found hours into a run; the error must name the
shard and the sample key so the user can rewrite or drop exactly that shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from webdataset.tariterators import tarfile_samples

from dsparse.data.codec import FILE_OF, decode

_SHAPE_RANK = {"rgb": 3, "seg": 2, "depth": 2, "normal": 3, "keypoint": 2, "edge": 2}


class SampleError(ValueError):
    """A sample or shard that cannot be used; the message names shard and key."""


def read_shard(path: Path, skip_bad: bool = False) -> Iterator[dict]:
    """Yield the raw (undecoded) samples of one tar shard.

    A missing, corrupt or truncated shard raises :class:`SampleError` naming the shard and
    the last good sample key. With ``skip_bad`` the rest of the shard is skipped instead
    and one ``{"__bad__": message}`` marker is yielded so the caller can count it.
    """
    last_key = None
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        for sample in tarfile_samples([{"url": str(path)}]):
            last_key = sample["__key__"]
            sample["__shard__"] = path.name
            yield sample
    except Exception as error:  # tarfile, gzip and OS errors all mean the same here
        where = f"after sample {last_key!r}" if last_key else "before its first sample"
        message = (
            f"shard {path} is unreadable {where} ({type(error).__name__}: {error}); "
            "rewrite the shard, remove it from manifest.json, or set data.skip_bad: true"
        )
        if not skip_bad:
            raise SampleError(message) from error
        yield {"__bad__": message, "__key__": last_key, "__shard__": path.name}


def decode_sample(raw: dict, tasks: list[str], image_size: tuple[int, int] | None = None) -> dict:
    """Decode ``rgb`` and the labels of ``tasks``; check presence and shapes.

    Raises:
        SampleError: naming shard and key, for a missing label, undecodable bytes or a label
            whose shape does not match the image.
    """
    where = f"sample {raw.get('__key__')!r} in shard {raw.get('__shard__')}"
    if "__bad__" in raw:
        raise SampleError(raw["__bad__"])
    decoded = {"__key__": raw["__key__"]}
    for entry in ["rgb", *tasks]:
        suffix = FILE_OF[entry]
        if suffix not in raw:
            present = sorted(k for k in raw if not k.startswith("__"))
            raise SampleError(f"{where} has no {suffix!r} (label of {entry!r}); it has {present}")
        try:
            array = decode(entry, raw[suffix])
        except Exception as error:
            raise SampleError(f"{where}: cannot decode {suffix!r}: {error}") from error
        decoded[entry] = array
    _check_shapes(decoded, where, image_size)
    return decoded


def _check_shapes(decoded: dict, where: str, image_size: tuple[int, int] | None) -> None:
    height, width = decoded["rgb"].shape[:2]
    if image_size is not None and (height, width) != tuple(image_size):
        raise SampleError(f"{where}: image is {height}x{width}, manifest says {image_size[0]}x{image_size[1]}")
    for entry, array in decoded.items():
        if entry == "__key__":
            continue
        expected_rank = _SHAPE_RANK[entry]
        channels_ok = expected_rank == 2 or array.shape[-1] == 3
        if array.ndim != expected_rank or array.shape[:2] != (height, width) or not channels_ok:
            expected = f"({height}, {width}" + (", 3)" if expected_rank == 3 else ")")
            raise SampleError(f"{where}: label {entry!r} has shape {tuple(array.shape)}, expected {expected}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise SampleError(f"{where}: label {entry!r} contains NaN or inf")
