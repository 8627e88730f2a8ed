"""Task losses against values computed by hand."""

import math

import pytest
import torch

from dsparse.tasks import build_task, build_tasks, class_weights_from_frequency

LN2, LN3 = math.log(2.0), math.log(3.0)


def _seg_example():
    """Two classes, 2x2 pixels. With logits (ln 3, 0) softmax is (3/4, 1/4).

    pixel  logits      target  nll
    (0,0)  (0, 0)      0       ln 2
    (0,1)  (ln 3, 0)   0       ln(4/3)
    (1,0)  (ln 3, 0)   1       ln 4
    (1,1)  (5, -5)     255     ignored
    """
    class0 = torch.tensor([[0.0, LN3], [LN3, 5.0]])
    class1 = torch.tensor([[0.0, 0.0], [0.0, -5.0]])
    pred = torch.stack([class0, class1]).unsqueeze(0).requires_grad_()
    target = torch.tensor([[[0, 0], [1, 255]]])
    return pred, target


def test_seg_cross_entropy_ignores_255():
    pred, target = _seg_example()
    loss = build_task("seg", num_classes=2).loss(pred, target)
    expected = (LN2 + (2 * LN2 - LN3) + 2 * LN2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(pred, target, ignore_index=255).item(), rel=1e-6
    )


def test_seg_cross_entropy_class_weights_is_weighted_mean():
    pred, target = _seg_example()
    task = build_task("seg", num_classes=2, class_weights=[1.0, 3.0])
    # (1 * ln2 + 1 * ln(4/3) + 3 * ln4) / (1 + 1 + 3)
    expected = (LN2 + (2 * LN2 - LN3) + 3 * 2 * LN2) / 5
    assert task.loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_seg_loss_gradient_is_zero_on_ignored_pixel():
    pred, target = _seg_example()
    build_task("seg", num_classes=2).loss(pred, target).backward()
    assert torch.all(pred.grad[0, :, 1, 1] == 0)
    assert torch.any(pred.grad[0, :, 0, 0] != 0)


def test_normal_loss_one_minus_cosine_skips_invalid_pixel():
    # Four pixels against target +x; the last target is the zero vector (invalid).
    pred = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [1.0, 1.0, 0], [-1.0, 0, 0]])
    target = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]])
    as_map = lambda v: v.T.reshape(1, 3, 2, 2)  # noqa: E731 - pixels in row-major order
    loss = build_task("normal").loss(as_map(pred), as_map(target))
    expected = (0.0 + 1.0 + (1 - 1 / math.sqrt(2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_depth_l1_over_positive_depth_only():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[1.5, 0.0], [2.0, -1.0]]]])
    # valid: |1 - 1.5| and |3 - 2|
    assert build_task("depth").loss(pred, target).item() == pytest.approx(0.75)


@pytest.mark.parametrize("name", ["keypoint", "edge"])
def test_heat_map_l1_over_nonnegative_targets(name):
    pred = torch.tensor([[[[0.25, 9.0], [0.5, 0.5]]]])
    target = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]]])
    # valid (0 is a valid value): 0.25 + 0.5 + 0.5 over 3 pixels
    assert build_task(name).loss(pred, target).item() == pytest.approx(1.25 / 3)


def test_depth_gradient_only_on_valid_pixels():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    target = torch.tensor([[[[1.5, 0.0], [2.0, -1.0]]]])
    build_task("depth").loss(pred, target).backward()
    expected = torch.tensor([[[[-0.5, 0.0], [0.5, 0.0]]]])  # sign(pred - gt) / 2 valid pixels
    assert torch.equal(pred.grad, expected)


def _all_invalid(name):
    if name == "seg":
        return torch.randn(2, 3, 4, 4), torch.full((2, 4, 4), 255)
    if name == "normal":
        return torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    if name == "depth":
        return torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    return torch.randn(2, 1, 4, 4), torch.full((2, 1, 4, 4), -1.0)


@pytest.mark.parametrize("name", ["seg", "normal", "depth", "keypoint", "edge"])
@pytest.mark.parametrize("weighted", [False, True])
def test_zero_valid_pixels_give_zero_loss_with_gradient_path(name, weighted):
    pred, target = _all_invalid(name)
    pred.requires_grad_()
    options = {"num_classes": 3, "class_weights": [1.0, 2.0, 0.5] if weighted else None}
    task = build_tasks([name], **options)[name] if name == "seg" else build_task(name)
    loss = task.loss(pred, target)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)


def test_loss_rejects_target_without_channel_dim():
    with pytest.raises(ValueError, match="depth: target must have shape"):
        build_task("depth").loss(torch.zeros(2, 1, 4, 4), torch.ones(2, 4, 4))


def test_half_precision_prediction_gives_float32_loss():
    pred = torch.randn(1, 1, 4, 4, dtype=torch.bfloat16)
    assert build_task("depth").loss(pred, torch.rand(1, 1, 4, 4)).dtype == torch.float32


def test_median_frequency_weights():
    # present: 0.5, 0.25, 0.1 -> median 0.25; absent class 2 gets 0
    weights = class_weights_from_frequency([0.5, 0.25, 0.0, 0.1])
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor([0.5, 1.0, 0.0, 2.5]))
    # only ratios matter: raw counts give the same weights
    assert torch.allclose(class_weights_from_frequency([500, 250, 0, 100]), weights)


def test_median_frequency_weights_errors():
    with pytest.raises(ValueError, match="frequency 0"):
        class_weights_from_frequency([0.5, 0.0], ignore_absent=False)
    with pytest.raises(ValueError, match="all class frequencies are 0"):
        class_weights_from_frequency([0.0, 0.0])
    with pytest.raises(ValueError, match=">= 0"):
        class_weights_from_frequency([0.5, -0.1])
    with pytest.raises(ValueError, match="empty"):
        class_weights_from_frequency([])


def test_unit_vectors_equal_f_normalize_including_zero_vectors():
    from dsparse.tasks.dense import unit_vectors

    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    with torch.no_grad():
        x[0, :, 1, 1] = 0.0
    expected = torch.nn.functional.normalize(x, dim=1)
    got = unit_vectors(x)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn_like(got)
    (grad,) = torch.autograd.grad(got, x, upstream)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    torch.testing.assert_close(grad, expected_grad)
