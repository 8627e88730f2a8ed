"""The camera and ``render_scene``: one seed in, an image and all its labels out.

Camera frame (and ``normal``): x right, y down, z forward (OpenCV); ``intrinsics`` use
the OpenCV pixel convention (pixel ``(u, v)`` has its centre at integer coordinates, so
``cx = (size - 1) / 2``). The image is the mean of three rays per pixel (the centre and
two diagonal offsets) to soften texture aliasing; every label comes from the centre ray
alone, so labels are exact at the pixel centres the intrinsics describe.
"""

from __future__ import annotations

import numpy as np

from dsparse.data.synth.labels import edge_map, keypoint_map
from dsparse.data.synth.scene import Scene, sample_scene
from dsparse.data.synth.shading import cast, shade

TASK_ENTRIES = ("seg", "normal", "depth", "keypoint", "edge")
# Image rays per pixel, in pixels from its centre. The pattern is symmetric so the
# averaged image stays aligned with the labels; more rays cost time linearly.
_SUBPIXEL = ((0.0, 0.0), (-0.25, -0.25), (0.25, 0.25))


def render_scene(seed: int, size: int = 64) -> dict[str, np.ndarray]:
    """Render one random scene and its labels; deterministic per seed.

    Args:
        seed: any non-negative integer; the same seed gives bit-identical arrays.
        size: image height and width in pixels.

    Returns:
        ``rgb`` uint8 [S, S, 3]; ``seg`` uint8 [S, S] index into ``CLASSES``; ``depth``
        float32 [S, S] metres along the optical axis; ``normal`` float32 [S, S, 3] unit,
        camera frame, facing the camera; ``keypoint`` and ``edge`` float32 [S, S] in
        [0, 1]. Extras for checks and converters: ``intrinsics`` float32
        ``[fx, fy, cx, cy]`` and ``instance`` int32 [S, S] (which room face, door,
        window or object each pixel sees).

    Raises:
        ValueError: for a negative seed or a size below 8.
    """
    _check_arguments(seed, size)
    size = int(size)
    scene = sample_scene(np.random.default_rng(int(seed)), size)
    centre = (size - 1) / 2.0
    hits = cast(scene, scene.cam_pos, _camera_rays(scene, size))
    linear = shade(scene, hits).reshape(len(_SUBPIXEL), size, size, 3)
    rgb = (np.clip(linear, 0.0, 1.0) ** (1 / 2.2)).mean(axis=0)  # gamma-encode, then average
    centre_hits = {key: value[: size * size] for key, value in hits.items()}
    normal = (centre_hits["normal"] @ scene.cam_rot).reshape(size, size, 3)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    return {
        "rgb": np.round(rgb * 255).astype(np.uint8),
        "seg": centre_hits["cls"].reshape(size, size).astype(np.uint8),
        "depth": centre_hits["t"].reshape(size, size).astype(np.float32),
        "normal": normal.astype(np.float32),
        "keypoint": keypoint_map(luma, normal).astype(np.float32),
        "edge": edge_map(luma, centre_hits["surface"].reshape(size, size)).astype(np.float32),
        "intrinsics": np.array([scene.focal, scene.focal, centre, centre], dtype=np.float32),
        "instance": centre_hits["instance"].reshape(size, size).astype(np.int32),
    }


def _check_arguments(seed, size) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8 pixels, got {size!r}; 64 is the default")


def _camera_rays(scene: Scene, size: int) -> np.ndarray:
    """World directions [len(_SUBPIXEL) * size * size, 3], the pixel-centre rays first.

    Each ray has camera-frame z = 1, so the hit parameter t is the depth itself.
    """
    centre = (size - 1) / 2.0
    v, u = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                       indexing="ij")
    offsets = np.asarray(_SUBPIXEL)[:, None, None, :]
    rays = np.stack([(u + offsets[..., 0] - centre) / scene.focal,
                     (v + offsets[..., 1] - centre) / scene.focal,
                     np.ones((len(_SUBPIXEL), size, size))], axis=-1).reshape(-1, 3)
    return rays @ scene.cam_rot.T
