"""Task metrics and Delta_T against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from dsparse.tasks import AngleMetric, build_task, build_tasks, delta_t

ALL = ["seg", "normal", "depth", "keypoint", "edge"]
NUM_CLASSES = 4


def _one_hot_logits(labels, num_classes):
    return 5.0 * torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def _vectors_at(degrees):
    """Unit vectors at the given angles from +z in the x-z plane, as a float32 [1, 3, 1, N] map.

    float32 inputs make the angles exact only to about 1e-6 degrees, hence abs=1e-5 below.
    """
    rad = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    vectors = torch.stack([torch.sin(rad), torch.zeros_like(rad), torch.cos(rad)])
    return vectors.reshape(1, 3, 1, -1).float()


def test_miou_skips_absent_class_and_counts_predicted_only_class():
    # 4 classes: class 3 never appears (excluded), class 2 is only predicted (IoU 0).
    target = torch.tensor([[[0, 0, 1], [1, 255, 0]]])
    labels = torch.tensor([[[0, 1, 1], [2, 0, 0]]])
    metric = build_task("seg", num_classes=NUM_CLASSES).new_metric()
    metric.update(_one_hot_logits(labels, NUM_CLASSES), target)
    # class 0: tp 2, union 3 + 2 - 2 = 3; class 1: tp 1, union 2 + 2 - 1 = 3; class 2: 0 / 1
    result = metric.compute()
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert result["pixel_acc"] == pytest.approx(3 / 5)  # the ignore pixel is not counted
    iou = metric.class_iou()
    assert torch.allclose(iou[:3], torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert math.isnan(iou[3])


def test_seg_metric_rejects_out_of_range_label():
    metric = build_task("seg", num_classes=2).new_metric()
    with pytest.raises(ValueError, match="outside"):
        metric.update(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 7]]]))


def test_normal_angles_0_45_90():
    pred = _vectors_at([0.0, 45.0, 90.0, 30.0]) * 3  # scale must not matter
    target = _vectors_at([0.0, 0.0, 0.0, 0.0])
    target[..., 3] = 0  # last pixel invalid
    metric = build_task("normal").new_metric()
    metric.update(pred, target)
    result = metric.compute()
    assert result["mean_angle"] == pytest.approx(45.0, abs=1e-5)
    assert result["median_angle"] == pytest.approx(45.0, abs=AngleMetric.BIN_DEGREES)
    for key in ("within_11.25", "within_22.5", "within_30"):
        assert result[key] == pytest.approx(100 / 3)


def test_normal_thresholds_and_even_count_median():
    pred = _vectors_at([0.0, 20.0, 25.0, 90.0])
    metric = build_task("normal").new_metric()
    metric.update(pred, _vectors_at([0.0] * 4))
    result = metric.compute()
    assert result["mean_angle"] == pytest.approx(33.75, abs=1e-5)
    assert result["median_angle"] == pytest.approx(22.5, abs=AngleMetric.BIN_DEGREES)
    assert result["within_11.25"] == pytest.approx(25.0)
    assert result["within_22.5"] == pytest.approx(50.0)
    assert result["within_30"] == pytest.approx(75.0)


def test_normal_zero_prediction_counts_as_90_degrees():
    metric = build_task("normal").new_metric()
    metric.update(torch.zeros(1, 3, 1, 1), _vectors_at([0.0]))
    assert metric.compute()["mean_angle"] == pytest.approx(90.0)


def test_normal_median_matches_numpy_within_one_bin():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 8, 9, generator=generator)
    target = torch.nn.functional.normalize(torch.randn(2, 3, 8, 9, generator=generator), dim=1)
    metric = build_task("normal").new_metric()
    metric.update(pred, target)
    exact = np.median(AngleMetric.angles(pred, target).numpy())
    assert metric.compute()["median_angle"] == pytest.approx(exact, abs=AngleMetric.BIN_DEGREES)


def test_depth_abs_and_rel_error():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[2.0, 0.0], [4.0, -1.0]]]])
    metric = build_task("depth").new_metric()
    metric.update(pred, target)
    # valid pixels: |1 - 2| = 1 (rel 1/2) and |3 - 4| = 1 (rel 1/4)
    assert metric.compute() == pytest.approx({"abs_err": 1.0, "rel_err": 0.375})


@pytest.mark.parametrize("name", ["keypoint", "edge"])
def test_heat_map_mae(name):
    pred = torch.tensor([[[[0.25, 9.0], [0.5, 0.5]]]])
    target = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]]])
    metric = build_task(name).new_metric()
    metric.update(pred, target)
    assert metric.compute() == pytest.approx({"mae": 1.25 / 3})


def _random_batch(name, generator, batch=3):
    """Predictions and targets with some invalid pixels, for the additivity tests."""
    shape = (batch, 1, 5, 6)
    if name == "seg":
        target = torch.randint(0, NUM_CLASSES, (batch, 5, 6), generator=generator)
        target[torch.rand(target.shape, generator=generator) < 0.2] = 255
        return torch.randn(batch, NUM_CLASSES, 5, 6, generator=generator), target
    if name == "normal":
        target = torch.randn(batch, 3, 5, 6, generator=generator)
        target = torch.nn.functional.normalize(target, dim=1)
        target[:, :, 0, 0] = 0
        return torch.randn(batch, 3, 5, 6, generator=generator), target
    target = torch.rand(shape, generator=generator)
    target[torch.rand(shape, generator=generator) < 0.2] = 0.0 if name == "depth" else -1.0
    return torch.randn(shape, generator=generator), target


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("name", ALL)
def test_two_updates_equal_one_update_on_concatenation(name):
    generator = torch.Generator().manual_seed(1)
    (pred_a, target_a), (pred_b, target_b) = (_random_batch(name, generator) for _ in range(2))
    task = build_tasks([name], num_classes=NUM_CLASSES)[name] if name == "seg" else build_task(name)
    split, joined = task.new_metric(), task.new_metric()
    split.update(pred_a, target_a)
    split.update(pred_b, target_b)
    joined.update(torch.cat([pred_a, pred_b]), torch.cat([target_a, target_b]))
    assert torch.allclose(split.state, joined.state, rtol=1e-12)
    _assert_same(split.compute(), joined.compute())


@pytest.mark.parametrize("name", ALL)
def test_summed_states_of_two_ranks_equal_one_metric(name):
    generator = torch.Generator().manual_seed(2)
    (pred_a, target_a), (pred_b, target_b) = (_random_batch(name, generator) for _ in range(2))
    task = build_task(name, num_classes=NUM_CLASSES) if name == "seg" else build_task(name)
    rank0, rank1, reduced, everything = (task.new_metric() for _ in range(4))
    rank0.update(pred_a, target_a)
    rank1.update(pred_b, target_b)
    everything.update(pred_a, target_a)
    everything.update(pred_b, target_b)
    assert rank0.state.dtype == torch.float64 and rank0.state.dim() == 1
    reduced.state = rank0.state + rank1.state  # what all_reduce(SUM) leaves on every rank
    _assert_same(reduced.compute(), everything.compute())


@pytest.mark.parametrize("name", ALL)
def test_nothing_valid_gives_nan_and_keys_match_declaration(name):
    task = build_task(name, num_classes=NUM_CLASSES) if name == "seg" else build_task(name)
    metric = task.new_metric()
    result = metric.compute()
    assert set(result) == set(task.metric_lower_is_better)
    assert all(math.isnan(v) for v in result.values())


@pytest.mark.parametrize("name", ALL)
def test_reset_and_no_grad(name):
    generator = torch.Generator().manual_seed(3)
    pred, target = _random_batch(name, generator)
    task = build_task(name, num_classes=NUM_CLASSES) if name == "seg" else build_task(name)
    metric = task.new_metric()
    metric.update(pred.requires_grad_(), target)
    assert not metric.state.requires_grad
    assert not any(math.isnan(v) for v in metric.compute().values())
    metric.reset()
    assert torch.all(metric.state == 0)
    assert all(math.isnan(v) for v in metric.compute().values())


def test_delta_t_hand_example():
    tasks = build_tasks(["seg", "depth"], num_classes=2)
    baseline = {"seg": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"abs_err": 0.4, "rel_err": 0.2}}
    metrics = {"seg": {"miou": 0.55, "pixel_acc": 0.76}, "depth": {"abs_err": 0.3, "rel_err": 0.22}}
    # seg: (+10 - 5) / 2 = 2.5 (higher is better)
    # depth: (+25 - 10) / 2 = 7.5 (lower is better: 0.3 vs 0.4 is +25, 0.22 vs 0.2 is -10)
    assert delta_t(metrics, baseline, tasks) == pytest.approx(5.0)
    assert delta_t(baseline, baseline, tasks) == 0.0
    # AdapMTL's per-task sum: seg +10 - 5 = 5, depth +25 - 10 = 15, mean over tasks 10
    assert delta_t(metrics, baseline, tasks, within_task="sum") == pytest.approx(10.0)
    with pytest.raises(ValueError, match="within_task must be one of"):
        delta_t(metrics, baseline, tasks, within_task="median")


def test_delta_t_errors_name_task_and_metric():
    tasks = build_tasks(["depth"])
    metrics = {"depth": {"abs_err": 0.3, "rel_err": 0.2}}
    with pytest.raises(ValueError, match="baseline.*'depth'.*'rel_err'"):
        delta_t(metrics, {"depth": {"abs_err": 0.4}}, tasks)
    with pytest.raises(ValueError, match="'depth'.*'abs_err'.*is 0"):
        delta_t(metrics, {"depth": {"abs_err": 0.0, "rel_err": 0.2}}, tasks)
    with pytest.raises(ValueError, match="metrics.*'depth'.*'rel_err'"):
        delta_t({"depth": {"abs_err": 0.3}}, metrics, tasks)
