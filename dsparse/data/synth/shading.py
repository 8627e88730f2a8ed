"""Casting rays into a scene, and shading what they hit.

Sits between the geometry (which knows shapes but not scenes) and the labels (which
only see images): ``cast`` finds the nearest hit of every ray and what it is (point,
normal, class, material, instance), and ``shade`` turns hits into linear RGB with
procedural textures, Lambertian lamps and cast shadows. Rendering is vectorised over
all rays; Python loops only run over the few objects, materials and lights of a scene,
and rays are culled by each object's bounding sphere.
"""

from __future__ import annotations

import numpy as np

from dsparse.data.synth.geometry import dot
from dsparse.data.synth.scene import FACE_CLASS, Scene


def cast(scene: Scene, origin: np.ndarray, dirs: np.ndarray) -> dict[str, np.ndarray]:
    """Nearest hit of every ray: parameter, point, normal facing the ray, ids, texture coords.

    Args:
        scene: the scene to cast into.
        origin: [3] world position shared by all rays.
        dirs: [N, 3] world directions.

    Returns:
        ``t`` [N], ``point`` [N, 3], ``normal`` [N, 3] (facing the ray), ``uv`` [N, 2],
        and int64 [N] ``cls``, ``material``, ``instance`` and ``surface`` (which part or
        room face, finer than the instance: a table's top and legs differ).
    """
    t, winner = _nearest(scene, origin, dirs)
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
    normal = np.where((dot(normal, dirs) > 0)[:, None], -normal, normal)
    surface = np.where(on_room, instance, 1000 + winner)
    return {"t": t, "point": point, "normal": normal, "uv": uv, "cls": cls,
            "material": material, "instance": instance, "surface": surface}


def _nearest(scene: Scene, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter of the nearest hit, and the index of the part hit (-1 for the room)."""
    t = scene.room.intersect(origin, dirs)
    winner = np.full(len(dirs), -1)
    for rays, indices in scene.candidates(origin, dirs):
        for index in indices:
            t_part = scene.parts[index].shape.intersect(origin, dirs[rays])
            closer = t_part < t[rays]
            t[rays[closer]] = t_part[closer]
            winner[rays[closer]] = index
    return t, winner


def _room_hits(scene: Scene, point: np.ndarray) -> tuple[np.ndarray, ...]:
    """Normal, uv, class, material and instance of points on the room; panels override walls."""
    face, normal, uv = scene.room.surface(point)
    cls, material = FACE_CLASS[face], np.asarray(scene.face_materials)[face]
    instance = face.copy()
    for panel in scene.panels:
        inside = ((face == panel.face) & (uv[:, 0] >= panel.u[0]) & (uv[:, 0] <= panel.u[1])
                  & (uv[:, 1] >= panel.v[0]) & (uv[:, 1] <= panel.v[1]))
        cls[inside], material[inside], instance[inside] = panel.cls, panel.material, panel.instance
    return normal, uv, cls, material, instance


def shade(scene: Scene, hits: dict[str, np.ndarray]) -> np.ndarray:
    """Lambertian shading with ambient light and shadows; linear RGB [N, 3], not clipped."""
    normal = hits["normal"]
    point = hits["point"] + 1e-4 * normal  # lift off the surface before casting shadow rays
    light = np.broadcast_to(scene.ambient, normal.shape).copy()
    for lamp in scene.lights:
        towards, lambert, strength, t_max = _lamp_terms(lamp, point, normal)
        lit = lambert > 0
        visible = np.zeros(len(point), dtype=bool)
        visible[lit] = _unshadowed(scene, point[lit], towards[lit], t_max)
        light += (np.where(visible, lambert * strength, 0.0))[:, None] * lamp["colour"]
    return _albedo(scene.materials, hits["material"], hits["uv"]) * light


def _lamp_terms(lamp: dict, point: np.ndarray, normal: np.ndarray):
    """Direction to the lamp, cosine term, strength, and the shadow ray's length in ``towards``.

    A point lamp's ``towards`` reaches the lamp at t = 1; a directional one never ends.
    """
    if "pos" in lamp:
        towards = lamp["pos"] - point
        dist = np.linalg.norm(towards, axis=-1)
        lambert = dot(normal, towards) / dist
        strength = lamp["power"] / (1.0 + (dist / lamp["falloff"]) ** 2)
        return towards, lambert, strength, 1.0
    towards = np.broadcast_to(-lamp["dir"], normal.shape)
    return towards, dot(normal, towards), lamp["power"], np.inf


def _unshadowed(scene: Scene, point: np.ndarray, towards: np.ndarray, t_max: float) -> np.ndarray:
    """True where the segment ``point + t * towards``, ``0 < t < t_max``, hits no object."""
    free = np.ones(len(point), dtype=bool)
    # The room is convex and holds the lights, so only objects can occlude.
    for rays, indices in scene.candidates(point, towards):
        for index in indices:
            blocked = scene.parts[index].shape.intersect(point[rays], towards[rays]) < t_max
            free[rays[blocked]] = False
    return free


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
