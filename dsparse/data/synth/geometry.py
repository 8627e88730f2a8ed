"""Ray intersection with the renderer's primitives: sphere, yawed box, cylinder, room.

Kept apart from scene sampling and shading because it is pure geometry: no randomness,
no materials, no classes. Each shape answers two questions: where along a ray does it
hit (``intersect``), and what are the outward normal and texture coordinates at points
on it (``surface``). Deriving the normal from the point, not from the intersection
state, keeps the two independent and lets shadow rays reuse ``intersect`` alone.

Rays are arrays of origins ``o`` and directions ``d`` of shape [..., 3]; ``intersect``
returns the nearest ray parameter ``t`` ahead of the origin, ``inf`` on a miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_T_MIN = 1e-6  # smallest accepted ray parameter; rejects self-hits of shadow rays


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product over the last axis of length 3."""
    # Explicit components: numpy reductions over a length-3 axis are several times slower.
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _first_positive(t0: np.ndarray, t1: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Nearest of two sorted roots in front of the origin, ``inf`` where neither is."""
    t = np.where(t0 > _T_MIN, t0, t1)
    return np.where(hit & (t > _T_MIN), t, np.inf)


@dataclass(frozen=True)
class Sphere:
    center: np.ndarray
    radius: float

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        oc = o - self.center
        a, b = dot(d, d), dot(d, oc)
        disc = b * b - a * (dot(oc, oc) - self.radius**2)
        root = np.sqrt(np.maximum(disc, 0.0))
        return _first_positive((-b - root) / a, (-b + root) / a, disc >= 0)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = (p - self.center) / self.radius
        theta = np.arccos(np.clip(n[:, 1], -1.0, 1.0))
        uv = np.stack([np.arctan2(n[:, 0], n[:, 2]), theta], axis=-1) * self.radius
        return n, uv


@dataclass(frozen=True)
class Box:
    """Box with half-extents ``half``, rotated by ``yaw`` radians about the vertical axis."""

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
class Cylinder:
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


Shape = Sphere | Box | Cylinder


@dataclass(frozen=True)
class Room:
    """The inside of an axis-aligned box; faces 0..5 are x-lo, x-hi, floor, ceiling, z-lo, z-hi."""

    size: np.ndarray  # [W, H, D]

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(d > 0, (self.size - o) / d, np.where(d < 0, -o / d, np.inf))
        return t.min(axis=-1)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Face index, inward normal and texture coordinates of points on the room."""
        dist = np.stack([p[:, 0], self.size[0] - p[:, 0], p[:, 1], self.size[1] - p[:, 1],
                         p[:, 2], self.size[2] - p[:, 2]], axis=-1)
        face = np.argmin(dist, axis=-1)
        n = np.zeros_like(p)
        n[np.arange(len(p)), face // 2] = np.where(face % 2 == 0, 1.0, -1.0)  # inward
        # (horizontal, vertical) on walls, (x, z) on floor and ceiling
        u = np.where(face < 2, p[:, 2], p[:, 0])
        v = np.where((face == 2) | (face == 3), p[:, 2], p[:, 1])
        return face, n, np.stack([u, v], axis=-1)


def bounding_sphere(shape: Shape) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere enclosing ``shape``."""
    if isinstance(shape, Sphere):
        return shape.center, shape.radius
    if isinstance(shape, Box):
        return shape.center, float(np.linalg.norm(shape.half))
    half_height = (shape.y1 - shape.y0) / 2
    return np.array([shape.x, shape.y0 + half_height, shape.z]), float(np.hypot(shape.radius, half_height))


def may_hit(center: np.ndarray, radius: float, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Rays whose line meets the sphere ahead of the origin: a cheap cull before exact tests."""
    oc = o - center
    b, a = dot(d, oc), dot(d, d)
    disc = b * b - a * (dot(oc, oc) - radius**2)
    return (disc >= 0) & (np.sqrt(np.maximum(disc, 0.0)) > b)
