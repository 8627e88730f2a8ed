"""Procedural indoor scenes, ray cast with numpy, with labels for all five tasks.

Why a renderer and not random tensors: demos, tests and CPU smoke runs need a multitask
dataset whose tasks are genuinely related, as in Taskonomy or NYU-v2. Every label here
comes from the same ray hits as the image: depth and normals share the geometry,
segmentation is the identity of the hit surface, edges and keypoints follow the
structure of both the image and the geometry.

Modules, in the order a render uses them:

- ``scene``: draws the random room, objects, materials, lights and camera from the seed;
- ``geometry``: ray intersection with spheres, boxes, cylinders and the room;
- ``shading``: casts rays into the scene and shades the hits, with shadows;
- ``labels``: keypoint and edge maps from the finished image and geometry;
- ``render``: the camera rays and ``render_scene``, which ties them together.

Example::

    from dsparse.data.synth import CLASSES, render_scene
    out = render_scene(seed=0, size=64)  # rgb, seg, depth, normal, keypoint, edge, ...
"""

from dsparse.data.synth.render import TASK_ENTRIES, render_scene
from dsparse.data.synth.scene import CLASSES

__all__ = ["CLASSES", "TASK_ENTRIES", "render_scene"]
