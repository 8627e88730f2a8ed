"""Resizing an image and its labels together: the one rule converters and augmentation share.

Images are resized bilinearly (Pillow, antialiased when shrinking). Labels use nearest
neighbour by index arithmetic, which works for any dtype and channel count and never
invents a value: no class between two classes, no depth between a surface and the
invalid 0.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``[size[0], size[1], 3]``, bilinear."""
    if tuple(rgb.shape[:2]) == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, ...]`` -> ``[size[0], size[1], ...]``, each output pixel the input pixel
    under its centre."""
    height, width = array.shape[:2]
    if (height, width) == tuple(size):
        return array
    rows = np.minimum(((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64), width - 1)
    return array[rows][:, cols]
