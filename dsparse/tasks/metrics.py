"""Evaluation metrics of the five dense tasks (docs/design.md, "Metrics and Delta_T").

Every metric reduces a batch to a fixed-length vector of sums (see :class:`Metric`), so
values that are not sums themselves (a mean IoU, a median angle) are derived in
:meth:`compute` from sums: a confusion matrix for mIoU and a fine histogram for the median.
All values are NaN when nothing valid was seen, rather than raising, because an empty
shard on one rank is normal and the reduced state decides.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dsparse.tasks.base import Metric
from dsparse.tasks.labels import check_shapes, depth_valid, heat_valid, normal_valid, seg_valid

_NAN = float("nan")


def _ratio(numerator: Tensor | float, denominator: Tensor | float) -> float:
    numerator, denominator = float(numerator), float(denominator)
    return numerator / denominator if denominator > 0 else _NAN


class ConfusionMetric(Metric):
    """Semantic segmentation: mIoU and pixel accuracy from a confusion matrix.

    ``state`` is the ``num_classes x num_classes`` confusion matrix flattened row-major
    (row = target class, column = predicted class); ignore pixels are not counted.
    mIoU averages the IoU over the classes whose union is non-zero over the whole
    evaluation: a class that never occurs in targets or predictions is left out (it has no
    defined IoU), a class that is only predicted counts with IoU 0.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes * num_classes)
        self.num_classes = num_classes

    def _statistics(self, pred: Tensor, target: Tensor) -> Tensor:
        check_shapes("seg", pred, target, pred_channels=self.num_classes, target_channels=None)
        num = self.num_classes
        valid = seg_valid(target)
        if bool((valid & ((target < 0) | (target >= num))).any()):
            raise ValueError(
                f"seg: target holds labels outside [0, {num}) that are not the ignore label"
            )
        cells = torch.where(valid, target * num + pred.argmax(dim=1), num * num)
        return torch.bincount(cells.flatten(), minlength=num * num + 1)[: num * num]

    def class_iou(self) -> Tensor:
        """Per-class IoU (float64, on CPU); NaN for classes absent from targets and predictions."""
        matrix = self.state.detach().cpu().view(self.num_classes, self.num_classes)
        hits = matrix.diag()
        union = matrix.sum(dim=0) + matrix.sum(dim=1) - hits
        return torch.where(union > 0, hits / union.clamp_min(1), torch.nan)

    def compute(self) -> dict[str, float]:
        iou = self.class_iou()
        present = ~iou.isnan()
        miou = float(iou[present].mean()) if bool(present.any()) else _NAN
        matrix = self.state.detach().cpu().view(self.num_classes, self.num_classes)
        return {"miou": miou, "pixel_acc": _ratio(matrix.diag().sum(), matrix.sum())}


class AngleMetric(Metric):
    """Surface normals: angular error in degrees between predicted and true directions.

    The angle is ``atan2(|p x t|, p . t)`` in float64, which is accurate for small angles
    (``acos`` of a float32 dot product cannot resolve errors below about 0.03 degrees) and
    does not need either vector normalised. A zero predicted vector has no direction and
    counts as 90 degrees, matching the loss, where its cosine similarity is 0.

    ``state``: ``[count, sum of angles, count < 11.25, count < 22.5, count < 30]`` followed
    by a histogram of :data:`NUM_BINS` bins of :data:`BIN_DEGREES` over ``[0, 180]``. The
    median is read from the histogram, spreading each bin's pixels evenly across the bin,
    so it is within one bin (0.01 degrees) of the exact sample median; the mean and the
    within-threshold percentages are exact.
    """

    BIN_DEGREES = 0.01
    NUM_BINS = 18000
    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self) -> None:
        super().__init__(2 + len(self.THRESHOLDS) + self.NUM_BINS)

    @staticmethod
    def angles(pred: Tensor, target: Tensor) -> Tensor:
        """Angle in degrees (float64, ``[B, H, W]``) between ``[B, 3, H, W]`` vector fields."""
        pred, target = pred.double(), target.double()
        cross = torch.linalg.cross(pred, target, dim=1).norm(dim=1)
        dot = (pred * target).sum(dim=1)
        angle = torch.rad2deg(torch.atan2(cross, dot))
        return torch.where(pred.norm(dim=1) > 0, angle, 90.0)

    def _statistics(self, pred: Tensor, target: Tensor) -> Tensor:
        check_shapes("normal", pred, target, pred_channels=3, target_channels=3)
        valid = normal_valid(target)
        angle = self.angles(pred, target)
        sums = [valid.sum().double(), torch.where(valid, angle, 0.0).sum()]
        sums += [(valid & (angle < limit)).sum().double() for limit in self.THRESHOLDS]
        bins = (angle / self.BIN_DEGREES).floor().long().clamp(0, self.NUM_BINS - 1)
        bins = torch.where(valid, bins, self.NUM_BINS)
        histogram = torch.bincount(bins.flatten(), minlength=self.NUM_BINS + 1)[: self.NUM_BINS]
        return torch.cat([torch.stack(sums), histogram.double()])

    def _order_statistic(self, cumulative: Tensor, histogram: Tensor, rank: float) -> float:
        """Estimated value of the ``rank``-th smallest angle (1-based)."""
        index = int(torch.searchsorted(cumulative, torch.tensor([rank], dtype=torch.float64)))
        index = min(index, self.NUM_BINS - 1)
        before = float(cumulative[index] - histogram[index])
        return (index + (rank - before - 0.5) / float(histogram[index])) * self.BIN_DEGREES

    def compute(self) -> dict[str, float]:
        state = self.state.detach().cpu()
        count = float(state[0])
        within = {
            f"within_{limit:g}": 100.0 * _ratio(state[2 + i], count)
            for i, limit in enumerate(self.THRESHOLDS)
        }
        if count > 0:
            histogram = state[2 + len(self.THRESHOLDS) :]
            cumulative = histogram.cumsum(dim=0)
            middle = (count + 1) / 2  # the median is the mean of ranks floor and ceil of this
            median = 0.5 * sum(
                self._order_statistic(cumulative, histogram, rank)
                for rank in (math.floor(middle), math.ceil(middle))
            )
        else:
            median = _NAN
        return {"mean_angle": _ratio(state[1], count), "median_angle": median, **within}


class DepthMetric(Metric):
    """Depth: mean absolute error (metres) and mean relative error over pixels with depth > 0.

    ``state``: ``[count, sum |pred - gt|, sum |pred - gt| / gt]``.
    """

    def __init__(self) -> None:
        super().__init__(3)

    def _statistics(self, pred: Tensor, target: Tensor) -> Tensor:
        check_shapes("depth", pred, target, pred_channels=1, target_channels=1)
        valid = depth_valid(target)
        pred, target = pred.double(), target.double()
        error = torch.where(valid, (pred - target).abs(), 0.0)
        relative = error / torch.where(valid, target, 1.0)
        return torch.stack([valid.sum().double(), error.sum(), relative.sum()])

    def compute(self) -> dict[str, float]:
        count, error, relative = self.state.detach().cpu().tolist()
        return {"abs_err": _ratio(error, count), "rel_err": _ratio(relative, count)}


class MAEMetric(Metric):
    """Keypoint and edge maps: mean absolute error over pixels whose target is >= 0.

    ``state``: ``[count, sum |pred - gt|]``.
    """

    def __init__(self, task: str) -> None:
        super().__init__(2)
        self.task = task

    def _statistics(self, pred: Tensor, target: Tensor) -> Tensor:
        check_shapes(self.task, pred, target, pred_channels=1, target_channels=1)
        valid = heat_valid(target)
        error = torch.where(valid, (pred.double() - target.double()).abs(), 0.0)
        return torch.stack([valid.sum().double(), error.sum()])

    def compute(self) -> dict[str, float]:
        count, error = self.state.detach().cpu().tolist()
        return {"mae": _ratio(error, count)}
