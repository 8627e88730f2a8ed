"""Image-space labels computed after rendering: keypoint and edge maps.

Kept apart from casting and shading because these work on finished [S, S] images and
label maps only, with small separable filters in plain numpy (dsparse does not
depend on SciPy).
Both maps follow the structure of the image and of the geometry, so they relate to the
other tasks as they do in real multitask datasets.
"""

from __future__ import annotations

import numpy as np


def keypoint_map(luma: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Shi-Tomasi corner response of the image and the normal field, scaled to [0, 1].

    Stacking normals with the luminance makes geometric corners (box and room corners)
    respond even where two faces happen to have the same brightness.
    """
    channels = np.concatenate([luma[..., None], 0.5 * normal], axis=-1)
    gx, gy = _sobel(channels)
    jxx, jyy, jxy = ((gx * gx).sum(-1), (gy * gy).sum(-1), (gx * gy).sum(-1))
    jxx, jyy, jxy = (_gaussian(j, 1.0) for j in (jxx, jyy, jxy))
    response = np.maximum(0.5 * (jxx + jyy) - np.sqrt(0.25 * (jxx - jyy) ** 2 + jxy**2), 0.0)
    # A floor on the normaliser keeps near-textureless views from amplifying noise; the
    # square root spreads the peaky response so the target is not almost all zeros.
    return np.sqrt(np.clip(response / max(response.max(), 2e-3), 0.0, 1.0))


EDGE_SOFTNESS = 1.0
"""Gaussian sigma (pixels) of the shoulders around edges. Like Taskonomy's soft edge
labels, they make a line's position learnable by a stride-8 network at 64x64, where a
hard 2-pixel line is mostly predicted as background."""


def edge_map(luma: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Occlusion and surface-identity edges (1.0) united with texture edges (up to 0.5),
    with soft shoulders around both.

    Every part is convex and the room is seen from inside, so depth can only jump where
    the visible part changes: part changes are the exact occlusion edges, with no depth
    threshold to misfire on floors seen at grazing angles. They also mark creases between
    room faces and the outlines of doors and windows. Both pixels of a change are marked.
    """
    change = np.zeros(surface.shape, dtype=bool)
    vertical = surface[1:] != surface[:-1]
    horizontal = surface[:, 1:] != surface[:, :-1]
    change[1:] |= vertical
    change[:-1] |= vertical
    change[:, 1:] |= horizontal
    change[:, :-1] |= horizontal
    gx, gy = _sobel(luma)
    texture = 0.5 * np.clip(np.hypot(gx, gy) / 0.25, 0.0, 1.0)
    sharp = np.maximum(change.astype(np.float64), texture)
    # Scale so the blurred 2-pixel line keeps a peak of 1; the sharp map stays on top.
    kernel = np.exp(-0.5 * (np.arange(-3, 4) / EDGE_SOFTNESS) ** 2)
    line_peak = (kernel[3] + kernel[4]) / kernel.sum()
    return np.maximum(sharp, np.clip(_gaussian(sharp, EDGE_SOFTNESS) / line_peak, 0.0, 1.0))


def _filter(image: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlate along one image axis with edge padding (the separable-filter building block)."""
    radius = len(kernel) // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(image, pad, mode="edge")
    length = image.shape[axis]
    return sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(kernel))


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    offsets = np.arange(-int(np.ceil(2.5 * sigma)), int(np.ceil(2.5 * sigma)) + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return _filter(_filter(image, kernel / kernel.sum(), 0), kernel / kernel.sum(), 1)


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image gradients in intensity per pixel (a unit step gives a peak of 0.5)."""
    smooth, deriv = np.array([0.25, 0.5, 0.25]), np.array([-0.5, 0.0, 0.5])
    gx = _filter(_filter(image, deriv, 1), smooth, 0)
    gy = _filter(_filter(image, deriv, 0), smooth, 1)
    return gx, gy
