"""The five dense prediction tasks: seg, normal, depth, keypoint, edge.

Losses average over valid pixels only (the conventions are in :mod:`labels`). They never
synchronise with the device (no ``.item()``, no boolean indexing): invalid pixels are
zeroed with ``torch.where`` and the count is clamped to at least 1, which also makes a
batch with no valid pixel give a loss of exactly 0 that still has a gradient path, so
every rank runs the same backward graph. Losses are computed in float32 even under
mixed precision, because half-precision sums over a whole image lose the small terms.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F
from torch import Tensor

from dsparse.tasks.base import Metric, Task, register_task
from dsparse.tasks.labels import (
    IGNORE_INDEX,
    ClassLabel,
    DepthLabel,
    HeatLabel,
    NormalLabel,
    check_shapes,
)
from dsparse.tasks.metrics import AngleMetric, ConfusionMetric, DepthMetric, MAEMetric


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` where ``valid``; 0 (with a gradient path) when nothing is valid."""
    total = torch.where(valid, values, 0.0).sum()
    return total / valid.sum().clamp_min(1)


def class_weights_from_frequency(freq: list[float], ignore_absent: bool = True) -> Tensor:
    """Per-class loss weights by median-frequency balancing (Eigen & Fergus, ICCV 2015).

    ``w_c = median(freq) / freq_c``, the median taken over the classes present, so a class
    of median frequency gets weight 1 and rare classes get more. Only ratios matter, so
    ``freq`` may be pixel fractions (the manifest's class priors) or raw pixel counts.

    Args:
        freq: frequency of every class, indexed by class id.
        ignore_absent: if True, a class with frequency 0 gets weight 0 (it can never be
            a target, and an infinite weight would be meaningless). If False, an absent
            class is treated as a data error and raises.

    Returns:
        float32 tensor of ``len(freq)`` weights.

    Raises:
        ValueError: empty list, negative or non-finite entries, no class present, or an
            absent class with ``ignore_absent=False``.
    """
    values = [float(f) for f in freq]
    if not values:
        raise ValueError("freq must list one frequency per class; got an empty list")
    if any(not math.isfinite(f) or f < 0 for f in values):
        raise ValueError(f"class frequencies must be finite and >= 0, got {values}")
    absent = [c for c, f in enumerate(values) if f == 0]
    if absent and not ignore_absent:
        raise ValueError(
            f"classes {absent} have frequency 0; pass ignore_absent=True to give them weight 0"
        )
    present = [f for f in values if f > 0]
    if not present:
        raise ValueError("all class frequencies are 0; cannot balance classes that never occur")
    median = statistics.median(present)
    return torch.tensor([median / f if f > 0 else 0.0 for f in values], dtype=torch.float32)


def _validated_weights(class_weights: Tensor | list[float], num_classes: int) -> Tensor:
    weights = torch.as_tensor(class_weights, dtype=torch.float32).detach().cpu().flatten()
    if weights.numel() != num_classes:
        raise ValueError(
            f"class_weights has {weights.numel()} entries but num_classes is {num_classes}"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"class_weights must be finite and >= 0, got {weights.tolist()}")
    return weights


@register_task("seg")
class SegTask(Task):
    """Semantic segmentation: per-pixel class logits, ignore label 255.

    The loss is cross entropy, weighted per class when ``class_weights`` is given, and
    normalised like ``torch.nn.CrossEntropyLoss``: divided by the sum of the weights of
    the valid pixels, so the loss is a weighted mean and its scale does not depend on
    how many pixels a batch ignores.
    """

    label = ClassLabel()
    metric_lower_is_better = {"miou": False, "pixel_acc": False}
    key_metric = "miou"
    options = ("num_classes", "class_weights")

    def __init__(
        self, num_classes: int | None = None, class_weights: Tensor | list[float] | None = None
    ) -> None:
        if num_classes is None:
            raise ValueError(
                "task 'seg' needs num_classes (the dataset manifest lists the classes)"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(
                f"num_classes must be in [1, {IGNORE_INDEX}] ({IGNORE_INDEX} is the ignore "
                f"label), got {num_classes}"
            )
        self.num_classes = num_classes
        self.num_channels = num_classes
        self.class_weights = (
            None if class_weights is None else _validated_weights(class_weights, num_classes)
        )

    def _weights_on(self, device: torch.device) -> Tensor | None:
        # Cached per device so a GPU run copies the weights once, not once per step.
        if self.class_weights is not None and self.class_weights.device != device:
            self.class_weights = self.class_weights.to(device)
        return self.class_weights

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        check_shapes("seg", pred, target, pred_channels=self.num_classes, target_channels=None)
        pred = pred.float()
        weights = self._weights_on(pred.device)
        total = F.cross_entropy(
            pred, target, weight=weights, ignore_index=self.label.ignore, reduction="sum"
        )
        valid = self.label.valid(target)
        if weights is None:
            normaliser = valid.sum()
        else:
            pixel_weights = weights[torch.where(valid, target, 0)]
            normaliser = torch.where(valid, pixel_weights, 0.0).sum()
        # Clamped, not tested: the sum is 0 whenever the normaliser is, so this is 0 then.
        return total / normaliser.clamp_min(torch.finfo(torch.float32).tiny)

    def new_metric(self) -> Metric:
        return ConfusionMetric(self.num_classes)


@register_task("normal")
class NormalTask(Task):
    """Surface normals: 3 unnormalised channels; loss 1 - cosine similarity on valid pixels."""

    label = NormalLabel()
    metric_lower_is_better = {
        "mean_angle": True,
        "median_angle": True,
        "within_11.25": False,
        "within_22.5": False,
        "within_30": False,
    }
    key_metric = "mean_angle"

    def __init__(self) -> None:
        self.num_channels = 3

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        check_shapes("normal", pred, target, pred_channels=3, target_channels=3)
        valid = self.label.valid(target)
        cosine = (unit_vectors(pred.float()) * unit_vectors(target.float())).sum(dim=1)
        return masked_mean(1.0 - cosine, valid)

    def new_metric(self) -> Metric:
        return AngleMetric()


def unit_vectors(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, dim=1)`` (to float rounding): ``x / max(||x||, eps)`` over channels.
    Written as a sum of squares because ``vector_norm`` over the channels of an NCHW tensor
    runs a slow strided reduction on CPU (6.5 ms against 1.1 ms forward and backward for
    16x3x64x64, 2 threads)."""
    return x / x.square().sum(dim=1, keepdim=True).clamp_min(eps * eps).sqrt()  # no NaN gradient at 0


@register_task("depth")
class DepthTask(Task):
    """Depth in metres, 1 channel; L1 loss over pixels with depth > 0."""

    label = DepthLabel()
    metric_lower_is_better = {"abs_err": True, "rel_err": True}
    key_metric = "abs_err"

    def __init__(self) -> None:
        self.num_channels = 1

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        check_shapes("depth", pred, target, pred_channels=1, target_channels=1)
        return masked_mean((pred.float() - target.float()).abs(), self.label.valid(target))

    def new_metric(self) -> Metric:
        return DepthMetric()


class _HeatMapTask(Task):
    """A 1-channel map in [0, 1] with negative = invalid; L1 loss over valid pixels."""

    label = HeatLabel()
    metric_lower_is_better = {"mae": True}
    key_metric = "mae"

    def __init__(self) -> None:
        self.num_channels = 1

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        check_shapes(self.name, pred, target, pred_channels=1, target_channels=1)
        return masked_mean((pred.float() - target.float()).abs(), self.label.valid(target))

    def new_metric(self) -> Metric:
        return MAEMetric(self.name)


@register_task("keypoint")
class KeypointTask(_HeatMapTask):
    """2D keypoint heat map (Taskonomy-style)."""


@register_task("edge")
class EdgeTask(_HeatMapTask):
    """Edge map (Taskonomy-style)."""
