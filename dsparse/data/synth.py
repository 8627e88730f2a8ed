"""Procedural indoor scenes, ray cast with numpy, with labels for all five tasks.

Why a renderer and not random tensors: demos, tests and CPU smoke runs need a multitask
dataset whose tasks are genuinely related, as in Taskonomy or NYU-v2. Every label here
comes from the same ray hits as the image: depth and normals share the geometry,
segmentation is the identity of the hit surface, edges and keypoints follow the
structure of both the image and the geometry. Colours and textures are drawn
independently of the class, so a network has to use shape and context, not hue.

A scene is a box-shaped room (floor, ceiling, four walls, doors and windows painted on
the walls) with 2-7 objects (spheres, yaw-rotated boxes, cylinders, tables, pillars),
lit by an ambient term, a point light under the ceiling and sometimes a directional
fill light, with cast shadows. World frame: metres, y up, the room spans
``[0, W] x [0, H] x [0, D]``. Camera frame (and ``normal``): x right, y down, z forward
(OpenCV); ``intrinsics`` use the OpenCV pixel convention (pixel ``(u, v)`` has its
centre at integer coordinates, so ``cx = (size - 1) / 2``).

Rendering is vectorised over all rays; Python loops only run over the few objects and
materials of a scene, and rays are culled by each object's bounding sphere. The image is
the mean of three rays per pixel (the centre and two diagonal offsets) to soften
texture aliasing; every label comes from the centre ray alone, so labels are exact at
the pixel centres the intrinsics describe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CLASSES: tuple[str, ...] = (
    "floor", "ceiling", "wall", "door", "window", "sphere", "box", "cylinder", "table", "pillar",
)
TASK_ENTRIES = ("seg", "normal", "depth", "keypoint", "edge")
_CLS = {name: index for index, name in enumerate(CLASSES)}
_T_MIN = 1e-6  # smallest accepted ray parameter; rejects self-hits of shadow rays
# Image rays per pixel, in pixels from its centre. The pattern is symmetric so the
# averaged image stays aligned with the labels; more rays cost time linearly.
_SUBPIXEL = ((0.0, 0.0), (-0.25, -0.25), (0.25, 0.25))


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Explicit components: numpy reductions over a length-3 axis are several times slower.
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _first_positive(t0: np.ndarray, t1: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Nearest of two sorted roots in front of the origin, ``inf`` where neither is."""
    t = np.where(t0 > _T_MIN, t0, t1)
    return np.where(hit & (t > _T_MIN), t, np.inf)


# --------------------------------------------------------------------------- shapes
# Each shape answers two questions: where along a ray does it hit (``intersect``), and
# what are the outward normal and texture coordinates at points on it (``surface``).
# Deriving the normal from the point, not from the intersection state, keeps the two
# independent and lets shadow rays reuse ``intersect`` alone.


@dataclass(frozen=True)
class _Sphere:
    center: np.ndarray
    radius: float

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        oc = o - self.center
        a, b = _dot(d, d), _dot(d, oc)
        disc = b * b - a * (_dot(oc, oc) - self.radius**2)
        root = np.sqrt(np.maximum(disc, 0.0))
        return _first_positive((-b - root) / a, (-b + root) / a, disc >= 0)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = (p - self.center) / self.radius
        theta = np.arccos(np.clip(n[:, 1], -1.0, 1.0))
        uv = np.stack([np.arctan2(n[:, 0], n[:, 2]), theta], axis=-1) * self.radius
        return n, uv


@dataclass(frozen=True)
class _Box:
    center: np.ndarray
    half: np.ndarray
    yaw: float
    rot: np.ndarray = field(init=False, repr=False)  # world-from-local rotation

    def __post_init__(self) -> None:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        object.__setattr__(self, "rot", np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]))

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        ol, dl = (o - self.center) @ self.rot, d @ self.rot
        t_near, t_far = -np.inf, np.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            for axis in range(3):  # slab test; fmin/fmax skip the NaN of 0 * inf
                inv = 1.0 / dl[..., axis]
                t_lo = (-self.half[axis] - ol[..., axis]) * inv
                t_hi = (self.half[axis] - ol[..., axis]) * inv
                t_near = np.fmax(t_near, np.fmin(t_lo, t_hi))
                t_far = np.fmin(t_far, np.fmax(t_lo, t_hi))
        return _first_positive(t_near, t_far, t_far >= t_near)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = (p - self.center) @ self.rot
        axis = np.argmax(np.abs(local) / self.half, axis=-1)
        rows = np.arange(len(p))
        n_local = np.zeros_like(local)
        n_local[rows, axis] = np.sign(local[rows, axis])
        uv = np.stack([local[rows, (axis + 1) % 3], local[rows, (axis + 2) % 3]], axis=-1)
        return n_local @ self.rot.T, uv


@dataclass(frozen=True)
class _Cylinder:
    """Vertical cylinder with caps, axis through ``(x, z)``, spanning ``y0..y1``."""

    x: float
    z: float
    radius: float
    y0: float
    y1: float

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        ox, oy, oz = o[..., 0] - self.x, o[..., 1], o[..., 2] - self.z
        dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
        a, b = dx * dx + dz * dz, dx * ox + dz * oz
        disc = b * b - a * (ox * ox + oz * oz - self.radius**2)
        root = np.sqrt(np.maximum(disc, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            best = np.full(np.broadcast(dx, ox).shape, np.inf)
            for t in ((-b + root) / a, (-b - root) / a):  # far root first: near overwrites
                y = oy + t * dy
                ok = (disc >= 0) & (t > _T_MIN) & (y >= self.y0) & (y <= self.y1)
                best = np.where(ok & (t < best), t, best)
            for y_cap in (self.y0, self.y1):
                t = (y_cap - oy) / dy
                inside = (ox + t * dx) ** 2 + (oz + t * dz) ** 2 <= self.radius**2
                best = np.where(inside & (t > _T_MIN) & (t < best), t, best)
        return best

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y, z = p[:, 0] - self.x, p[:, 1], p[:, 2] - self.z
        side_dist = np.abs(np.hypot(x, z) - self.radius)
        cap_dist = np.minimum(np.abs(y - self.y0), np.abs(y - self.y1))
        on_cap = cap_dist < side_dist
        cap_sign = np.where(np.abs(y - self.y1) < np.abs(y - self.y0), 1.0, -1.0)
        side_n = np.stack([x, np.zeros_like(x), z], axis=-1) / self.radius
        cap_n = np.stack([np.zeros_like(x), cap_sign, np.zeros_like(x)], axis=-1)
        n = np.where(on_cap[:, None], cap_n, side_n)
        side_uv = np.stack([np.arctan2(x, z) * self.radius, y], axis=-1)
        uv = np.where(on_cap[:, None], np.stack([x, z], axis=-1), side_uv)
        return n, uv


@dataclass(frozen=True)
class _Room:
    """The inside of an axis-aligned box; faces 0..5 are x-lo, x-hi, floor, ceiling, z-lo, z-hi."""

    size: np.ndarray  # [W, H, D]

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(d > 0, (self.size - o) / d, np.where(d < 0, -o / d, np.inf))
        return t.min(axis=-1)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dist = np.stack([p[:, 0], self.size[0] - p[:, 0], p[:, 1], self.size[1] - p[:, 1],
                         p[:, 2], self.size[2] - p[:, 2]], axis=-1)
        face = np.argmin(dist, axis=-1)
        n = np.zeros_like(p)
        n[np.arange(len(p)), face // 2] = np.where(face % 2 == 0, 1.0, -1.0)  # inward
        # (horizontal, vertical) on walls, (x, z) on floor and ceiling
        u = np.where(face < 2, p[:, 2], p[:, 0])
        v = np.where((face == 2) | (face == 3), p[:, 2], p[:, 1])
        return face, n, np.stack([u, v], axis=-1)


def _bounding_sphere(shape) -> tuple[np.ndarray, float]:
    if isinstance(shape, _Sphere):
        return shape.center, shape.radius
    if isinstance(shape, _Box):
        return shape.center, float(np.linalg.norm(shape.half))
    half_height = (shape.y1 - shape.y0) / 2
    return np.array([shape.x, shape.y0 + half_height, shape.z]), float(np.hypot(shape.radius, half_height))


def _may_hit(center: np.ndarray, radius: float, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Rays whose line meets the sphere ahead of the origin: a cheap cull before exact tests."""
    oc = o - center
    b, a = _dot(d, oc), _dot(d, d)
    disc = b * b - a * (_dot(oc, oc) - radius**2)
    return (disc >= 0) & (np.sqrt(np.maximum(disc, 0.0)) > b)


# ------------------------------------------------------------------------ the scene
@dataclass(frozen=True)
class _Part:
    shape: _Sphere | _Box | _Cylinder
    cls: int
    material: int
    instance: int


@dataclass(frozen=True)
class _Panel:
    """A door or window: a rectangle in the (horizontal, height) coordinates of a wall."""

    face: int
    u: tuple[float, float]
    v: tuple[float, float]
    cls: int
    material: int
    instance: int


@dataclass
class _Scene:
    room: _Room
    face_materials: list[int]
    panels: list[_Panel]
    parts: list[_Part]
    materials: dict[str, np.ndarray]
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
            bounds = [_bounding_sphere(self.parts[i].shape) for i in indices]
            center = np.mean([c for c, _ in bounds], axis=0)
            radius = max(float(np.linalg.norm(c - center)) + r for c, r in bounds)
            self.groups.append((center, radius, indices))

    def candidates(self, o: np.ndarray, d: np.ndarray):
        """Yield (ray indices, part indices) of each object whose bounding sphere the rays meet."""
        for center, radius, indices in self.groups:
            rays = np.flatnonzero(_may_hit(center, radius, o, d))
            if rays.size:
                yield rays, indices


_FACE_CLASS = np.array([_CLS["wall"], _CLS["wall"], _CLS["floor"], _CLS["ceiling"],
                        _CLS["wall"], _CLS["wall"]])


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


def _sample_objects(rng, room, cam_xz, new_material, first_instance) -> list[_Part]:
    """Place 2-7 objects on the floor by rejection on their footprint circles."""
    width, height, depth = room
    kinds = ("sphere", "box", "cylinder", "table", "pillar")
    placed: list[tuple[float, float, float]] = []  # (x, z, footprint radius)
    parts: list[_Part] = []
    for _ in range(int(rng.integers(2, 8))):
        kind = kinds[rng.choice(5, p=[0.22, 0.26, 0.2, 0.18, 0.14])]
        if kind == "sphere":
            radius = rng.uniform(0.2, 0.55)
            lift = rng.uniform(0.3, 1.0) if rng.random() < 0.25 else 0.0
            dims, footprint = (radius, lift), radius
        elif kind == "box":
            half = np.array([rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.75), rng.uniform(0.15, 0.6)])
            yaw = 0.0 if rng.random() < 0.3 else rng.uniform(0, np.pi)
            dims, footprint = (half, yaw), float(np.hypot(half[0], half[2]))
        elif kind == "cylinder":
            radius = rng.uniform(0.15, 0.45)
            dims, footprint = (radius, rng.uniform(0.3, 1.3)), radius
        elif kind == "table":
            half = np.array([rng.uniform(0.35, 0.8), rng.uniform(0.25, 0.55)])
            dims = (half, rng.uniform(0.6, 0.85), rng.uniform(0, np.pi), rng.uniform(0.025, 0.05))
            footprint = float(np.hypot(*half))
        else:
            radius = rng.uniform(0.12, 0.3)
            dims, footprint = radius, radius
        for _attempt in range(20):
            x = rng.uniform(footprint + 0.05, width - footprint - 0.05)
            z = rng.uniform(footprint + 0.05, depth - footprint - 0.05)
            clear_of_camera = np.hypot(x - cam_xz[0], z - cam_xz[1]) > footprint + 0.6
            if clear_of_camera and all(np.hypot(x - px, z - pz) > footprint + pr + 0.05
                                       for px, pz, pr in placed):
                break
        else:
            continue  # no room left for this object; skip it
        placed.append((x, z, footprint))
        material, instance = new_material(), first_instance + len(placed) - 1
        for shape in _object_shapes(kind, dims, x, z, height):
            parts.append(_Part(shape, _CLS[kind], material, instance))
    return parts


def _object_shapes(kind, dims, x, z, room_height) -> list:
    if kind == "sphere":
        radius, lift = dims
        return [_Sphere(np.array([x, radius + lift, z]), radius)]
    if kind == "box":
        half, yaw = dims
        return [_Box(np.array([x, half[1], z]), half, yaw)]
    if kind == "cylinder":
        radius, tall = dims
        return [_Cylinder(x, z, radius, 0.0, tall)]
    if kind == "pillar":
        return [_Cylinder(x, z, dims, 0.0, room_height)]
    half, top, yaw, leg = dims
    thick = 0.025
    shapes = [_Box(np.array([x, top - thick, z]), np.array([half[0], thick, half[1]]), yaw)]
    c, s = np.cos(yaw), np.sin(yaw)
    leg_half = np.array([leg, (top - 2 * thick) / 2, leg])
    for sx, sz in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        lx, lz = sx * (half[0] - leg - 0.03), sz * (half[1] - leg - 0.03)
        center = np.array([x + c * lx + s * lz, leg_half[1], z - s * lx + c * lz])
        shapes.append(_Box(center, leg_half, yaw))
    return shapes


def _sample_panels(rng, room, forward, new_material, first_instance) -> list[_Panel]:
    """Up to one door and two windows, not overlapping on one wall.

    Walls facing the camera are likelier, else these small classes would be rare in view.
    """
    inward = {0: forward[0], 1: -forward[0], 4: forward[2], 5: -forward[2]}  # -normal . forward
    faces = list(inward)
    weights = np.array([0.15 + max(0.0, -inward[f]) for f in faces])
    panels: list[_Panel] = []
    wants = [("door", 0.8), ("window", 0.8), ("window", 0.45)]
    for cls_name, probability in wants:
        if rng.random() >= probability:
            continue
        face = faces[int(rng.choice(4, p=weights / weights.sum()))]
        wall_len = room[2] if face < 2 else room[0]
        if cls_name == "door":
            width, v = rng.uniform(0.8, 1.1), (0.0, rng.uniform(1.9, min(2.2, room[1] - 0.2)))
        else:
            bottom = rng.uniform(0.7, 1.1)
            width, v = rng.uniform(0.6, 1.8), (bottom, min(bottom + rng.uniform(0.7, 1.3), room[1] - 0.2))
        start = rng.uniform(0.15, wall_len - width - 0.15)
        u = (start, start + width)
        if any(p.face == face and u[0] < p.u[1] + 0.1 and p.u[0] < u[1] + 0.1 for p in panels):
            continue
        panels.append(_Panel(face, u, v, _CLS[cls_name], new_material(),
                             first_instance + len(panels)))
    return panels


def _sample_lights(rng, room, parts: list[_Part]) -> tuple[list[dict], np.ndarray]:
    tint = lambda: 1.0 - 0.2 * rng.random(3)  # noqa: E731 - near-white light colours
    pillars = [p.shape for p in parts if isinstance(p.shape, _Cylinder) and p.shape.y1 >= room[1] - 0.3]
    for _attempt in range(20):  # a lamp inside a pillar would leave only ambient light
        point = np.array([rng.uniform(0.3, room[0] - 0.3), room[1] - 0.25, rng.uniform(0.3, room[2] - 0.3)])
        if all(np.hypot(point[0] - c.x, point[2] - c.z) > c.radius + 0.1 for c in pillars):
            break
    lights = [{"pos": point, "power": rng.uniform(0.9, 1.6), "falloff": rng.uniform(2.5, 4.5),
               "colour": tint()}]
    if rng.random() < 0.6:
        direction = np.array([rng.normal(), -rng.uniform(0.3, 1.0), rng.normal()])
        lights.append({"dir": direction / np.linalg.norm(direction),
                       "power": rng.uniform(0.2, 0.5), "colour": tint()})
    return lights, rng.uniform(0.12, 0.3) * tint()


def _sample_scene(rng: np.random.Generator, size: int) -> _Scene:
    room = np.array([rng.uniform(3.5, 7.0), rng.uniform(2.5, 3.4), rng.uniform(3.5, 7.0)])
    materials: list[dict] = []

    def new_material() -> int:
        materials.append(_sample_material(rng))
        return len(materials) - 1

    floor, ceiling, wall = new_material(), new_material(), new_material()
    accent = new_material() if rng.random() < 0.3 else wall
    walls = [wall, wall, wall, wall]
    walls[int(rng.integers(4))] = accent
    face_materials = [walls[0], walls[1], floor, ceiling, walls[2], walls[3]]
    cam_pos = np.array([rng.uniform(0.5, room[0] - 0.5), rng.uniform(1.0, 1.8),
                        rng.uniform(0.5, room[2] - 0.5)])
    parts = _sample_objects(rng, room, cam_pos[[0, 2]], new_material, first_instance=6)
    cam_rot = _camera_rotation(rng, cam_pos, parts)
    first_panel = 6 + len({part.instance for part in parts})
    panels = _sample_panels(rng, room, cam_rot[:, 2], new_material, first_panel)
    lights, ambient = _sample_lights(rng, room, parts)
    hfov = rng.uniform(np.radians(50), np.radians(80))
    stacked = {key: np.stack([m[key] for m in materials]) for key in materials[0]}
    return _Scene(_Room(room), face_materials, panels, parts, stacked, lights, ambient,
                  cam_pos, cam_rot, focal=(size / 2) / np.tan(hfov / 2))


def _camera_rotation(rng, cam_pos: np.ndarray, parts: list[_Part]) -> np.ndarray:
    """World-from-camera rotation: columns are the camera's right, down and forward axes.

    The camera looks roughly at one object, so most views show objects, not a bare wall.
    """
    if parts:
        target = parts[int(rng.integers(len(parts)))].shape
        tx, tz = (target.x, target.z) if isinstance(target, _Cylinder) else target.center[[0, 2]]
        yaw = np.arctan2(tx - cam_pos[0], tz - cam_pos[2]) + rng.uniform(-0.45, 0.45)
    else:
        yaw = rng.uniform(0, 2 * np.pi)
    pitch = rng.uniform(-0.45, 0.1)  # radians, negative = looking down
    forward = np.array([np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)])
    down = np.array([0.0, -1.0, 0.0]) + forward[1] * forward
    down /= np.linalg.norm(down)
    return np.stack([np.cross(down, forward), down, forward], axis=-1)


# ----------------------------------------------------------------- casting, shading
def _cast(scene: _Scene, origin: np.ndarray, dirs: np.ndarray) -> dict[str, np.ndarray]:
    """Nearest hit of every ray: parameter, point, normal facing the ray, ids, texture coords."""
    t = scene.room.intersect(origin, dirs)
    winner = np.full(len(dirs), -1)  # index into scene.parts, -1 = the room
    for rays, indices in scene.candidates(origin, dirs):
        for index in indices:
            t_part = scene.parts[index].shape.intersect(origin, dirs[rays])
            closer = t_part < t[rays]
            t[rays[closer]] = t_part[closer]
            winner[rays[closer]] = index
    point = origin + t[:, None] * dirs
    normal, uv = np.empty_like(point), np.empty((len(dirs), 2))
    cls, material, instance = (np.empty(len(dirs), dtype=np.int64) for _ in range(3))
    on_room = winner == -1
    normal[on_room], uv[on_room], cls[on_room], material[on_room], instance[on_room] = (
        _room_hits(scene, point[on_room]))
    for index, part in enumerate(scene.parts):
        mask = winner == index
        if mask.any():
            normal[mask], uv[mask] = part.shape.surface(point[mask])
            cls[mask], material[mask], instance[mask] = part.cls, part.material, part.instance
    # Orient every normal against its ray: the side the camera (and the shadow ray) sees.
    normal = np.where((_dot(normal, dirs) > 0)[:, None], -normal, normal)
    # Surface identity, finer than the instance: a table's top and legs differ.
    surface = np.where(on_room, instance, 1000 + winner)
    return {"t": t, "point": point, "normal": normal, "uv": uv, "cls": cls,
            "material": material, "instance": instance, "surface": surface}


def _room_hits(scene: _Scene, point: np.ndarray) -> tuple[np.ndarray, ...]:
    """Normal, uv, class, material and instance of points on the room; panels override walls."""
    face, normal, uv = scene.room.surface(point)
    cls, material = _FACE_CLASS[face], np.asarray(scene.face_materials)[face]
    instance = face.copy()
    for panel in scene.panels:
        inside = ((face == panel.face) & (uv[:, 0] >= panel.u[0]) & (uv[:, 0] <= panel.u[1])
                  & (uv[:, 1] >= panel.v[0]) & (uv[:, 1] <= panel.v[1]))
        cls[inside], material[inside], instance[inside] = panel.cls, panel.material, panel.instance
    return normal, uv, cls, material, instance


def _albedo(materials: dict[str, np.ndarray], index: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Evaluate each material's procedural texture on the rays that hit it."""
    albedo = np.empty((len(index), 3))
    for material in np.unique(index):
        rays = np.flatnonzero(index == material)
        m = {key: value[material] for key, value in materials.items()}
        cos, sin = np.cos(m["angle"]), np.sin(m["angle"])
        u, v = uv[rays, 0], uv[rays, 1]
        if m["kind"] in (0, 1):
            u_rot = np.floor((u * cos - v * sin) / m["period"])
            v_rot = np.floor((u * sin + v * cos) / m["period"])
            weight = (u_rot + v_rot) % 2 if m["kind"] == 0 else u_rot % 2
        else:
            waves = np.sin(np.outer(u, m["freq"][:, 0]) + np.outer(v, m["freq"][:, 1]) + m["phase"])
            weight = (0.5 + 0.5 * waves.mean(axis=-1)) * (1.0 if m["kind"] == 2 else 0.2)
        albedo[rays] = m["c1"] + weight[:, None] * (m["c2"] - m["c1"])
    return albedo


def _unshadowed(scene: _Scene, point: np.ndarray, towards: np.ndarray, t_max: float) -> np.ndarray:
    """True where the segment ``point + t * towards``, ``0 < t < t_max``, hits no object."""
    free = np.ones(len(point), dtype=bool)
    # The room is convex and holds the lights, so only objects can occlude.
    for rays, indices in scene.candidates(point, towards):
        for index in indices:
            blocked = scene.parts[index].shape.intersect(point[rays], towards[rays]) < t_max
            free[rays[blocked]] = False
    return free


def _shade(scene: _Scene, hits: dict[str, np.ndarray]) -> np.ndarray:
    """Lambertian shading with ambient light and shadows; linear RGB, not clipped."""
    normal = hits["normal"]
    point = hits["point"] + 1e-4 * normal  # lift off the surface before casting shadow rays
    light = np.broadcast_to(scene.ambient, normal.shape).copy()
    for lamp in scene.lights:
        if "pos" in lamp:
            towards = lamp["pos"] - point
            dist = np.linalg.norm(towards, axis=-1)
            lambert = _dot(normal, towards) / dist
            strength = lamp["power"] / (1.0 + (dist / lamp["falloff"]) ** 2)
            t_max = 1.0
        else:
            towards = np.broadcast_to(-lamp["dir"], normal.shape)
            lambert, strength, t_max = _dot(normal, towards), lamp["power"], np.inf
        lit = lambert > 0
        visible = np.zeros(len(point), dtype=bool)
        visible[lit] = _unshadowed(scene, point[lit], towards[lit], t_max)
        light += (np.where(visible, lambert * strength, 0.0))[:, None] * lamp["colour"]
    return _albedo(scene.materials, hits["material"], hits["uv"]) * light


# ------------------------------------------------------------- image-space labels
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


def _keypoint_map(luma: np.ndarray, normal: np.ndarray) -> np.ndarray:
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


def _edge_map(luma: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Occlusion and surface-identity edges (1.0) united with texture edges (up to 0.5).

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
    return np.maximum(change.astype(np.float64), texture)


# ----------------------------------------------------------------------- public API
def _camera_rays(scene: _Scene, size: int) -> np.ndarray:
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
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8 pixels, got {size!r}; 64 is the default")
    size = int(size)
    scene = _sample_scene(np.random.default_rng(int(seed)), size)
    centre = (size - 1) / 2.0
    hits = _cast(scene, scene.cam_pos, _camera_rays(scene, size))
    linear = _shade(scene, hits).reshape(len(_SUBPIXEL), size, size, 3)
    rgb = (np.clip(linear, 0.0, 1.0) ** (1 / 2.2)).mean(axis=0)  # gamma-encode, then average
    centre_hits = {key: value[: size * size] for key, value in hits.items()}
    depth = centre_hits["t"].reshape(size, size)
    normal = (centre_hits["normal"] @ scene.cam_rot).reshape(size, size, 3)
    instance = centre_hits["instance"].reshape(size, size)
    surface = centre_hits["surface"].reshape(size, size)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    return {
        "rgb": np.round(rgb * 255).astype(np.uint8),
        "seg": centre_hits["cls"].reshape(size, size).astype(np.uint8),
        "depth": depth.astype(np.float32),
        "normal": normal.astype(np.float32),
        "keypoint": _keypoint_map(luma, normal).astype(np.float32),
        "edge": _edge_map(luma, surface).astype(np.float32),
        "intrinsics": np.array([scene.focal, scene.focal, centre, centre], dtype=np.float32),
        "instance": instance.astype(np.int32),
    }
