"""Random scenes: room, materials, objects, doors and windows, lights and camera.

This is the only module that draws random numbers, so every render is a pure function
of the seed through ``sample_scene``. The order of draws from the generator is part of
the dataset's definition: reordering them changes every scene for every seed.

A scene is a box-shaped room (floor, ceiling, four walls, doors and windows painted on
the walls) with 2-7 objects (spheres, yaw-rotated boxes, cylinders, tables, pillars),
lit by an ambient term, a point light under the ceiling and sometimes a directional
fill light. Colours and textures are drawn independently of the class, so a network
has to use shape and context, not hue. World frame: metres, y up, the room spans
``[0, W] x [0, H] x [0, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dsparse.data.synth.geometry import Box, Cylinder, Room, Shape, Sphere, bounding_sphere, may_hit

CLASSES: tuple[str, ...] = (
    "floor", "ceiling", "wall", "door", "window", "sphere", "box", "cylinder", "table", "pillar",
)
CLS = {name: index for index, name in enumerate(CLASSES)}
# Class of each room face, in the face order of ``Room``.
FACE_CLASS = np.array([CLS["wall"], CLS["wall"], CLS["floor"], CLS["ceiling"], CLS["wall"], CLS["wall"]])
_KINDS = ("sphere", "box", "cylinder", "table", "pillar")
_KIND_PROBABILITIES = [0.22, 0.26, 0.2, 0.18, 0.14]


@dataclass(frozen=True)
class Part:
    """One primitive of an object; a table has five parts sharing one instance."""

    shape: Shape
    cls: int
    material: int
    instance: int


@dataclass(frozen=True)
class Panel:
    """A door or window: a rectangle in the (horizontal, height) coordinates of a wall."""

    face: int
    u: tuple[float, float]
    v: tuple[float, float]
    cls: int
    material: int
    instance: int


@dataclass
class Scene:
    room: Room
    face_materials: list[int]
    panels: list[Panel]
    parts: list[Part]
    materials: dict[str, np.ndarray]  # each material field stacked over materials
    lights: list[dict]
    ambient: np.ndarray
    cam_pos: np.ndarray
    cam_rot: np.ndarray  # columns: camera x (right), y (down), z (forward) in world
    focal: float
    groups: list[tuple[np.ndarray, float, list[int]]] = field(init=False)

    def __post_init__(self) -> None:
        """Group parts by object under one bounding sphere, so rays cull a table at once."""
        members: dict[int, list[int]] = {}
        for index, part in enumerate(self.parts):
            members.setdefault(part.instance, []).append(index)
        self.groups = []
        for indices in members.values():
            bounds = [bounding_sphere(self.parts[i].shape) for i in indices]
            center = np.mean([c for c, _ in bounds], axis=0)
            radius = max(float(np.linalg.norm(c - center)) + r for c, r in bounds)
            self.groups.append((center, radius, indices))

    def candidates(self, o: np.ndarray, d: np.ndarray):
        """Yield (ray indices, part indices) of each object whose bounding sphere the rays meet."""
        for center, radius, indices in self.groups:
            rays = np.flatnonzero(may_hit(center, radius, o, d))
            if rays.size:
                yield rays, indices


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw one scene, its camera included, for a square image of ``size`` pixels."""
    room = np.array([rng.uniform(3.5, 7.0), rng.uniform(2.5, 3.4), rng.uniform(3.5, 7.0)])
    materials: list[dict] = []

    def new_material() -> int:
        materials.append(_sample_material(rng))
        return len(materials) - 1

    face_materials = _sample_face_materials(rng, new_material)
    cam_pos = np.array([rng.uniform(0.5, room[0] - 0.5), rng.uniform(1.0, 1.8),
                        rng.uniform(0.5, room[2] - 0.5)])
    parts = _sample_objects(rng, room, cam_pos[[0, 2]], new_material, first_instance=6)
    cam_rot = _camera_rotation(rng, cam_pos, parts)
    first_panel = 6 + len({part.instance for part in parts})
    panels = _sample_panels(rng, room, cam_rot[:, 2], new_material, first_panel)
    lights, ambient = _sample_lights(rng, room, parts)
    hfov = rng.uniform(np.radians(50), np.radians(80))
    stacked = {key: np.stack([m[key] for m in materials]) for key in materials[0]}
    return Scene(Room(room), face_materials, panels, parts, stacked, lights, ambient,
                 cam_pos, cam_rot, focal=(size / 2) / np.tan(hfov / 2))


# ------------------------------------------------------------------------ materials
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.random(3)
    saturation, value = rng.uniform(0.0, 0.9), rng.uniform(0.15, 0.95)
    return value * (1.0 - saturation + saturation * hue / hue.max())


def _sample_material(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Kinds: 0 checker, 1 stripes, 2 smooth noise, 3 nearly plain (faint noise)."""
    c1 = _random_colour(rng)
    c2 = _random_colour(rng) if rng.random() < 0.6 else c1 * rng.uniform(0.3, 0.8)
    period = rng.uniform(0.08, 0.8)
    freq_dir = rng.uniform(0, 2 * np.pi, 4)
    freq = (2 * np.pi / period) * rng.uniform(0.3, 1.5, 4)[:, None] * np.stack(
        [np.cos(freq_dir), np.sin(freq_dir)], axis=-1)
    return {"kind": np.array(rng.integers(0, 4)), "c1": c1, "c2": c2, "period": np.array(period),
            "angle": np.array(rng.uniform(0, np.pi)), "freq": freq,
            "phase": rng.uniform(0, 2 * np.pi, 4)}


def _sample_face_materials(rng, new_material: Callable[[], int]) -> list[int]:
    """Materials of the six room faces: shared walls, sometimes one accent wall."""
    floor, ceiling, wall = new_material(), new_material(), new_material()
    accent = new_material() if rng.random() < 0.3 else wall
    walls = [wall, wall, wall, wall]
    walls[int(rng.integers(4))] = accent
    return [walls[0], walls[1], floor, ceiling, walls[2], walls[3]]


# -------------------------------------------------------------------------- objects
def _sample_objects(rng, room, cam_xz, new_material, first_instance) -> list[Part]:
    """Place 2-7 objects on the floor by rejection on their footprint circles."""
    placed: list[tuple[float, float, float]] = []  # (x, z, footprint radius)
    parts: list[Part] = []
    for _ in range(int(rng.integers(2, 8))):
        kind = _KINDS[rng.choice(5, p=_KIND_PROBABILITIES)]
        dims, footprint = _sample_dims(rng, kind)
        spot = _find_spot(rng, room, footprint, cam_xz, placed)
        if spot is None:
            continue  # no room left for this object; skip it
        x, z = spot
        placed.append((x, z, footprint))
        material, instance = new_material(), first_instance + len(placed) - 1
        for shape in _object_shapes(kind, dims, x, z, room[1]):
            parts.append(Part(shape, CLS[kind], material, instance))
    return parts


def _sample_dims(rng, kind: str) -> tuple[object, float]:
    """Kind-specific dimensions, and the radius of the object's footprint on the floor."""
    if kind == "sphere":
        radius = rng.uniform(0.2, 0.55)
        lift = rng.uniform(0.3, 1.0) if rng.random() < 0.25 else 0.0
        return (radius, lift), radius
    if kind == "box":
        half = np.array([rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.75), rng.uniform(0.15, 0.6)])
        yaw = 0.0 if rng.random() < 0.3 else rng.uniform(0, np.pi)
        return (half, yaw), float(np.hypot(half[0], half[2]))
    if kind == "cylinder":
        radius = rng.uniform(0.15, 0.45)
        return (radius, rng.uniform(0.3, 1.3)), radius
    if kind == "table":
        half = np.array([rng.uniform(0.35, 0.8), rng.uniform(0.25, 0.55)])
        dims = (half, rng.uniform(0.6, 0.85), rng.uniform(0, np.pi), rng.uniform(0.025, 0.05))
        return dims, float(np.hypot(*half))
    radius = rng.uniform(0.12, 0.3)
    return radius, radius


def _find_spot(rng, room, footprint, cam_xz, placed) -> tuple[float, float] | None:
    """First of 20 random floor positions clear of the camera and the placed objects."""
    for _attempt in range(20):
        x = rng.uniform(footprint + 0.05, room[0] - footprint - 0.05)
        z = rng.uniform(footprint + 0.05, room[2] - footprint - 0.05)
        clear_of_camera = np.hypot(x - cam_xz[0], z - cam_xz[1]) > footprint + 0.6
        if clear_of_camera and all(np.hypot(x - px, z - pz) > footprint + pr + 0.05
                                   for px, pz, pr in placed):
            return x, z
    return None


def _object_shapes(kind, dims, x, z, room_height) -> list[Shape]:
    if kind == "sphere":
        radius, lift = dims
        return [Sphere(np.array([x, radius + lift, z]), radius)]
    if kind == "box":
        half, yaw = dims
        return [Box(np.array([x, half[1], z]), half, yaw)]
    if kind == "cylinder":
        radius, tall = dims
        return [Cylinder(x, z, radius, 0.0, tall)]
    if kind == "pillar":
        return [Cylinder(x, z, dims, 0.0, room_height)]
    return _table_shapes(*dims, x, z)


def _table_shapes(half, top, yaw, leg, x, z) -> list[Shape]:
    """A thin top of half-extents ``half`` at height ``top`` on four square legs."""
    thick = 0.025
    shapes: list[Shape] = [Box(np.array([x, top - thick, z]), np.array([half[0], thick, half[1]]), yaw)]
    c, s = np.cos(yaw), np.sin(yaw)
    leg_half = np.array([leg, (top - 2 * thick) / 2, leg])
    for sx, sz in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        lx, lz = sx * (half[0] - leg - 0.03), sz * (half[1] - leg - 0.03)
        center = np.array([x + c * lx + s * lz, leg_half[1], z - s * lx + c * lz])
        shapes.append(Box(center, leg_half, yaw))
    return shapes


# --------------------------------------------------------------- panels and camera
def _sample_panels(rng, room, forward, new_material, first_instance) -> list[Panel]:
    """Up to one door and two windows, not overlapping on one wall.

    Walls facing the camera are likelier, else these small classes would be rare in view.
    """
    inward = {0: forward[0], 1: -forward[0], 4: forward[2], 5: -forward[2]}  # -normal . forward
    faces = list(inward)
    weights = np.array([0.15 + max(0.0, -inward[f]) for f in faces])
    panels: list[Panel] = []
    for cls_name, probability in (("door", 0.8), ("window", 0.8), ("window", 0.45)):
        if rng.random() >= probability:
            continue
        face = faces[int(rng.choice(4, p=weights / weights.sum()))]
        wall_len = room[2] if face < 2 else room[0]
        width, v = _panel_extent(rng, cls_name, room[1])
        start = rng.uniform(0.15, wall_len - width - 0.15)
        u = (start, start + width)
        if any(p.face == face and u[0] < p.u[1] + 0.1 and p.u[0] < u[1] + 0.1 for p in panels):
            continue
        panels.append(Panel(face, u, v, CLS[cls_name], new_material(), first_instance + len(panels)))
    return panels


def _panel_extent(rng, cls_name: str, room_height) -> tuple[float, tuple[float, float]]:
    """Width, and (bottom, top) heights, of a door or a window."""
    if cls_name == "door":
        return rng.uniform(0.8, 1.1), (0.0, rng.uniform(1.9, min(2.2, room_height - 0.2)))
    bottom = rng.uniform(0.7, 1.1)
    return rng.uniform(0.6, 1.8), (bottom, min(bottom + rng.uniform(0.7, 1.3), room_height - 0.2))


def _camera_rotation(rng, cam_pos: np.ndarray, parts: list[Part]) -> np.ndarray:
    """World-from-camera rotation: columns are the camera's right, down and forward axes.

    The camera looks roughly at one object, so most views show objects, not a bare wall.
    """
    if parts:
        target = parts[int(rng.integers(len(parts)))].shape
        tx, tz = (target.x, target.z) if isinstance(target, Cylinder) else target.center[[0, 2]]
        yaw = np.arctan2(tx - cam_pos[0], tz - cam_pos[2]) + rng.uniform(-0.45, 0.45)
    else:
        yaw = rng.uniform(0, 2 * np.pi)
    pitch = rng.uniform(-0.45, 0.1)  # radians, negative = looking down
    forward = np.array([np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)])
    down = np.array([0.0, -1.0, 0.0]) + forward[1] * forward
    down /= np.linalg.norm(down)
    return np.stack([np.cross(down, forward), down, forward], axis=-1)


# --------------------------------------------------------------------------- lights
def _tint(rng) -> np.ndarray:
    """A near-white light colour."""
    return 1.0 - 0.2 * rng.random(3)


def _sample_lights(rng, room, parts: list[Part]) -> tuple[list[dict], np.ndarray]:
    """A point light under the ceiling, sometimes a directional fill, and the ambient term."""
    lights = [{"pos": _lamp_position(rng, room, parts), "power": rng.uniform(0.9, 1.6),
               "falloff": rng.uniform(2.5, 4.5), "colour": _tint(rng)}]
    if rng.random() < 0.6:
        direction = np.array([rng.normal(), -rng.uniform(0.3, 1.0), rng.normal()])
        lights.append({"dir": direction / np.linalg.norm(direction),
                       "power": rng.uniform(0.2, 0.5), "colour": _tint(rng)})
    return lights, rng.uniform(0.12, 0.3) * _tint(rng)


def _lamp_position(rng, room, parts: list[Part]) -> np.ndarray:
    """A point under the ceiling, outside pillars (a lamp inside one would leave only ambient)."""
    pillars = [p.shape for p in parts if isinstance(p.shape, Cylinder) and p.shape.y1 >= room[1] - 0.3]
    for _attempt in range(20):
        point = np.array([rng.uniform(0.3, room[0] - 0.3), room[1] - 0.25, rng.uniform(0.3, room[2] - 0.3)])
        if all(np.hypot(point[0] - c.x, point[2] - c.z) > c.radius + 0.1 for c in pillars):
            break
    return point
