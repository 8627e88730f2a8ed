"""The procedural renderer: determinism, label layout, and geometric consistency of labels."""

import time

import numpy as np
import pytest

from dsparse.data.synth import CLASSES, TASK_ENTRIES, render_scene

SEEDS = range(12)
PLANAR = [CLASSES.index(name) for name in ("floor", "ceiling", "wall", "door", "window")]
OBJECTS = [CLASSES.index(name) for name in ("sphere", "box", "cylinder", "table", "pillar")]


@pytest.fixture(scope="module")
def renders():
    return {seed: render_scene(seed, 48) for seed in SEEDS}


def _rays(intrinsics, size):
    fx, fy, cx, cy = (float(x) for x in intrinsics)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    return np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1)


def _angle_deg(a, b):
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _boundary(labels):
    """Pixels whose right or lower neighbour (or the pixel they neighbour) differs."""
    out = np.zeros(labels.shape, dtype=bool)
    for a, b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        change = labels[a] != labels[b]
        out[a] |= change
        out[b] |= change
    return out


def test_same_seed_gives_identical_arrays_and_seeds_differ():
    first, second, other = render_scene(7, 32), render_scene(7, 32), render_scene(8, 32)
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key], second[key]), key
    assert not np.array_equal(first["rgb"], other["rgb"])


def test_shapes_dtypes_and_ranges(renders):
    assert TASK_ENTRIES == ("seg", "normal", "depth", "keypoint", "edge")
    for out in renders.values():
        assert out["rgb"].shape == (48, 48, 3) and out["rgb"].dtype == np.uint8
        assert out["seg"].shape == (48, 48) and out["seg"].dtype == np.uint8
        assert out["seg"].max() < len(CLASSES)
        assert out["depth"].dtype == np.float32 and (out["depth"] > 0.05).all()
        assert out["depth"].max() < 15.0  # rooms are at most 7 x 3.4 x 7 m
        assert out["normal"].shape == (48, 48, 3) and out["normal"].dtype == np.float32
        for key in ("keypoint", "edge"):
            assert out[key].dtype == np.float32 and out[key].shape == (48, 48)
            assert out[key].min() >= 0.0 and out[key].max() <= 1.0
        assert out["intrinsics"].dtype == np.float32 and out["intrinsics"].shape == (4,)
    assert render_scene(0, 20)["rgb"].shape == (20, 20, 3)


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="seed"):
        render_scene(-1)
    with pytest.raises(ValueError, match="size"):
        render_scene(0, size=4)


def test_classes_are_many_and_renders_show_several(renders):
    assert len(CLASSES) >= 8 and len(set(CLASSES)) == len(CLASSES)
    seen = set()
    for out in renders.values():
        present = set(np.unique(out["seg"]).tolist())
        assert len(present) >= 2
        seen |= present
    assert len(seen) >= 8, [CLASSES[c] for c in sorted(seen)]
    assert any(set(np.unique(o["seg"])) & set(OBJECTS) for o in renders.values())


def test_colours_do_not_follow_the_class(renders):
    wall = CLASSES.index("wall")
    means = [out["rgb"][out["seg"] == wall].mean(0) for out in renders.values()
             if (out["seg"] == wall).sum() > 100]
    assert np.std(means, axis=0).mean() > 15  # grey levels out of 255


def test_normals_are_unit_and_face_the_camera(renders):
    for out in renders.values():
        normal = out["normal"].astype(np.float64)
        assert np.allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=1e-5)
        facing = (normal * _rays(out["intrinsics"], 48)).sum(-1)
        assert (facing < 1e-6).all()


def test_normals_from_depth_agree_on_planar_surfaces(renders):
    errors = []
    for out in renders.values():
        depth = out["depth"].astype(np.float64)
        points = _rays(out["intrinsics"], 48) * depth[..., None]
        along_u = points[1:-1, 2:] - points[1:-1, :-2]
        along_v = points[2:, 1:-1] - points[:-2, 1:-1]
        # right x down points away from the camera; the labels face it
        from_depth = -np.cross(along_u, along_v)
        inst = out["instance"]
        same = np.ones((46, 46), dtype=bool)
        for dv, du in ((0, 1), (2, 1), (1, 0), (1, 2)):
            same &= inst[dv:dv + 46, du:du + 46] == inst[1:-1, 1:-1]
        planar = np.isin(out["seg"][1:-1, 1:-1], PLANAR) & same
        errors.append(_angle_deg(from_depth[planar], out["normal"][1:-1, 1:-1][planar]))
    errors = np.concatenate(errors)
    assert errors.size > 5000
    # exact geometry: only float32 rounding separates the two (about 0.01 degrees)
    assert np.median(errors) < 0.5 and np.percentile(errors, 99) < 2.0, np.percentile(errors, [50, 99])


def test_edges_fire_at_object_and_depth_boundaries(renders):
    for out in renders.values():
        assert (out["edge"][_boundary(out["instance"])] == 1.0).all()
        is_object = np.isin(out["seg"], OBJECTS)
        assert (out["edge"][_boundary(is_object)] == 1.0).all()
        depth = out["depth"]
        jump = np.abs(depth[:, 1:] - depth[:, :-1]) > 0.2 * np.minimum(depth[:, 1:], depth[:, :-1])
        assert (out["edge"][:, 1:][jump] == 1.0).all() and (out["edge"][:, :-1][jump] == 1.0).all()
        quiet = ~_boundary(out["instance"])
        assert (out["edge"][quiet] < 1.0).mean() > 0.8  # texture alone never reaches 1


def test_keypoints_concentrate_near_structure(renders):
    near, far = [], []
    for out in renders.values():
        assert out["keypoint"].max() > 0.5
        boundary = _boundary(out["instance"])
        near.append(out["keypoint"][boundary].mean())
        far.append(out["keypoint"][~boundary].mean())
    assert np.mean(near) > 2 * np.mean(far)


def test_report_render_speed():
    render_scene(0)  # warm-up
    start = time.perf_counter()
    for seed in range(20):
        render_scene(seed, 64)
    per_image = (time.perf_counter() - start) / 20
    print(f"\nrender_scene 64x64: {per_image * 1e3:.1f} ms/image on one core "
          f"({2000 * per_image / 2:.1f} s for 2,000 images on 2 processes, ideal)")
