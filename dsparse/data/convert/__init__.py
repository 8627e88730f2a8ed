"""Converters from real datasets' own layouts to dsparse shards.

Example::

    from dsparse.data.convert import convert
    manifest = convert("nyuv2", "/data/nyu_v2", "data/nyuv2", workers=8)

Each converter (one module each) only enumerates samples and reads one sample's files;
:func:`dsparse.data.writer.write_dataset` does the rest, in parallel and resumably.
A new layout is a :class:`Converter` subclass registered in :data:`CONVERTERS`.
"""

from __future__ import annotations

from pathlib import Path

from dsparse.data.convert.base import Conversion, Converter, Option, SourceError
from dsparse.data.convert.cityscapes import CityscapesConverter
from dsparse.data.convert.folders import FoldersConverter
from dsparse.data.convert.nyuv2 import NYUv2Converter
from dsparse.data.convert.taskonomy import TaskonomyConverter
from dsparse.data.manifest import Manifest
from dsparse.data.codecs import DatasetCodec
from dsparse.data.writer import write_dataset
from dsparse.registry import Registry

CONVERTERS: Registry[Converter] = Registry("converter")
"""Converter name -> the converter (an instance: it holds no state between conversions)."""
for _converter in (NYUv2Converter, CityscapesConverter, TaskonomyConverter, FoldersConverter):
    CONVERTERS.register(_converter.name)(_converter())


def convert(name: str, src: str | Path, out: str | Path, *, splits: list[str] | None = None, workers: int = 1,
            shard_size: int | str = "512MB", on_error: str = "stop", overwrite: bool = False,
            progress: bool = True, codec: DatasetCodec | None = None, **options) -> Manifest:
    """Convert the dataset at ``src`` with converter ``name`` into shards in ``out``.

    Rerunning the same command after an interruption resumes it (finished shards are
    kept). ``options`` are the converter's own (see ``CONVERTERS[name].options``);
    ``codec`` packs the shard members (default: :data:`dsparse.data.writer.DEFAULT_CODEC`).

    Raises:
        ValueError: unknown converter or option; SourceError for a bad source layout;
            DatasetWriteError for a bad sample (``on_error="stop"``) or output directory.
    """
    converter = CONVERTERS.lookup(name)
    known = {option.name.replace("-", "_") for option in converter.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"converter {name!r} has no option(s) {unknown}; it has {sorted(known)}")
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    src = Path(src)
    if name != "folders" and not src.is_dir():
        raise SourceError(f"source directory {src} does not exist")
    try:
        plan = converter.plan(src, list(splits or converter.default_splits), on_error,
                              **{k: v for k, v in options.items() if v is not None})
    except OSError as error:  # e.g. a folder that cannot be listed
        raise SourceError(f"cannot read the source under {src}: {error}") from None
    return write_dataset(out, plan.splits, plan.info, load=plan.load, shard_size=shard_size, workers=workers,
                         on_error=on_error, progress=progress, overwrite=overwrite, codec=codec)


__all__ = ["CONVERTERS", "Conversion", "Converter", "Option", "SourceError", "convert"]
