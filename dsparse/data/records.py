"""Reading raw samples out of one tar shard and decoding them, with errors that say where.

A corrupt shard at Taskonomy scale is found hours into a run; the error must name the
shard and the sample key so the user can rewrite or drop exactly that shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np
from webdataset.tariterators import tarfile_samples

from dsparse.data.codecs import CodecError, DatasetCodec
from dsparse.tasks.labels import RGB, LabelError, LabelSpec


class SampleError(ValueError):
    """A sample or shard that cannot be used; the message names shard and key."""


def read_shard(url: str, skip_bad: bool = False, expected: int | None = None) -> Iterator[dict]:
    """Yield the raw (undecoded) samples of one tar shard.

    ``url`` is a local path or anything WebDataset opens, such as a ``pipe:`` command
    that writes the shard to stdout (``pipe:aws s3 cp s3://bucket/train-000000.tar -``).
    A missing, corrupt or truncated shard, a failing command, or a shard with another
    sample count than ``expected`` (the manifest's) raises :class:`SampleError` naming the
    shard. With ``skip_bad`` a shard that breaks off or ends short is skipped instead: one
    ``{"__bad__": message, "__lost__": n}`` marker says how many samples it lost (a shard
    holding more samples than the manifest says is always an error: the manifest is wrong).
    """
    last_key, name, count = None, url.rsplit("/", 1)[-1], 0
    try:
        if not url.startswith("pipe:") and not os.path.isfile(url):
            raise FileNotFoundError(f"no such file {url}")
        for sample in tarfile_samples([{"url": url}]):
            last_key = sample["__key__"]
            sample["__shard__"] = name
            count += 1
            if expected is not None and count > expected:
                raise SampleError(f"shard {url} holds more samples than manifest.json says ({expected}); the manifest "
                                  f"does not describe it: check the dataset (dsparse data check) and rewrite it")
            yield sample
    except SampleError:
        raise
    except Exception as error:  # tarfile, gzip, OS and pipe errors all mean the same here
        where = f"after sample {last_key!r}" if last_key else "before its first sample"
        reason = (str(error).strip().splitlines() or [""])[0]
        message = (
            f"shard {url} is unreadable {where} ({type(error).__name__}: {reason}); "
            "rewrite the shard, remove it from manifest.json, or set data.skip_bad: true"
        )
        if not skip_bad:
            raise SampleError(message) from error
        yield {"__bad__": message, "__lost__": max(1, (expected or 0) - count), "__key__": last_key, "__shard__": name}
        return
    if expected is not None and count < expected:
        message = (f"shard {url} ended after {count} samples, manifest.json says {expected}; rewrite the shard or "
                   "the dataset, or set data.skip_bad: true to skip what is missing")
        if not skip_bad:
            raise SampleError(message)
        yield {"__bad__": message, "__lost__": expected - count, "__key__": last_key, "__shard__": name}


def decode_sample(raw: dict, labels: Mapping[str, LabelSpec], codec: DatasetCodec, image_size: tuple[int, int],
                  num_classes: int | None = None) -> dict:
    """Unpack ``rgb`` and the label of every task in ``labels`` into their stored arrays
    (:mod:`dsparse.tasks.labels`); check presence, dtype, shapes and class ids.

    Raises:
        SampleError: naming shard and key, for a missing label, bytes that do not unpack, a
            label whose shape does not match the image, or a class id outside the manifest's
            classes.
    """
    where = f"sample {raw.get('__key__')!r} in shard {raw.get('__shard__')}"
    if "__bad__" in raw:
        raise SampleError(raw["__bad__"])
    decoded = {"__key__": raw["__key__"]}
    for entry, spec in [("rgb", RGB), *labels.items()]:
        member_codec = codec.codec(entry)
        member = f"{entry}.{member_codec.extension}"
        if member not in raw:
            present = sorted(k for k in raw if not k.startswith("__"))
            raise SampleError(f"{where} has no {member!r} (label of {entry!r}); it has {present}")
        try:
            array = member_codec.unpack(raw[member], spec.stored_dtype, spec.stored_shape(image_size))
            spec.check_shape(array, f"label {entry!r}")
            spec.check_stored(array, num_classes)
        except (LabelError, CodecError) as error:
            raise SampleError(f"{where}: label {entry!r}: {error}") from None
        except Exception as error:
            raise SampleError(f"{where}: cannot decode {member!r}: {error}") from error
        decoded[entry] = array
    _check_sizes(decoded, where, image_size)
    return decoded


def _check_sizes(decoded: dict, where: str, image_size: tuple[int, int]) -> None:
    height, width = decoded["rgb"].shape[:2]
    if (height, width) != tuple(image_size):
        raise SampleError(f"{where}: image is {height}x{width}, manifest says {image_size[0]}x{image_size[1]}")
    for entry, array in decoded.items():
        if entry == "__key__":
            continue
        if array.shape[:2] != (height, width):
            raise SampleError(f"{where}: label {entry!r} is {array.shape[0]}x{array.shape[1]}, "
                              f"the image is {height}x{width}")


def decoded_values(raw: dict, manifest) -> dict:
    """One raw sample as the values of the label table (:mod:`dsparse.tasks.labels`):
    float depth in metres, unit normals, ... for inspecting or testing a dataset. Training
    does not use it: the loader batches stored arrays and decodes whole batches."""
    specs = manifest.label_specs()
    stored = decode_sample(raw, specs, manifest.dataset_codec(), manifest.image_size, manifest.num_classes)
    return {"__key__": stored["__key__"], "rgb": stored["rgb"],
            **{task: spec.decode_stored(stored[task]) for task, spec in specs.items()}}
