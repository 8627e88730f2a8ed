"""How a label's stored array becomes shard bytes and back: the dataset's encoding.

The label specs (:mod:`dsparse.tasks.labels`) own what a stored array means and refuse
values they would damage; a codec only packs that array into bytes and unpacks it
again, bit for bit (JPEG, an opt-in for the image, is the one lossy codec). A dataset
has one :class:`DatasetCodec`, recorded in its manifest, so every shard member's
codec follows from the manifest and the member's extension.

Why more than PNG: decoding six PNGs is most of what a loader worker does (inflate and
PNG's row filters run per pixel); a raw array compressed with zstd decompresses several
times faster at a similar size for label maps. Measured in ``benchmarks/bench_data.py``.
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
from PIL import Image


class CodecError(ValueError):
    """Bytes that do not unpack to the array the manifest describes."""


class Codec:
    """Packs a stored array into bytes and back."""

    name: ClassVar[str]
    extension: ClassVar[str]
    lossless: ClassVar[bool] = True

    def pack(self, stored: np.ndarray) -> bytes:
        raise NotImplementedError

    def unpack(self, data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """The array; raises :class:`CodecError` if the bytes do not hold ``dtype``/``shape``."""
        raise NotImplementedError


def _image_array(data: bytes, dtype: str, what: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    if array.dtype != np.dtype(dtype):
        raise CodecError(f"the {what} holds {array.dtype}, expected {dtype} (an image of another bit depth)")
    return array


class PngCodec(Codec):
    """PNG at zlib level 1 (8-bit and 16-bit, grey or RGB): the encoding of dsparse's first datasets."""

    name, extension = "png", "png"

    def pack(self, stored: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(stored)).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def unpack(self, data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return _image_array(data, dtype, "PNG")


class ZstdCodec(Codec):
    """The raw array (C order, little-endian) in one zstd frame that records its size.

    Level 3 (zstd's default) writes about as fast as PNG level 1 and decompresses at
    GB/s; the frame's content size is checked against the expected array before anything
    is decompressed, so a damaged or foreign member is refused without allocating for it.
    """

    name, extension = "zstd", "zst"
    level: ClassVar[int] = 3

    def pack(self, stored: np.ndarray) -> bytes:
        array = np.ascontiguousarray(stored)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        return _compressor(self.level).compress(array.tobytes())

    def unpack(self, data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        import zstandard

        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as error:
            raise CodecError(f"not a zstd frame ({error})") from None
        if size != expected:
            raise CodecError(f"the zstd frame holds {size} bytes, a {dtype} array of shape {list(shape)} is "
                             f"{expected} (a label of another size or type)")
        try:
            raw = _decompressor().decompress(data, max_output_size=expected)
        except zstandard.ZstdError as error:
            raise CodecError(f"corrupt zstd frame ({error})") from None
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


@functools.cache
def _compressor(level: int):
    """One compression context per process and level (creating one per member costs more
    than compressing a small label)."""
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_content_size=True)


@functools.cache
def _decompressor():
    """One decompression context per process, for the same reason."""
    import zstandard

    return zstandard.ZstdDecompressor()


@dataclass(frozen=True)
class JpegCodec(Codec):
    """Baseline JPEG, 4:4:4, for the RGB image only: lossy, about 10x smaller than raw RGB."""

    quality: int = 95
    name: ClassVar[str] = "jpeg"
    extension: ClassVar[str] = "jpg"
    lossless: ClassVar[bool] = False

    def pack(self, stored: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(stored)).save(buffer, format="JPEG", quality=self.quality,
                                                           subsampling=0)
        return buffer.getvalue()

    def unpack(self, data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return _image_array(data, dtype, "JPEG")


CODECS: dict[str, type[Codec]] = {codec.name: codec for codec in (PngCodec, ZstdCodec, JpegCodec)}
LABEL_CODECS = sorted(name for name, codec in CODECS.items() if codec.lossless)


@dataclass(frozen=True)
class DatasetCodec:
    """Which codec packs the image and which packs every label, as the manifest records it.

    Attributes:
        labels: a lossless codec for every task's label (``png`` or ``zstd``).
        rgb: the image's codec (``png``, ``zstd`` or the lossy ``jpeg``); None = ``labels``.
        jpeg_quality: 1-100, with ``rgb: jpeg``.
    """

    labels: str = "png"
    rgb: str | None = None
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.labels not in LABEL_CODECS:
            raise ValueError(f"label encoding {self.labels!r} is not one of {LABEL_CODECS} (labels must round-trip "
                             "exactly)")
        if self.rgb is None:
            object.__setattr__(self, "rgb", self.labels)
        if self.rgb not in CODECS:
            raise ValueError(f"rgb encoding {self.rgb!r} is not one of {sorted(CODECS)}")
        quality = self.jpeg_quality
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"jpeg_quality must be an integer in 1-100, got {quality!r}")

    def codec(self, entry: str) -> Codec:
        """The codec of member ``entry`` (``"rgb"`` or a task name)."""
        name = self.rgb if entry == "rgb" else self.labels
        return JpegCodec(self.jpeg_quality) if name == "jpeg" else CODECS[name]()

    def describe(self) -> str:
        rgb = self.rgb + (f" (quality {self.jpeg_quality})" if self.rgb == "jpeg" else "")
        return f"labels {self.labels}, rgb {rgb}"

    def to_manifest(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, entry: dict | None) -> DatasetCodec:
        """The manifest's ``encoding`` (absent in datasets written before it existed: PNG)."""
        if entry is None:
            return cls()
        if not isinstance(entry, dict) or set(entry) - {"labels", "rgb", "jpeg_quality"}:
            raise ValueError(f"must be an object with labels, rgb, jpeg_quality; got {entry!r}")
        return cls(**entry)


__all__ = ["CODECS", "Codec", "CodecError", "DatasetCodec", "JpegCodec", "LABEL_CODECS", "PngCodec", "ZstdCodec"]
