"""Byte encodings of one sample inside a WebDataset shard.

The encodings follow the Taskonomy conventions (PNG images, depth in millimetres as
16-bit PNG, normals as 8-bit RGB) so a converter for real data writes the same files the
synthetic generator does, and one decoder serves both. Every label decodes to a float or
integer numpy array in a fixed layout; validity of a pixel is part of the value:

==========  =============  ==========================================================
entry       file           decoded array
==========  =============  ==========================================================
rgb         ``rgb.png``    uint8 [H, W, 3]
seg         ``seg.png``    uint8 [H, W], class index, ``IGNORE_INDEX`` = unlabelled
depth       ``depth.png``  float32 [H, W] metres, 0 = invalid (uint16 millimetres)
normal      ``normal.png`` float32 [H, W, 3] unit vectors in the camera frame (x right,
                           y down, z forward), zero vector = invalid
keypoint    ``keypoint.png`` float32 [H, W] in [0, 1], negative = invalid
edge        ``edge.png``   float32 [H, W] in [0, 1], negative = invalid
==========  =============  ==========================================================
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
DEPTH_SCALE = 1000.0  # stored units per metre
_U16_MAX = 65535
# 16-bit heat maps reserve 0 for "invalid" and map [0, 1] onto [1, 65535].
_HEAT_SCALE = _U16_MAX - 1

FILE_OF = {
    "rgb": "rgb.png",
    "seg": "seg.png",
    "depth": "depth.png",
    "normal": "normal.png",
    "keypoint": "keypoint.png",
    "edge": "edge.png",
}

ENCODING_DOC = {
    "rgb": "rgb.png: 8-bit RGB",
    "seg": f"seg.png: 8-bit class index, {IGNORE_INDEX} = ignore",
    "depth": f"depth.png: 16-bit, metres * {DEPTH_SCALE:g}, 0 = invalid",
    "normal": "normal.png: 8-bit RGB, n = v / 127.5 - 1 (camera frame x right, y down, z forward), grey 128 = invalid",
    "keypoint": "keypoint.png: 16-bit, 0 = invalid, else (v - 1) / 65534 in [0, 1]",
    "edge": "edge.png: 16-bit, 0 = invalid, else (v - 1) / 65534 in [0, 1]",
}


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _encode_heat(values: np.ndarray) -> bytes:
    encoded = np.where(values < 0, 0, np.round(np.clip(values, 0, 1) * _HEAT_SCALE) + 1)
    return _png_bytes(encoded.astype(np.uint16))


def _decode_heat(data: bytes) -> np.ndarray:
    raw = _png_array(data).astype(np.float32)
    return np.where(raw == 0, -1.0, (raw - 1) / _HEAT_SCALE).astype(np.float32)


def encode(entry: str, value: np.ndarray) -> bytes:
    """Encode one sample entry (see the module table) to the bytes stored in the shard."""
    if entry in ("rgb", "seg"):
        return _png_bytes(np.asarray(value, dtype=np.uint8))
    if entry == "depth":
        millimetres = np.round(np.clip(value, 0, _U16_MAX / DEPTH_SCALE) * DEPTH_SCALE)
        return _png_bytes(millimetres.astype(np.uint16))
    if entry == "normal":
        return _png_bytes(np.round((np.clip(value, -1, 1) + 1) * 127.5).astype(np.uint8))
    if entry in ("keypoint", "edge"):
        return _encode_heat(np.asarray(value, dtype=np.float32))
    raise ValueError(f"unknown sample entry {entry!r}; known: {sorted(FILE_OF)}")


def decode(entry: str, data: bytes) -> np.ndarray:
    """Decode the bytes of one sample entry back to the array layout of the module table."""
    if entry in ("rgb", "seg"):
        return _png_array(data)
    if entry == "depth":
        return _png_array(data).astype(np.float32) / DEPTH_SCALE
    if entry == "normal":
        vectors = _png_array(data).astype(np.float32) / 127.5 - 1.0
        length = np.linalg.norm(vectors, axis=-1, keepdims=True)
        valid = length > 0.5
        return np.where(valid, vectors / np.maximum(length, 1e-6), 0.0).astype(np.float32)
    if entry in ("keypoint", "edge"):
        return _decode_heat(data)
    raise ValueError(f"unknown sample entry {entry!r}; known: {sorted(FILE_OF)}")
